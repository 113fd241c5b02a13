"""One training round through the real strategy and the real ClientApp, in this process.

``fedsparse bench`` uses it to measure what travels (the serialized Flower messages, both
ways) and what a client process holds while it trains, without starting the Simulation
Engine: the strategy's ``configure_train`` builds the messages, the ClientApp (mods
included) answers them, and the strategy's ``aggregate_train`` stitches or averages.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsparse.config import RunConfig
from fedsparse.protocol import wire_bytes
from fedsparse.task import initial_head


class LocalGrid:
    """The part of Flower's ``Grid`` that a strategy's ``configure_train`` uses: node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


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


def client_context(cfg: RunConfig, partition_id: int, node_id: int) -> Context:
    """The Context a SuperNode would hand the ClientApp for ``partition_id``."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": cfg.num_clients},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def one_round(cfg: RunConfig, in_dim: int, n_classes: int, answer: int | None = None) -> RoundTrip:
    """Configure round 1 of ``cfg.strategy`` for ``cfg.clients_per_round`` clients and let the
    ClientApp answer (all of them, or only the first ``answer``). Node ``i + 1`` holds partition ``i``."""
    from clients.client_app import app as client_app
    from strategies.server_app import make_strategy

    if TaskIdentity._run_id is None:  # Flower stamps messages with the task's identity
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    head = initial_head(cfg, in_dim, n_classes)
    strategy = make_strategy(cfg)
    nodes = list(range(1, cfg.clients_per_round + 1))
    conf = ConfigRecord({"local-steps": cfg.local_steps, "lr": cfg.lr, "batch-size": cfg.batch_size})
    sent = list(strategy.configure_train(1, ArrayRecord(head.state_dict()), conf, LocalGrid(nodes)))
    replies = []
    for msg in sent[: len(sent) if answer is None else answer]:
        node = msg.metadata.dst_node_id
        replies.append(client_app(msg, client_context(cfg, node - 1, node)))
    return RoundTrip(sent, replies)
