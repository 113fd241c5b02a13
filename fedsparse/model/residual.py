"""The residual head: a closed-form linear head plus an MLP that learns what it misses.

``logits = skip(x) + mlp(x)``: ``skip`` is a linear layer from the features to the classes
(``skip.weight`` [C, D], ``skip.bias`` [C]), set from the ridge head of the clients' statistics
(``fedsparse.model.closed_form``) divided by a temperature; ``mlp`` is the usual
``MLPHead`` (``layers.<i>.*``). With the MLP's last layer at zero the residual head *is* the
closed form, so training starts from its accuracy, and the MLP adds only what lowers the loss.

IST slices only the MLP (``fedsparse.model.ist``); ``skip`` goes whole to every client (C x
(D + 1) floats: 7.7 kB for 192 -> 10) and is either kept fixed (clients do not train it and do
not send it back) or trained and merged like the output layer (``merge_skip``).

**Random ReLU features** (``ridge-features = W > 0``): ``skip`` reads ``[x, relu(A z + a)]``
instead of ``x``, with ``z = (x - shift) * scale`` the standardised features and ``A`` (D x W,
entries N(0, 1/D)) and ``a`` (W, N(0, 1)) drawn from ``rf.seed``: a hidden layer fixed from a
seed, so the closed form is a kernel ridge head rather than a linear one, and still a sum over
examples. ``rf.shift``, ``rf.scale`` and ``rf.seed`` are buffers (never trained, never sent
back); ``A`` and ``a`` never travel, every process draws them from the seed. Measured centrally
on the scale config's features (192 wide, 50,000 images): ridge 0.571 on ``x``, 0.580-0.583 with
256 random features, 0.589-0.591 with 512; without the standardisation (per-sample instead)
256 gave 0.570-0.578.
Pure tensor code; no Flower.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fedsparse.model.head import MLPHead

State = dict[str, torch.Tensor]
SKIP = "skip."
SKIP_KEYS = ("skip.weight", "skip.bias")
RF = "rf."
RF_KEYS = ("rf.shift", "rf.scale", "rf.seed")


def rf_weights(in_dim: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [in_dim, width], a [width])`` of the random features drawn from ``seed`` (float32):
    ``A`` N(0, 1/in_dim), ``a`` N(0, 1), drawn in float64 on a CPU generator of their own."""
    gen = torch.Generator().manual_seed(int(seed))
    a_mat = torch.randn(int(in_dim), int(width), generator=gen, dtype=torch.float64) / float(in_dim) ** 0.5
    a_vec = torch.randn(int(width), generator=gen, dtype=torch.float64)
    return a_mat.to(torch.float32), a_vec.to(torch.float32)


