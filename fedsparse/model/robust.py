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


def flat_updates(sent: Sequence[Mapping[str, torch.Tensor]], got: Sequence[Mapping[str, torch.Tensor]],
                 counts: Sequence[torch.Tensor | None] | None = None,
                 row_keys: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The updates ``got[i] - sent[i]`` of one group (the same arrays sent to all), flattened over
    ``update_keys`` of the first into rows of ``[m, p]`` (float64), and which entries each update
    trained: on the arrays of ``row_keys`` (output rows, one per class) only the rows of the
    classes whose ``counts[i]`` are > 0 (label-aware training leaves the others alone); None when
    no update reports counts (every entry counts)."""
    if len(sent) != len(got) or not got:
        raise ValueError(f"flat_updates: {len(sent)} sent states for {len(got)} replies")
    keys = update_keys(sent[0], got[0])
    rows, masks = [], []
    aware = counts is not None and any(c is not None for c in counts)
    for i, (s, g) in enumerate(zip(sent, got)):
        parts, mparts = [], []
        for k in keys:
            t = torch.as_tensor(g[k]).to(torch.float64)
            base = torch.as_tensor(s[k]).to(torch.float64) if k in s and tuple(s[k].shape) == tuple(t.shape) \
                else torch.zeros_like(t)
            parts.append((t - base).reshape(-1))
            m = torch.ones(t.shape, dtype=torch.bool)
            c = counts[i] if aware else None
            if c is not None and k in row_keys:
                held = torch.as_tensor(c).reshape(-1) > 0
                if held.numel() != t.shape[0]:
                    raise ValueError(f"flat_updates: {held.numel()} class counts for {t.shape[0]} rows of {k!r}")
                m = held.view(-1, *([1] * (t.dim() - 1))).expand_as(t)
            mparts.append(m.reshape(-1))
        rows.append(torch.cat(parts))
        masks.append(torch.cat(mparts))
    return torch.stack(rows), (torch.stack(masks) if aware else None)


COSINE_CHUNK = 1 << 14  # columns per step of direction_cosines


def direction_cosines(deltas: torch.Tensor, mask: torch.Tensor | None = None,
                      chunk: int = COSINE_CHUNK) -> torch.Tensor:
    """The cosine of each update (row of ``deltas`` [m, p]) with the group's coordinate-wise
    median update (over the updates whose ``mask`` holds the entry; None = all), measured on
    the entries the update trained (its ``mask``). An update that points away from what most
    of its group did (a flipped sign, a pull towards zero against the group's drift) scores
    below 0 whatever its length; 0 when the update or the median is zero on its entries.

    ``chunk`` columns at a time: the median works on copies of what it reads, so the work's
    memory is a few ``[m, chunk]`` blocks besides ``deltas`` (at 1,000 clients a round in three
    groups, whole-matrix temporaries took the server's peak from 2.8 to 5.5 GB)."""
    from fedsparse.model.ist import robust_mean  # model.ist does not import this module

    x = deltas.to(torch.float64)
    m, p = x.shape
    dot, own, ref_sq = (torch.zeros(m, dtype=torch.float64) for _ in range(3))
    step = max(1, chunk)
    for start in range(0, p, step):
        block = x[:, start:start + step]
        held = None if mask is None else mask[:, start:start + step]
        ref, _ = robust_mean(block, held, "median")
        if held is not None:
            block = torch.where(held, block, torch.zeros((), dtype=torch.float64))
        dot += block @ ref
        own += (block * block).sum(1)
        ref_sq += (ref * ref).sum() if held is None else held.to(torch.float64) @ (ref * ref)
    den = own.sqrt() * ref_sq.sqrt()
    return torch.where(den > 0, dot / den, torch.zeros((), dtype=torch.float64))  # den = 0: dot = 0 too
