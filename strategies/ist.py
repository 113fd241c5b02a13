"""Independent Subnet Training as a Flower Strategy.

Each round: sample K clients, partition every hidden layer of the head into K parts
(seeded by ``seed`` and the round), send each client **only its slice**, and stitch the
trained slices back (``fedsparse.ist``). Clients that fail or send a malformed reply leave
their slice unchanged. Client-side evaluation is off: the ServerApp evaluates the full
stitched head on held-out features through ``evaluate_fn``.
"""

from __future__ import annotations

import random
from logging import INFO
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsparse.ist import SliceUpdate, expected_slice_shapes, hidden_sizes, partition, slice_state, stitch, worker_indices
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY
from fedsparse.task import derive_seed
from strategies.common import RoundStats, collect_replies, sample_clients, train_metrics


class IST(Strategy):
    """IST over K sampled clients per round.

    Args:
        clients_per_round: K, the number of clients (and subnets) per round.
        seed: seeds client sampling and the neuron partitions.
    """

    def __init__(self, clients_per_round: int, seed: int = 0, wait_timeout: float | None = None) -> None:
        self.clients_per_round = clients_per_round
        self.wait_timeout = wait_timeout
        self.seed = seed
        self.rng = random.Random(derive_seed("sampling", seed))
        self.stats: RoundStats | None = None
        self.history: list[RoundStats] = []
        self._global: dict | None = None
        self._assigned: dict[int, list] = {}

    def summary(self) -> None:
        log(INFO, "IST: %d clients (subnets) per round, seed %d", self.clients_per_round, self.seed)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.stats = RoundStats(server_round)
        self.history.append(self.stats)
        state = arrays.to_torch_state_dict()
        self._global = state
        nodes = sample_clients(grid, self.clients_per_round, self.rng, self.wait_timeout)
        k = len(nodes)  # fewer than clients-per-round only when too few connected in time
        parts = partition(hidden_sizes(state), k, derive_seed("partition", self.seed, server_round))
        messages, self._assigned = [], {}
        for worker, node in enumerate(nodes):
            index = worker_indices(parts, worker)
            self._assigned[node] = index
            conf = ConfigRecord({**dict(config), "server-round": server_round, "subnet": worker, "num-subnets": k})
            content = RecordDict({ARRAYS_KEY: ArrayRecord(slice_state(state, index)), CONFIG_KEY: conf})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        return self.stats.record_sent(messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None and self.stats is not None, "aggregate_train before configure_train"
        expected = {node: expected_slice_shapes(self._global, index) for node, index in self._assigned.items()}
        good = collect_replies(self.stats, replies, expected)
        updates = [SliceUpdate(self._assigned[node], state, n) for node, state, n in good]
        new_state = stitch(self._global, updates)
        return ArrayRecord(new_state), train_metrics(self.stats, good)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

