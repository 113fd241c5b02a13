"""Closed-form heads on the clients' cached features: ``fed3r`` (ridge) and ``fedncm`` (class means).

No training: each client sends the sufficient statistics of its features once (a ``stats``
task; nothing goes down but the round's settings), the server adds them up and solves
(``fedsparse.model.closed_form``). The head becomes linear (``layers.0``: features -> classes).
A client is counted once: later rounds ask only clients not yet counted, and a round in
which every sampled client has been counted sends nothing. With ``clients-per-round =
num-clients`` one round covers the federation; otherwise the head covers the clients sampled
so far. The running sums and the counted clients are the algorithm's state (checkpointed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import torch

from fedsparse.algorithms import register
from fedsparse.algorithms.base import NUM_CLASSES_KEY, STATS, STATS_KEY, Algorithm, ClientTask, ClientUpdate, State
from fedsparse.model.closed_form import add_stats, check_ridge_stats, ncm_head, ridge_head, stats_spec
from fedsparse.model.head import num_layers

if TYPE_CHECKING:
    from fedsparse.config import RunConfig


def head_io(state: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(feature width, number of classes) of a head's state dict."""
    return int(state["layers.0.weight"].shape[1]), int(state[f"layers.{num_layers(state) - 1}.weight"].shape[0])


class ClosedForm(Algorithm):
    """Sum the clients' statistics of kind ``stats``, then ``solve`` them into a linear head."""

    client_task = STATS
    stats: ClassVar[str] = ""

    def __init__(self, cfg: "RunConfig") -> None:
        super().__init__(cfg)
        self.total: State | None = None
        self.counted: set[int] = set()

    def solve(self, total: Mapping[str, torch.Tensor], in_dim: int) -> State:
        raise NotImplementedError

    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int]) -> list[ClientTask]:
        in_dim, num_classes = head_io(state)
        spec = stats_spec(self.stats, in_dim, num_classes)
        config = {STATS_KEY: self.stats, NUM_CLASSES_KEY: num_classes}
        check = None
        if self.stats == "ridge":
            def check(arrays: Mapping[str, torch.Tensor], n: int) -> None:
                check_ridge_stats(arrays, n, in_dim)
        return [ClientTask(c, {}, dict(config), group=0, reply=spec, check=check) for c in clients
                if c not in self.counted]

    def aggregate(self, server_round: int, state: Mapping[str, torch.Tensor], tasks: Sequence[ClientTask],
                  updates: Sequence[ClientUpdate]) -> State:
        for u in updates:
            if u.client not in self.counted:
                self.total = add_stats(self.total, u.arrays)
                self.counted.add(u.client)
        if self.total is None:
            return dict(state)
        return self.solve(self.total, head_io(state)[0])

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"counted": torch.tensor(sorted(self.counted), dtype=torch.long)}
        out.update({f"total.{k}": v.clone() for k, v in (self.total or {}).items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counted = {int(c) for c in torch.as_tensor(state.get("counted", torch.zeros(0, dtype=torch.long))).tolist()}
        total = {k[len("total."):]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("total.")}
        self.total = total or None


@register
class Fed3R(ClosedForm):
    """Ridge regression on one-hot labels (Fanì et al., ICML 2024), lambda = ``ridge-lambda``."""

    name = "fed3r"
    stats = "ridge"

    def solve(self, total: Mapping[str, torch.Tensor], in_dim: int) -> State:
        return ridge_head(total, self.cfg.ridge_lambda, in_dim)

    def describe(self) -> str:
        return (f"Fed3R: ridge head (lambda {self.cfg.ridge_lambda:g}) from the statistics of up to "
                f"{self.cfg.clients_per_round} new clients per round")


@register
class FedNCM(ClosedForm):
    """The nearest class mean (Legate et al., NeurIPS 2023), Euclidean."""

    name = "fedncm"
    stats = "ncm"

    def solve(self, total: Mapping[str, torch.Tensor], in_dim: int) -> State:
        return ncm_head(total)

    def describe(self) -> str:
        return f"FedNCM: nearest-class-mean head from the class sums of up to {self.cfg.clients_per_round} new clients per round"