class RandomReLUFeatures(nn.Module):
    """``x -> [x, relu(((x - shift) * scale) @ A + a)]`` (module docstring). The buffers are the
    state (``shift``, ``scale``, ``seed``); ``A`` and ``a`` are drawn from ``seed`` when used."""

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        if int(width) < 1:
            raise ValueError(f"random features need a width >= 1, got {width}")
        self.in_dim, self.width = int(in_dim), int(width)
        self.register_buffer("shift", torch.zeros(self.in_dim))
        self.register_buffer("scale", torch.ones(self.in_dim))
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))
        self._drawn: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        seed = int(self.seed)
        if self._drawn is None or self._drawn[0] != seed:
            self._drawn = (seed, *rf_weights(self.in_dim, self.width, seed))
        return self._drawn[1], self._drawn[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_mat, a_vec = self.weights()
        z = (x - self.shift.to(x.dtype)) * self.scale.to(x.dtype)
        return torch.cat([x, torch.relu(z @ a_mat.to(x.dtype) + a_vec.to(x.dtype))], dim=1)


def rf_state(shift: torch.Tensor, scale: torch.Tensor, seed: int) -> State:
    """The ``rf.*`` entries of a head's state."""
    return {"rf.shift": torch.as_tensor(shift).to(torch.float32).contiguous(),
            "rf.scale": torch.as_tensor(scale).to(torch.float32).contiguous(),
            "rf.seed": torch.tensor(int(seed), dtype=torch.long)}


def rf_part(state: Mapping[str, torch.Tensor]) -> State:
    """The ``rf.*`` entries of a state dict (empty without random features)."""
    return {k: v for k, v in state.items() if k.startswith(RF)}


def skip_input(state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What a state's ``skip`` reads for features ``x``: ``x``, or ``x`` and its random features
    when the state holds ``rf.*`` (their width: ``skip.weight``'s columns beyond ``x``'s)."""
    rf = rf_part(state)
    if not rf:
        return x
    width = int(torch.as_tensor(state["skip.weight"]).shape[1]) - int(x.shape[1])
    feats = RandomReLUFeatures(int(x.shape[1]), width)
    feats.load_state_dict({k[len(RF):]: torch.as_tensor(v) for k, v in rf.items()})
    return feats(x)


class ResidualHead(MLPHead):
    """``MLPHead`` plus a linear ``skip`` from the input to the logits (module docstring)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int, rf_width: int = 0) -> None:
        super().__init__(in_dim, hidden, num_classes)
        self.skip = nn.Linear(int(in_dim) + int(rf_width), int(num_classes))
        self.rf = RandomReLUFeatures(in_dim, rf_width) if rf_width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.skip(self.rf(x) if self.rf is not None else x)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "ResidualHead":
        mlp, skip = split_residual(state)
        if set(skip) != set(SKIP_KEYS):
            raise ValueError(f"a residual head's state needs {', '.join(SKIP_KEYS)}, got {', '.join(sorted(skip))}")
        base = MLPHead.from_state_dict(mlp)
        w = torch.as_tensor(skip["skip.weight"])
        rf = rf_part(state)
        if rf and set(rf) != set(RF_KEYS):
            raise ValueError(f"random features need {', '.join(RF_KEYS)}, got {', '.join(sorted(rf))}")
        rf_width = int(w.shape[1]) - base.dims[0] if w.dim() == 2 and rf else 0
        if (tuple(w.shape) != (base.dims[-1], base.dims[0] + rf_width) or rf_width < 0 or (rf and rf_width < 1)
                or tuple(skip["skip.bias"].shape) != (base.dims[-1],)):
            raise ValueError(f"skip.weight must be {base.dims[-1]}x{base.dims[0]} (classes x features"
                             f"{', plus the random features' if rf else ''}), got {tuple(w.shape)}")
        head = cls(base.dims[0], base.dims[1:-1], base.dims[-1], rf_width)
        head.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        return head


def pad_skip(skip: Mapping[str, torch.Tensor], width: int) -> State:
    """``skip`` with zero weights for ``width`` more inputs (a linear ridge head on ``[x, rf(x)]``)."""
    w = torch.as_tensor(skip["skip.weight"])
    return {"skip.weight": torch.cat([w, torch.zeros(w.shape[0], int(width), dtype=w.dtype)], dim=1),
            "skip.bias": torch.as_tensor(skip["skip.bias"]).clone()}


def is_residual(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(SKIP) for k in state)


def build_head(state: Mapping[str, torch.Tensor]) -> MLPHead:
    """The module a state dict describes: a ``ResidualHead`` when it holds ``skip.*``, else an ``MLPHead``."""
    return ResidualHead.from_state_dict(state) if is_residual(state) else MLPHead.from_state_dict(state)


def split_residual(state: Mapping[str, torch.Tensor]) -> tuple[State, State]:
    """``(mlp part, skip part)`` of a state dict (the skip part empty for a plain MLP); the
    random features' ``rf.*`` are in neither (``rf_part``)."""
    mlp = {k: v for k, v in state.items() if not k.startswith(SKIP) and not k.startswith(RF)}
    skip = {k: v for k, v in state.items() if k.startswith(SKIP)}
    return mlp, skip


def skip_from_linear(linear: Mapping[str, torch.Tensor], temperature: float = 1.0, normalize: bool = False) -> State:
    """``skip.*`` from a linear head (``layers.0.weight`` [C, D], ``layers.0.bias`` [C], e.g.
    ``ridge_head``): ``normalize`` divides each class's row (weights and bias) by the L2 norm
    of its weights (Fed3R's normalised classifier), then everything is divided by ``temperature``.
    Without ``normalize`` the argmax is the linear head's, whatever the temperature."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    w = torch.as_tensor(linear["layers.0.weight"]).to(torch.float64)
    b = torch.as_tensor(linear["layers.0.bias"]).to(torch.float64)
    if normalize:
        norm = w.norm(dim=1).clamp(min=1e-12)
        w, b = w / norm.unsqueeze(1), b / norm
    return {"skip.weight": (w / temperature).to(torch.float32).contiguous(),
            "skip.bias": (b / temperature).to(torch.float32).contiguous()}


def zero_last_layer(state: Mapping[str, torch.Tensor]) -> State:
    """``state`` with the MLP's output layer (weights and bias) at zero: the MLP adds nothing yet."""
    from fedsparse.model.head import num_layers

    out = {k: v.detach().clone() for k, v in state.items()}
    n = num_layers(state)
    for key in (f"layers.{n - 1}.weight", f"layers.{n - 1}.bias"):
        out[key] = torch.zeros_like(out[key])
    return out


def merge_skip(skip: Mapping[str, torch.Tensor], replies: Sequence[tuple[Mapping[str, torch.Tensor], float,
                                                                          torch.Tensor | None]]) -> State:
    """The merged ``skip.*`` of trained replies ``(skip state, examples, class counts or None)``.

    Row ``c`` (weights and bias) is the mean of the replies' rows weighted by their examples of
    class ``c`` when they report class counts (label-aware training: a client that holds no
    example of ``c`` did not train row ``c``), else by their examples; a row no reply weighs
    keeps its value. The rule of the output layer in ``merge_per_weight``.
    """
    w0, b0 = torch.as_tensor(skip["skip.weight"]), torch.as_tensor(skip["skip.bias"])
    num_w = torch.zeros_like(w0, dtype=torch.float64)
    num_b = torch.zeros_like(b0, dtype=torch.float64)
    den = torch.zeros(w0.shape[0], dtype=torch.float64)
    for state, examples, counts in replies:
        rw = (torch.as_tensor(counts, dtype=torch.float64) if counts is not None
              else torch.full((w0.shape[0],), float(examples), dtype=torch.float64))
        num_w += rw.unsqueeze(1) * torch.as_tensor(state["skip.weight"], dtype=torch.float64)
        num_b += rw * torch.as_tensor(state["skip.bias"], dtype=torch.float64)
        den += rw
    seen = den > 0
    d = den.clamp(min=1e-300)
    return {"skip.weight": torch.where(seen.unsqueeze(1), (num_w / d.unsqueeze(1)).to(w0.dtype), w0),
            "skip.bias": torch.where(seen, (num_b / d).to(b0.dtype), b0)}
