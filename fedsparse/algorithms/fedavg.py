"""FedAvg on the full head: every client gets the whole head; the example-weighted mean
of the replies is the next head (a round in which nobody replied keeps the head)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from fedsparse.algorithms import register
from fedsparse.algorithms.base import Algorithm, ClientTask, ClientUpdate, State
from fedsparse.model.ist import example_weights


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[int]) -> State:
    """``sum_i w_i * state_i`` with ``w_i = n_i / sum(n)`` (equal weights when no examples)."""
    weights = example_weights(counts)
    out: State = {}
    for key, ref in states[0].items():
        acc = torch.zeros_like(ref, dtype=torch.float32 if not ref.is_floating_point() else ref.dtype)
        for w, s in zip(weights, states):
            acc += w * s[key].to(acc.dtype)
        out[key] = acc
    return out


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int]) -> list[ClientTask]:
        full = dict(state)
        return [ClientTask(client, full, group=0) for client in clients]

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        if not updates:
            return dict(state)
        return weighted_mean([u.arrays for u in updates], [u.num_examples for u in updates])

    def describe(self) -> str:
        return f"FedAvg: the full head to {self.cfg.clients_per_round} clients per round"
