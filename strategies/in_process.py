"""The in-process driver: the real Strategy adapter and the real ClientApp exchanging real
Messages, without Ray or a SuperLink.

``LocalGrid`` answers each message by calling the ClientApp (mods included) in this
process; nodes get ids that are not their partition ids (as under Flower), so the run
also checks that nothing pairs by node id. ``fedsparse bench`` uses ``one_round`` to
measure the messages of one round and a client's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from flwr.app import Context, Message, MessageType, RecordDict

from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics
from fedsparse.engine.rounds import RoundEngine
from fedsparse.protocol import wire_bytes
from fedsparse.seeds import derive_seed
from strategies.adapter import AlgorithmStrategy
from strategies.flower_internals import set_task_identity


def node_id_of(partition_id: int) -> int:
    """A node id for a partition that is not the partition id (a seeded 31-bit number)."""
    return derive_seed("node", partition_id) % (2**31 - 2) + 2


class LocalGrid:
    """The Grid calls a strategy makes, answered by the ClientApp in this process."""

    def __init__(self, cfg: RunConfig, answer: int | None = None) -> None:
        from clients.client_app import app as client_app

        self.cfg = cfg
        self.client_app = client_app
        self.partition_of = {node_id_of(i): i for i in range(cfg.num_clients)}
        self.answer = answer  # answer only the first N training messages of a call (None: all)
        self.sent: list[Message] = []  # the last call's messages
        self.replies: list[Message] = []  # the last call's replies

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def context(self, node: int) -> Context:
        """The Context a SuperNode would hand the ClientApp."""
        return Context(run_id=1, node_id=node, state=RecordDict(), run_config=self.cfg.to_run_config(),
                       node_config={"partition-id": self.partition_of[node], "num-partitions": self.cfg.num_clients})

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        todo = messages
        if self.answer is not None and all(m.metadata.message_type == MessageType.TRAIN for m in messages):
            todo = messages[: self.answer]
        replies = [self.client_app(m, self.context(m.metadata.dst_node_id)) for m in todo]
        self.sent, self.replies = messages, replies
        return replies


def in_process_run(cfg: RunConfig, engine: RoundEngine | None = None) -> RunMetrics:
    """Run ``cfg`` through the Strategy adapter and the ClientApp in this process."""
    set_task_identity()
    engine = engine if engine is not None else RoundEngine(cfg)
    return engine.run(AlgorithmStrategy(engine, LocalGrid(cfg), "in-process", clients_are_partitions=True))


@dataclass
class RoundTrip:
    """Messages of one round: what the server sent each node, and what came back."""

    sent: list[Message]
    replies: list[Message]

    @property
    def bytes_down(self) -> list[int]:
        return [wire_bytes(m) for m in self.sent]

    @property
    def bytes_up(self) -> list[int]:
        return [wire_bytes(m) for m in self.replies]


def one_round(cfg: RunConfig, answer: int | None = None, engine: RoundEngine | None = None) -> RoundTrip:
    """Round 1 of ``cfg`` in this process: the messages sent and the ClientApp's replies
    (all of them, or only the first ``answer``). The head is not updated."""
    set_task_identity()
    engine = engine if engine is not None else RoundEngine(cfg, report=lambda s: None)
    grid = LocalGrid(cfg, answer)
    strategy = AlgorithmStrategy(engine, grid, "in-process", clients_are_partitions=True)
    engine.state = engine.initial_head_state()
    tasks = engine.plan_round(1, strategy.clients(cfg.clients_per_round))
    strategy.exchange(1, tasks)
    return RoundTrip(grid.sent, grid.replies)
