"""Defences against hostile replies that pass the reply checks: pure functions on state dicts.

An *update* is what a reply changed: ``got - sent`` over the arrays the client was sent (its
IST slice, or the full head); a reply of statistics (sent nothing) counts from zero. Replies
of one round may hold different slices (IST), so updates are compared by their RMS (norm per
square root of entries), which does not depend on a slice's width.

- ``clip_to_median``: every update whose RMS exceeds ``factor`` x the round's median RMS is
  shrunk to it (direction kept), so that no reply moves the head by more than a few honest
  ones do, whatever the number it was multiplied by (scaling, sign flipping, noise, zeros);
- ``centered_clip``: Karimireddy et al. 2021: starting from a center (e.g. the mean), move it
  by the mean of every value's offset clipped to ``tau``, a few times; a value far from the
  others pulls by at most ``tau / m``.

No extra bytes: both run on the server, on the replies as they are.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]


def update_keys(sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> list[str]:
    """The arrays an update is measured on: those sent and sent back with the same shape; all of
    ``got`` when nothing was sent (statistics)."""
    keys = [k for k in got if k in sent and tuple(sent[k].shape) == tuple(got[k].shape)]
    return keys if keys else list(got)


def _sq_norm(sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], key: str) -> float:
    """``|got - sent|^2`` of one array (float32 arithmetic, float64 sum: a threshold, not a result)."""
    g = torch.as_tensor(got[key])
    s = sent.get(key)
    d = g.float() if s is None or tuple(s.shape) != tuple(g.shape) else g.float() - torch.as_tensor(s).float()
    d = d.reshape(-1)
    return float(torch.dot(d, d))


def update_rms(sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> float:
    """The RMS of ``got - sent`` over ``update_keys`` (0 for an empty update)."""
    keys = update_keys(sent, got)
    total = sum(_sq_norm(sent, got, k) for k in keys)
    count = sum(torch.as_tensor(got[k]).numel() for k in keys)
    return math.sqrt(total / count) if count else 0.0


def clip_to_median(sent: Sequence[Mapping[str, torch.Tensor]], got: Sequence[Mapping[str, torch.Tensor]],
                   factor: float) -> tuple[list[State], list[float]]:
    """Each reply of ``got`` (sent ``sent[i]``) with its update clipped to ``factor`` x the median
    update RMS of all of them; returns the replies and the factor each update was multiplied by
    (1.0 = untouched). Arrays that are not part of the update (class counts) are kept.
    ``factor`` <= 0: nothing is clipped."""
    if len(sent) != len(got):
        raise ValueError(f"clip_to_median: {len(sent)} sent states for {len(got)} replies")
    out = [dict(g) for g in got]
    if factor <= 0 or not got:
        return out, [1.0] * len(got)
    rms = [update_rms(s, g) for s, g in zip(sent, got)]
    cap = factor * float(torch.tensor(rms, dtype=torch.float64).median())  # the lower middle for an even count
    scales = []
    for i, (s, g, r) in enumerate(zip(sent, got, rms)):
        scale = cap / r if r > cap else 1.0
        scales.append(scale)
        if scale == 1.0:
            continue
        for k in update_keys(s, g):
            t = torch.as_tensor(g[k])
            base = torch.as_tensor(s[k]).to(torch.float64) if k in s and tuple(s[k].shape) == tuple(t.shape) \
                else torch.zeros(t.shape, dtype=torch.float64)
            out[i][k] = (base + scale * (t.to(torch.float64) - base)).to(t.dtype)
    return out, scales


def centered_clip(values: torch.Tensor, center: torch.Tensor, tau: float, iters: int = 3) -> torch.Tensor:
    """Centered clipping (Karimireddy et al. 2021) of ``values`` [m, p] around ``center`` [p]:
    ``iters`` times ``v += mean_i clip(x_i - v, tau)`` with ``clip(d, tau) = d * min(1, tau / |d|)``."""
    v = center.to(torch.float64).clone()
    x = values.to(torch.float64)
    for _ in range(iters):
        d = x - v
        n = d.norm(dim=1, keepdim=True)
        v = v + (d * torch.clamp(tau / n.clamp(min=1e-300), max=1.0)).mean(0)
    return v
