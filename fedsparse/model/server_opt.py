"""Server optimizers on an aggregated update (FedOpt: Reddi et al. 2021; FedAvgM: Hsu et al. 2019).

The round's aggregate (FedAvg's mean, IST's stitched head) is turned into a pseudo-gradient
``g = x - aggregate`` (minus the round's mean client update) and the server takes one optimizer
step on it:

- ``none``: ``x <- aggregate`` (plain FedAvg / IST; ``server-lr`` is ignored);
- ``sgd``: ``m <- beta1 * m + g``, ``x <- x - lr * m`` (FedAvgM; ``beta1 = 0`` is FedAvg with a
  server learning rate, and ``lr = 1, beta1 = 0`` equals ``none``);
- ``adam``: ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
  ``x <- x - lr * m / (sqrt(v) + tau)`` (FedAdam; no bias correction, as in Reddi et al.,
  with ``tau`` the adaptivity floor).

Pure tensor code on state dicts; the moments are the optimizer's state and travel with the
run's checkpoint (``state_dict`` / ``load_state_dict``, tensors and plain values only).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

State = dict[str, torch.Tensor]

SERVER_OPTIMIZERS = ("none", "sgd", "adam")


def check_server_opt(kind: str) -> None:
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {kind!r}; server-opt must be one of {', '.join(SERVER_OPTIMIZERS)}")


class ServerOptimizer:
    """One optimizer step per round on ``x - aggregate``.

    Args:
        kind: ``none``, ``sgd`` or ``adam`` (see the module docstring).
        lr: the server learning rate.
        beta1: momentum (sgd) or first-moment decay (adam).
        beta2: second-moment decay (adam).
        tau: adam's adaptivity floor (added to ``sqrt(v)``).
    """

    def __init__(self, kind: str = "none", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        check_server_opt(kind)
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, float(lr), float(beta1), float(beta2), float(tau)
        self.m: State = {}
        self.v: State = {}
        self.steps = 0

    def step(self, state: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]) -> State:
        """The next global state from the current one and the round's aggregate."""
        if self.kind == "none":
            return dict(aggregate)  # the aggregate is already a new state: nothing to copy
        self.steps += 1
        out: State = {}
        for key, x in state.items():
            g = x.detach().to(torch.float32) - aggregate[key].detach().to(torch.float32)
            if self.kind == "sgd":
                m = self.m.get(key)
                m = g.clone() if m is None else self.beta1 * m + g
                self.m[key] = m
                delta = self.lr * m
            else:
                m = self.m.get(key, torch.zeros_like(g))
                v = self.v.get(key, torch.zeros_like(g))
                m = self.beta1 * m + (1 - self.beta1) * g
                v = self.beta2 * v + (1 - self.beta2) * g * g
                self.m[key], self.v[key] = m, v
                delta = self.lr * m / (v.sqrt() + self.tau)
            out[key] = (x.detach().to(torch.float32) - delta).to(x.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Moments (``m.<key>``, ``v.<key>``) and the step count: tensors and ints only."""
        out: dict[str, Any] = {"steps": self.steps}
        out.update({f"m.{k}": v.clone() for k, v in self.m.items()})
        out.update({f"v.{k}": v.clone() for k, v in self.v.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.m = {k[2:]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("m.")}
        self.v = {k[2:]: torch.as_tensor(v).clone() for k, v in state.items() if k.startswith("v.")}

    def describe(self) -> str:
        if self.kind == "none":
            return "no server optimizer"
        if self.kind == "sgd":
            return f"server SGD lr {self.lr:g}, momentum {self.beta1:g}"
        return f"server Adam lr {self.lr:g}, betas ({self.beta1:g}, {self.beta2:g}), tau {self.tau:g}"
