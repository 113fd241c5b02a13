"""The FedAvg baseline: the full head to every sampled client, example-weighted average back.

Flower's own ``FedAvg`` does the averaging; this subclass only samples exactly K clients
with the same seeded sampler as IST, measures the bytes it sends and receives, and drops
malformed replies (logged, counted; NaN/Inf included) before FedAvg sees them.
``subnets-per-round`` does not apply: FedAvg is IST with one subnet.
"""

from __future__ import annotations

import random
from logging import WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedsparse.ist import all_finite
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, NUM_EXAMPLES_KEY
from fedsparse.task import derive_seed
from strategies.common import RoundStats, collect_replies, sample_clients, train_metrics
from strategies.progress import LiveReplies


class FedAvgBaseline(LiveReplies, FedAvg):
    """FedAvg with K clients per round and the same accounting as :class:`strategies.ist.IST`."""

    def __init__(self, clients_per_round: int, seed: int = 0, wait_timeout: float | None = None) -> None:
        super().__init__(
            fraction_evaluate=0.0,
            min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round,
            weighted_by_key=NUM_EXAMPLES_KEY,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.clients_per_round = clients_per_round
        self.wait_timeout = wait_timeout
        self.rng = random.Random(derive_seed("sampling", seed))
        self.stats: RoundStats | None = None
        self.history: list[RoundStats] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._sent_to: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.stats = RoundStats(server_round, subnets=1)
        self.history.append(self.stats)
        self._shapes = {k: tuple(v.shape) for k, v in arrays.to_torch_state_dict().items()}
        self._sent_to = sample_clients(grid, self.clients_per_round, self.rng, self.wait_timeout)
        conf = ConfigRecord({**dict(config), "server-round": server_round})
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: conf})
        messages = [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=n) for n in self._sent_to]
        return self.stats.record_sent(messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.stats is not None, "aggregate_train before configure_train"
        replies = list(replies)
        good = collect_replies(self.stats, replies, {n: self._shapes for n in self._sent_to})
        good_nodes = {node for node, _, _ in good}
        kept = [r for r in replies if r.metadata.src_node_id in good_nodes and not r.has_error()]
        if not kept:
            return None, train_metrics(self.stats, good)
        arrays, _ = super().aggregate_train(server_round, kept)
        if arrays is not None and not all_finite(arrays.to_torch_state_dict()):
            log(WARNING, "round %d: the averaged head is not finite; keeping the previous head", server_round)
            return None, train_metrics(self.stats, good)
        return arrays, train_metrics(self.stats, good)
