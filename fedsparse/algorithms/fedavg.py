"""FedAvg on the full head: every client gets the whole head; the example-weighted mean
of the replies is the next head (a round in which nobody replied keeps the head).

Before merging, every update is clipped to ``clip-factor`` x the round's median update
(``fedsparse.algorithms.robust``). ``group-rule`` replaces the mean by a coordinate-wise trimmed mean or median over the
replies (robust to a few bad clients). ``fedopt`` is FedAvg with a server optimizer step on
the result (``server-opt``: FedAvgM with ``sgd``, FedAdam with ``adam``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from fedsparse.algorithms import register
from fedsparse.algorithms.base import Algorithm, ClientTask, ClientUpdate, State
from fedsparse.algorithms.robust import check_directions, clip_updates
from fedsparse.model.ist import robust_mean, weighted_mean
from fedsparse.model.server_opt import ServerOptimizer

if TYPE_CHECKING:
    from fedsparse.config import RunConfig


def robust_state(states: Sequence[Mapping[str, torch.Tensor]], rule: str, trim: float) -> State:
    """Coordinate-wise ``rule`` (trimmed-mean, median; ``fedsparse.model.ist.robust_mean``) of states."""
    out: State = {}
    for key, ref in states[0].items():
        value, _ = robust_mean(torch.stack([torch.as_tensor(s[key]) for s in states]), None, rule, trim)
        out[key] = value.to(ref.dtype)
    return out


@register
class FedAvg(Algorithm):
    name = "fedavg"

    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int]) -> list[ClientTask]:
        full = dict(state)
        return [ClientTask(client, full, group=0) for client in clients]

    def merge(self, updates: Sequence[ClientUpdate]) -> State:
        """The replies' example-weighted mean, or their coordinate-wise ``group-rule``."""
        if self.cfg.group_rule == "mean":
            return weighted_mean([u.arrays for u in updates], [u.num_examples for u in updates])
        return robust_state([u.arrays for u in updates], self.cfg.group_rule, self.cfg.group_trim)

    def defend(self, tasks: Sequence[ClientTask], updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The updates clipped to the round's median and without those pointing away from it
        (``fedsparse.algorithms.robust``)."""
        return check_directions(tasks, clip_updates(tasks, updates, self.cfg.clip_factor), self.cfg.min_cosine)

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        updates = self.defend(tasks, updates)
        if not updates:
            return dict(state)
        return self.merge(updates)

    def describe(self) -> str:
        text = f"FedAvg: the full head to {self.cfg.clients_per_round} clients per round"
        return text + (f", coordinate-wise {self.cfg.group_rule}" if self.cfg.group_rule != "mean" else "")


@register
class FedOpt(FedAvg):
    """FedAvg plus a server optimizer on the merged update (Reddi et al. 2021): ``server-opt``
    ``sgd`` is FedAvgM, ``adam`` FedAdam, ``none`` FedAvg itself; moments are checkpointed.
    A separate name because FedAvg did better without one here (README, "IST under label skew")."""

    name = "fedopt"

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        self.server = ServerOptimizer(cfg.server_opt, cfg.server_lr, cfg.server_momentum)

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        updates = self.defend(tasks, updates)
        if not updates:
            return dict(state)
        return self.server.step(state, self.merge(updates))

    def state_dict(self) -> dict[str, Any]:
        return {f"server.{k}": v for k, v in self.server.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server.load_state_dict({k[len("server."):]: v for k, v in state.items() if k.startswith("server.")})

    def describe(self) -> str:
        return super().describe().replace("FedAvg:", "FedOpt:", 1) + f", {self.server.describe()}"
