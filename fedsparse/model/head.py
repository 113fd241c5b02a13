"""The MLP classifier trained on cached CLS features, and its plain training loop.

Layer ``i`` of the head is ``layers.{i}`` (``nn.Linear``); ReLU sits between layers,
none after the last. The same module class serves the full head and every IST
sub-network: a sub-network is just an MLP with narrower hidden layers.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn


def parse_hidden(hidden: str | Sequence[int]) -> tuple[int, ...]:
    """``"1024,1024"`` -> ``(1024, 1024)``; rejects empty or non-positive sizes."""
    if isinstance(hidden, str):
        parts = [p.strip() for p in hidden.split(",") if p.strip()]
        try:
            sizes = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"hidden must be comma-separated integers like '1024,1024', got {hidden!r}") from None
    else:
        sizes = tuple(int(h) for h in hidden)
    if not sizes or any(h < 1 for h in sizes):
        raise ValueError(f"hidden must list at least one positive layer width, got {hidden!r}")
    return sizes


class MLPHead(nn.Module):
    """``in_dim -> hidden[0] -> ... -> hidden[-1] -> num_classes`` with ReLU.

    Args:
        in_dim: feature width (the encoder's CLS dimension).
        hidden: hidden layer widths, e.g. ``(1024, 1024)`` as in the paper.
        num_classes: output logits.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        dims = [int(in_dim), *[int(h) for h in hidden], int(num_classes)]
        self.dims = tuple(dims)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_dim] -> logits [B, num_classes]."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "MLPHead":
        """Build a head whose shape is read off ``state`` (e.g. a received IST slice)."""
        n_layers = num_layers(state)
        if n_layers < 1:
            raise ValueError("state dict holds no 'layers.<i>.weight' entries")
        try:
            weights = [state[f"layers.{i}.weight"] for i in range(n_layers)]
            for i in range(n_layers):
                state[f"layers.{i}.bias"]
        except KeyError as err:
            raise ValueError(f"state dict is missing {err.args[0]!r}") from None
        for i, w in enumerate(weights):
            if w.dim() != 2:
                raise ValueError(f"layers.{i}.weight must be 2-D, got shape {tuple(w.shape)}")
            if i and w.shape[1] != weights[i - 1].shape[0]:
                raise ValueError(
                    f"layers.{i}.weight has {w.shape[1]} inputs but layers.{i - 1} has {weights[i - 1].shape[0]} outputs"
                )
        head = cls(weights[0].shape[1], [w.shape[0] for w in weights[:-1]], weights[-1].shape[0])
        head.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        return head


def num_layers(state: Mapping[str, torch.Tensor]) -> int:
    """Number of linear layers in an MLP state dict (its ``layers.<i>.weight`` entries)."""
    return len([k for k in state if k.startswith("layers.") and k.endswith(".weight")])


def state_dims(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Layer widths ``(in, hidden..., out)`` of the MLP whose state dict is ``state``."""
    return (state["layers.0.weight"].shape[1], *(state[f"layers.{i}.weight"].shape[0] for i in range(num_layers(state))))


def count_params(dims: Sequence[int]) -> int:
    """Parameters of an MLP with layer widths ``dims`` (weights + biases)."""
    return sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))


def batch_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for ``steps`` mini-batch steps over ``n`` examples.

    Walks seeded permutations of ``range(n)`` epoch after epoch; a batch never spans
    two epochs (the last partial batch of an epoch is kept, like ``drop_last=False``).
    """
    if n < 1:
        raise ValueError("cannot train on an empty data set")
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batches.append(perm[start : start + batch_size])
            if len(batches) == steps:
                break
    return batches


class FusedAdam:
    """Adam with the fused kernel ``torch.optim.Adam(fused=True)`` runs (``torch._fused_adam_``),
    same defaults, same state, bitwise the same steps, without ``torch.optim.Optimizer``: the
    first optimizer a process creates imports ``torch._dynamo`` (and sympy), 160 MiB of RSS
    and seconds of CPU, which a deployed ClientApp (a fresh process per message) would pay
    every round. Parameters on another device or dtype than CPU float32 fall back to
    ``torch.optim.Adam``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [q for q in params if q.requires_grad]
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # index -> avg, avg sq, step
        self._fallback = None
        if any(q.device.type != "cpu" or q.dtype != torch.float32 for q in self.params):
            self._fallback = torch.optim.Adam(self.params, lr=lr, betas=betas, eps=eps)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.params:
            q.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self._fallback is not None:
            self._fallback.step()
            return
        live = [i for i, q in enumerate(self.params) if q.grad is not None]  # as torch's: no grad, no step
        if not live:
            return
        for i in live:
            if i not in self.state:
                q = self.params[i]
                self.state[i] = (torch.zeros_like(q, memory_format=torch.preserve_format),
                                 torch.zeros_like(q, memory_format=torch.preserve_format),
                                 torch.zeros((), dtype=torch.float32))
        steps = [self.state[i][2] for i in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_([self.params[i] for i in live], [self.params[i].grad for i in live],
                           [self.state[i][0] for i in live], [self.state[i][1] for i in live], [], steps,
                           amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0,
                           eps=self.eps, maximize=False, grad_scale=None, found_inf=None)


def train_steps(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    batches: Sequence[torch.Tensor],
    lr: float = 1e-3,
    optimizer: "torch.optim.Optimizer | FusedAdam | None" = None,
    classes: torch.Tensor | None = None,
) -> float:
    """Adam over the given index batches; returns the mean training loss.

    features: [N, D] float; labels: [N] long. A fresh Adam (as a stateless client uses
    each round) unless ``optimizer`` carries state over from earlier calls. ``classes``
    (label-aware training, as HeteroFL under label skew): the softmax runs over these
    classes only (every label must be one of them), so the output rows of the other classes
    get no gradient and, with a fresh Adam, come back unchanged.
    """
    # fused: one kernel per step for all parameters instead of a loop over tensors (measured in the overhead benchmark);
    # FusedAdam: that kernel without torch.optim's import of torch._dynamo
    opt = optimizer if optimizer is not None else FusedAdam(model.parameters(), lr=lr)
    model.train()
    remap = None
    if classes is not None:
        classes = torch.as_tensor(classes, dtype=torch.long)
        remap = torch.full((int(classes.max()) + 1 if len(classes) else 1,), -1, dtype=torch.long)
        remap[classes] = torch.arange(len(classes))
        if labels.numel() and (int(labels.max()) >= len(remap) or bool((remap[labels] < 0).any())):
            raise ValueError("label-aware training: a label is not among the given classes")
    total = 0.0
    for idx in batches:
        if classes is None:
            loss = nn.functional.cross_entropy(model(features[idx]), labels[idx])
        else:
            loss = nn.functional.cross_entropy(model(features[idx])[:, classes], remap[labels[idx]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(1, len(batches))


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``features``."""
    model.eval()
    if len(labels) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch_size):
        logits = model(features[start : start + batch_size])
        y = labels[start : start + batch_size]
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return correct / len(labels), loss / len(labels)
