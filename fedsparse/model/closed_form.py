"""Closed-form heads on frozen features: ridge regression (Fed3R) and class means (FedNCM).

Both are sums over examples, so a federation computes them exactly: every client sends its
sufficient statistics once, the server adds them up and solves. Label skew cannot hurt: the
sum over clients is the sum over the union of their data, whatever the split.

- Fed3R (Fanì et al., "Accelerating heterogeneous federated learning with closed-form
  classifiers", ICML 2024): ``W = (sum_k X_k^T X_k + lambda I)^-1 sum_k X_k^T Y_k`` on features
  with a constant 1 appended (the bias; regularised like the weights), ``Y`` one-hot.
- FedNCM (Legate et al., "Guiding the last layer in federated learning with pre-trained
  models", NeurIPS 2023): the nearest class mean, as a linear layer.

On the wire, the Gram matrix goes as its upper triangle (``d (d + 1) / 2`` numbers); statistics
are computed in float64, sent as ``STATS_DTYPE`` and summed in float64. Pure tensor code; no Flower.
"""

from __future__ import annotations

from typing import Mapping

import torch

State = dict[str, torch.Tensor]

# On the wire: float32 halves the bytes of float64 and, summed in float64 on the server, gave the
# same test accuracy at every lambda from 1e-4 to 1e3 (bundled sample, 100 Dirichlet clients;
# the ridge weights differ by 1e-4 relative at lambda = 1, 1e-3 at 0.01).
STATS_DTYPE = torch.float32
GRAM, XTY, COUNTS, SUMS = "gram-triu", "xty", "class-counts", "class-sums"
NCM_METRICS = ("euclidean", "cosine")


def triu_size(d: int) -> int:
    return d * (d + 1) // 2


