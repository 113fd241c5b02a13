"""Independent Subnet Training as an ``Algorithm``: slices out, stitched back.

Each round every hidden layer is partitioned into G subnets (seeded by ``seed`` and the
round; G = ``subnets-per-round``, or K when 0, capped at the clients of the round), the
clients are dealt into G groups (``client_groups``), every member of a group gets its
subnet's slice, each group's replies are averaged (weighted by examples) and the subnets
are stitched back (``fedsparse.model.ist``). A subnet none of whose clients replied stays
unchanged. ``ist-scaling`` is applied on the way out and undone on the way back.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedsparse.algorithms import register
from fedsparse.algorithms.base import Algorithm, ClientTask, ClientUpdate, State
from fedsparse.model.ist import (
    SliceUpdate,
    client_groups,
    hidden_sizes,
    merge_by_subnet,
    partition,
    slice_state,
    stitch,
    worker_indices,
)
from fedsparse.seeds import derive_seed


@register
class IST(Algorithm):
    name = "ist"

    def num_subnets(self, k: int) -> int:
        """G for a round with ``k`` clients."""
        return min(self.cfg.subnets_per_round or k, k)

    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int]) -> list[ClientTask]:
        g = self.num_subnets(len(clients))
        parts = partition(hidden_sizes(state), g, derive_seed("partition", self.cfg.seed, server_round))
        indices = [worker_indices(parts, s) for s in range(g)]
        slices = [slice_state(state, index, self.cfg.ist_scaling) for index in indices]
        return [
            ClientTask(client, slices[s], {"subnet": s, "num-subnets": g}, group=s, meta=indices[s])
            for client, s in zip(clients, client_groups(len(clients), g))
        ]

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        task_of = {t.client: t for t in tasks}
        slices = [SliceUpdate(task_of[u.client].meta, u.arrays, u.num_examples, task_of[u.client].group)
                  for u in updates]
        return stitch(state, merge_by_subnet(slices), self.cfg.ist_scaling)

    def describe(self) -> str:
        k = self.cfg.clients_per_round
        g = self.num_subnets(k)
        kind = "pure IST" if g == k else ("FedAvg on the full head" if g == 1 else "grouped IST")
        return f"IST: {k} clients and {g} subnets per round ({kind}), scaling {self.cfg.ist_scaling}"
