"""Independent Subnet Training as a Flower Strategy.

Each round: sample K clients, partition every hidden layer of the head into G subnets
(seeded by ``seed`` and the round; G = ``subnets_per_round``, default K), deal the clients
into G groups, send each client **only its group's slice**, average each group's replies
(weighted by examples) and stitch the subnets back (``fedsparse.ist``). Clients that fail
or send a malformed reply (wrong shapes, NaN/Inf) are left out; a subnet none of whose
clients replied stays unchanged. Client-side evaluation is off: the ServerApp evaluates
the full stitched head on held-out features through ``evaluate_fn``.
"""

from __future__ import annotations

import random
from logging import INFO, WARNING
from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsparse.ist import (
    SliceUpdate,
    all_finite,
    check_scaling,
    client_groups,
    expected_slice_shapes,
    hidden_sizes,
    merge_by_subnet,
    partition,
    slice_state,
    stitch,
    worker_indices,
)
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY
from fedsparse.task import derive_seed
from strategies.common import RoundStats, collect_replies, sample_clients, train_metrics
from strategies.progress import LiveReplies


class IST(LiveReplies, Strategy):
    """IST over K sampled clients and G subnets per round.

    Args:
        clients_per_round: K, the number of clients per round.
        seed: seeds client sampling and the neuron partitions.
        wait_timeout: how long to wait for K clients to connect before going on with fewer.
        subnets_per_round: G; 0 = one subnet per client (G = K). Capped at the number of
            clients actually sampled in a round.
        scaling: ``"none"`` (the authors') or ``"width"`` (see ``fedsparse.ist``).
    """

    def __init__(
        self,
        clients_per_round: int,
        seed: int = 0,
        wait_timeout: float | None = None,
        subnets_per_round: int = 0,
        scaling: str = "none",
    ) -> None:
        if not 0 <= subnets_per_round <= clients_per_round:
            raise ValueError(f"subnets-per-round must be in [0, {clients_per_round}], got {subnets_per_round}")
        check_scaling(scaling)
        self.scaling = scaling
        self.clients_per_round = clients_per_round
        self.subnets_per_round = subnets_per_round
        self.wait_timeout = wait_timeout
        self.seed = seed
        self.rng = random.Random(derive_seed("sampling", seed))
        self.stats: RoundStats | None = None
        self.history: list[RoundStats] = []
        self._global: dict | None = None
        self._assigned: dict[int, list] = {}  # node -> hidden indices of its subnet
        self._subnet: dict[int, int] = {}  # node -> its subnet

    def summary(self) -> None:
        g = self.subnets_per_round or self.clients_per_round
        kind = "pure IST" if g == self.clients_per_round else ("FedAvg on the full head" if g == 1 else "grouped IST")
        log(INFO, "IST: %d clients and %d subnets per round (%s), seed %d, scaling %s",
            self.clients_per_round, g, kind, self.seed, self.scaling)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.stats = RoundStats(server_round)
        self.history.append(self.stats)
        state = arrays.to_torch_state_dict()
        self._global = state
        nodes = sample_clients(grid, self.clients_per_round, self.rng, self.wait_timeout)
        k = len(nodes)  # fewer than clients-per-round only when too few connected in time
        g = min(self.subnets_per_round or k, k)
        self.stats.subnets = g
        parts = partition(hidden_sizes(state), g, derive_seed("partition", self.seed, server_round))
        contents, indices = [], []
        for subnet in range(g):  # one slice per subnet, shared by the group's messages
            index = worker_indices(parts, subnet)
            conf = ConfigRecord({**dict(config), "server-round": server_round, "subnet": subnet, "num-subnets": g})
            indices.append(index)
            contents.append(RecordDict({ARRAYS_KEY: ArrayRecord(slice_state(state, index, self.scaling)), CONFIG_KEY: conf}))
        messages, self._assigned, self._subnet = [], {}, {}
        for node, subnet in zip(nodes, client_groups(k, g)):
            self._assigned[node] = indices[subnet]
            self._subnet[node] = subnet
            messages.append(Message(content=contents[subnet], message_type=MessageType.TRAIN, dst_node_id=node))
        return self.stats.record_sent(messages)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._global is not None and self.stats is not None, "aggregate_train before configure_train"
        expected = {node: expected_slice_shapes(self._global, index) for node, index in self._assigned.items()}
        good = collect_replies(self.stats, replies, expected)
        updates = [SliceUpdate(self._assigned[node], state, n, self._subnet[node]) for node, state, n in good]
        new_state = stitch(self._global, merge_by_subnet(updates), self.scaling)
        if not all_finite(new_state):  # replies are checked one by one; this catches an overflow in the mean
            log(WARNING, "round %d: the stitched head is not finite; keeping the previous head", server_round)
            new_state = self._global
        return ArrayRecord(new_state), train_metrics(self.stats, good)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
