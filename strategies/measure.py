"""Training rounds through the real strategy and the real ClientApp, in this process.

``fedsparse bench`` uses ``one_round`` to measure what travels (the serialized Flower
messages, both ways) and what a client process holds while it trains, without starting the
Simulation Engine: the strategy's ``configure_train`` builds the messages, the ClientApp
(mods included) answers them, and the strategy's ``aggregate_train`` stitches or averages.
``local_rounds`` runs whole rounds that way: Flower's messages without Ray, the middle
step between the plain loop (``fedsparse.plain``) and the Simulation Engine.

Node ``i + 1`` holds partition ``i``, so the strategy's seeded sampler picks the same
partitions as the plain loop's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ArrayRecord, Context, Message, RecordDict
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


def _ensure_task_identity() -> None:
    """Flower stamps messages with the running task's identity; outside a run there is none."""
    if TaskIdentity._run_id is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


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
    from strategies.server_app import make_strategy, train_config_record

    _ensure_task_identity()
    head = initial_head(cfg, in_dim, n_classes)
    strategy = make_strategy(cfg)
    nodes = list(range(1, cfg.clients_per_round + 1))
    conf = train_config_record(cfg)
    sent = list(strategy.configure_train(1, ArrayRecord(head.state_dict()), conf, LocalGrid(nodes)))
    replies = []
    for msg in sent[: len(sent) if answer is None else answer]:
        node = msg.metadata.dst_node_id
        replies.append(client_app(msg, client_context(cfg, node - 1, node)))
    return RoundTrip(sent, replies)


def local_rounds(cfg: RunConfig, report: Callable[[str], None] = print) -> dict[str, Any]:
    """``cfg.num_rounds`` rounds of the strategy and ClientApp in this process; per-round
    seconds and accuracy, and the final state."""
    from clients.client_app import app as client_app
    from fedsparse.head import MLPHead, evaluate
    from fedsparse.task import test_features
    from strategies.server_app import make_strategy, train_config_record

    _ensure_task_identity()
    test, n_classes = test_features(cfg)
    arrays = ArrayRecord(initial_head(cfg, test.x.shape[1], n_classes).state_dict())
    strategy = make_strategy(cfg)
    grid = LocalGrid(list(range(1, cfg.num_clients + 1)))
    conf = train_config_record(cfg)
    rounds, t_start = [], time.perf_counter()
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        sent = list(strategy.configure_train(rnd, arrays, conf, grid))
        replies = [client_app(m, client_context(cfg, m.metadata.dst_node_id - 1, m.metadata.dst_node_id)) for m in sent]
        new, _ = strategy.aggregate_train(rnd, replies)
        arrays = new if new is not None else arrays
        accuracy, loss = evaluate(MLPHead.from_state_dict(arrays.to_torch_state_dict()), test.x, test.y)
        rounds.append({"round": rnd, "accuracy": accuracy, "loss": loss, "seconds": time.perf_counter() - t0})
        report(f"in-process Flower round {rnd}/{cfg.num_rounds}: accuracy {accuracy:.4f}, {rounds[-1]['seconds']:.2f}s")
    return {"rounds": rounds, "wall_seconds": time.perf_counter() - t_start, "state": arrays.to_torch_state_dict()}