def pack_triu(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row, as 1-D."""
    d = matrix.shape[0]
    i, j = torch.triu_indices(d, d)
    return matrix[i, j]


def unpack_triu(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric ``d x d`` matrix whose upper triangle ``pack_triu`` gave."""
    if packed.shape != (triu_size(d),):
        raise ValueError(f"packed triangle of shape {tuple(packed.shape)} is not that of a {d}x{d} matrix")
    i, j = torch.triu_indices(d, d)
    out = torch.zeros(d, d, dtype=packed.dtype)
    out[i, j] = packed
    out[j, i] = packed
    return out


def with_bias(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: the constant input that carries a linear layer's bias."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


STATS_KINDS = {"ridge": (GRAM, XTY), "ncm": (COUNTS, SUMS)}  # what each head needs


def stats_shapes(in_dim: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a client's statistics for features of width ``in_dim``."""
    d = in_dim + 1
    return {GRAM: (triu_size(d),), XTY: (d, num_classes), COUNTS: (num_classes,), SUMS: (num_classes, in_dim)}


def stats_spec(kind: str, in_dim: int, num_classes: int, dtype: torch.dtype = STATS_DTYPE) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the statistics a ``kind`` (ridge, ncm) task replies with."""
    check_stats_kind(kind)
    shapes = stats_shapes(in_dim, num_classes)
    return {k: (shapes[k], dtype) for k in STATS_KINDS[kind]}


def check_stats_kind(kind: str) -> None:
    if kind not in STATS_KINDS:
        raise ValueError(f"unknown statistics {kind!r}; valid: {', '.join(STATS_KINDS)}")


def stats_for(kind: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, dtype: torch.dtype = STATS_DTYPE) -> State:
    """The statistics a ``kind`` task sends: ``sufficient_stats`` restricted to what the head needs."""
    check_stats_kind(kind)
    stats = sufficient_stats(x, y, num_classes, dtype)
    return {k: stats[k] for k in STATS_KINDS[kind]}


def sufficient_stats(x: torch.Tensor, y: torch.Tensor, num_classes: int, dtype: torch.dtype = STATS_DTYPE) -> State:
    """One client's statistics: packed ``X1^T X1``, ``X1^T Y`` (``X1 = [x, 1]``, ``Y`` one-hot),
    examples per class and feature sums per class."""
    x64 = x.detach().to(torch.float64)
    y = y.to(torch.long)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    x1 = with_bias(x64)
    onehot = torch.nn.functional.one_hot(y, num_classes).to(torch.float64)
    return {
        GRAM: pack_triu(x1.T @ x1).to(dtype),
        XTY: (x1.T @ onehot).to(dtype),
        COUNTS: onehot.sum(0).to(dtype),
        SUMS: (onehot.T @ x64).to(dtype),
    }


def add_stats(total: Mapping[str, torch.Tensor] | None, stats: Mapping[str, torch.Tensor]) -> State:
    """``total + stats`` in float64 (``total = None`` starts a sum)."""
    out = {k: torch.as_tensor(v).to(torch.float64).clone() for k, v in stats.items()}
    if total:
        for k in out:
            out[k] += total[k]
    return out


def ridge_weights(gram: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """``(G + lam I)^-1 B`` for a full symmetric ``G`` [d, d] and ``B`` [d, C], in float64."""
    d = gram.shape[0]
    a = gram.to(torch.float64) + float(lam) * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(a, xty.to(torch.float64))


def ridge_head(stats: Mapping[str, torch.Tensor], lam: float, in_dim: int) -> State:
    """A linear head (``layers.0.weight`` [C, in_dim], ``layers.0.bias`` [C]) from summed statistics."""
    d = in_dim + 1
    beta = ridge_weights(unpack_triu(torch.as_tensor(stats[GRAM]), d), torch.as_tensor(stats[XTY]), lam)
    return {"layers.0.weight": beta[:in_dim].T.to(torch.float32).contiguous(),
            "layers.0.bias": beta[in_dim].to(torch.float32).contiguous()}


def stats_count(stats: Mapping[str, torch.Tensor]) -> float:
    """The examples summed ridge statistics count (the constant feature's diagonal entry)."""
    return float(torch.as_tensor(stats[GRAM])[-1])


def sub_stats(stats: Mapping[str, torch.Tensor], in_dim: int, keep: int) -> State:
    """The ridge statistics of the first ``keep`` of ``in_dim`` features alone (and the
    constant), cut out of those of all ``in_dim``: a block of ``[x 1]^T [x 1]`` and rows of
    ``[x 1]^T Y``."""
    d = in_dim + 1
    rows = torch.cat([torch.arange(keep), torch.tensor([in_dim])])
    gram = unpack_triu(torch.as_tensor(stats[GRAM]), d)[rows][:, rows]
    return {GRAM: pack_triu(gram), XTY: torch.as_tensor(stats[XTY])[rows].clone()}


def standardizer(stats: Mapping[str, torch.Tensor], in_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, 1 / std)`` of each feature from summed ridge statistics: the constant feature's
    row of ``[x 1]^T [x 1]`` holds the count and the sums, its diagonal the sums of squares
    (population variance; a feature that does not vary gets scale 1)."""
    d = in_dim + 1
    gram = unpack_triu(torch.as_tensor(stats[GRAM]).to(torch.float64), d)
    n = float(gram[-1, -1])
    if not n > 0:
        raise ValueError("ridge statistics of no examples: no mean or variance to standardise with")
    mean = gram[:in_dim, -1] / n
    var = gram.diagonal()[:in_dim] / n - mean * mean
    scale = torch.where(var > 1e-12, 1.0 / var.clamp(min=1e-12).sqrt(), torch.ones_like(var))
    return mean, scale


def ncm_head(stats: Mapping[str, torch.Tensor], metric: str = "euclidean") -> State:
    """The nearest-class-mean classifier as a linear head.

    ``euclidean``: ``argmin_c |x - mu_c|^2 = argmax_c 2 mu_c . x - |mu_c|^2``;
    ``cosine``: ``argmax_c mu_c . x / |mu_c|`` (the feature's own norm does not change the argmax).
    A class no client holds gets logits of -1e9 (never predicted).
    """
    if metric not in NCM_METRICS:
        raise ValueError(f"unknown NCM metric {metric!r}; valid: {', '.join(NCM_METRICS)}")
    counts = torch.as_tensor(stats[COUNTS]).to(torch.float64)
    sums = torch.as_tensor(stats[SUMS]).to(torch.float64)
    seen = counts > 0
    means = sums / counts.clamp(min=1).unsqueeze(1)
    if metric == "euclidean":
        weight, bias = 2 * means, -(means * means).sum(1)
    else:
        weight, bias = means / means.norm(dim=1, keepdim=True).clamp(min=1e-12), torch.zeros(len(counts), dtype=torch.float64)
    weight = torch.where(seen.unsqueeze(1), weight, torch.zeros_like(weight))
    bias = torch.where(seen, bias, torch.full_like(bias, -1e9))
    return {"layers.0.weight": weight.to(torch.float32).contiguous(), "layers.0.bias": bias.to(torch.float32).contiguous()}


def check_ridge_stats(stats: Mapping[str, torch.Tensor], num_examples: int, in_dim: int) -> None:
    """Raise ``ValueError`` (one line) unless ``stats`` (``GRAM``, ``XTY``) could be the ridge
    statistics of ``num_examples`` real examples: statistics go up with nothing sent to compare
    them with, so the server checks what every honest reply satisfies. The constant feature's
    diagonal entry of ``[x 1]^T [x 1]`` is the example count, its row of ``[x 1]^T Y`` the
    examples per class (non-negative, summing to it), every diagonal entry is >= 0, and
    ``|([x 1]^T Y)_jc| <= sqrt(G_jj * n_c)`` (Cauchy-Schwarz). A plausible lie of at most
    ``num_examples`` examples still passes; a scaled, negated or inflated one does not."""
    d = in_dim + 1
    gram = unpack_triu(torch.as_tensor(stats[GRAM]).to(torch.float64), d)
    xty = torch.as_tensor(stats[XTY]).to(torch.float64)
    n = float(num_examples)
    tol = 1e-3 * max(1.0, n)
    if abs(float(gram[-1, -1]) - n) > tol:
        raise ValueError(f"ridge statistics count {float(gram[-1, -1]):g} examples, the reply claims {num_examples}")
    counts = xty[-1]
    if bool((counts < -tol).any()) or abs(float(counts.sum()) - n) > tol:
        raise ValueError("ridge statistics: the examples per class are negative or do not add up to the reply's count")
    diag = gram.diagonal()
    if bool((diag < 0).any()):
        raise ValueError("ridge statistics: a negative sum of squares")
    bound = (diag.clamp(min=0).unsqueeze(1) * counts.clamp(min=0).unsqueeze(0)).sqrt()
    if bool((xty.abs() > bound * (1 + 1e-3) + 1e-3).any()):
        raise ValueError("ridge statistics: X^T Y exceeds what the sums of squares allow")
