"""The aggregation layer's defences, shared by the algorithms that train the head (IST, FedAvg,
FedOpt; the ridge head of IST from the closed form), applied in this order before merging:

- ``clip_updates``: every accepted update is clipped to ``clip-factor`` x the round's median
  update RMS (``fedsparse.model.robust.clip_to_median``): no reply moves the head by more
  than a few honest ones;
- ``check_directions``: within each group of clients that were sent the same arrays (an IST
  subnet's group, FedAvg's round, the shared ridge head), an update whose cosine with the
  group's coordinate-wise median update is below ``min-cosine`` is dropped
  (``fedsparse.model.robust.direction_cosines``): what clipping keeps, the direction, is what
  a sign-flipped or zeroed reply gets wrong.

docs/robustness.md says what each stops and what it does not. The math is in
``fedsparse.model.robust``; this is the glue.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from fedsparse.algorithms.base import CLASS_COUNTS, ClientTask, ClientUpdate
from fedsparse.model.robust import clip_to_median, direction_cosines, flat_updates

CLIP_SCALE_KEY = "clip-scale"  # server side: the factor an accepted update was multiplied by (1 = untouched, 0 = dropped)
COSINE_KEY = "direction-cos"  # server side: the update's cosine with its group's median update
NORM_OUTLIER_KEY = "norm-outlier"  # server side: 1.0 on an update that was clipped (fedsparse.engine.outliers counts them)
MIN_GROUP = 3  # fewer updates in a group: no median to speak of, nothing is clipped or dropped


def clip_updates(tasks: Sequence[ClientTask], updates: Sequence[ClientUpdate], factor: float) -> list[ClientUpdate]:
    """``updates`` with their updates (reply - what their task sent) clipped to ``factor`` x the
    round's median update RMS; ``factor`` <= 0 or fewer than 3 updates: unchanged (a median of
    one or two replies is no reference). The metrics of a clipped update (the engine's own
    record of the reply) gain ``clip-scale``, so that the round's per-client records show it,
    and ``norm-outlier``, which the run's outlier record counts (the direction check may later
    set ``clip-scale`` to 0; ``norm-outlier`` stays)."""
    if factor <= 0 or len(updates) < MIN_GROUP:
        return list(updates)
    task_of = {t.client: t for t in tasks}
    clipped, scales = clip_to_median([task_of[u.client].arrays for u in updates], [u.arrays for u in updates], factor)
    out = []
    for u, a, s in zip(updates, clipped, scales):
        if s != 1.0:
            u.metrics[CLIP_SCALE_KEY] = s
            u.metrics[NORM_OUTLIER_KEY] = 1.0
            u = replace(u, arrays=a)
        out.append(u)
    return out


def check_directions(tasks: Sequence[ClientTask], updates: Sequence[ClientUpdate], min_cos: float,
                     row_keys: Sequence[str] = ()) -> list[ClientUpdate]:
    """``updates`` without those whose cosine with their group's coordinate-wise median update
    is below ``min_cos`` (groups: ``task.group``; a group of fewer than ``MIN_GROUP`` or a task
    without a group is kept whole). On the arrays of ``row_keys`` (one row per class) an update
    that reports class counts (``CLASS_COUNTS``) is measured on the rows of its classes only.
    Every checked update's metrics gain ``direction-cos``; a dropped one's ``clip-scale`` is 0.
    ``min_cos`` <= -1: nothing is dropped (and nothing measured)."""
    if min_cos <= -1.0 or len(updates) < MIN_GROUP:
        return list(updates)
    task_of = {t.client: t for t in tasks}
    groups: dict[object, list[int]] = {}
    for i, u in enumerate(updates):
        g = task_of[u.client].group
        groups.setdefault(("own", i) if g is None else g, []).append(i)
    drop: set[int] = set()
    for members in groups.values():
        if len(members) < MIN_GROUP:
            continue
        ups = [updates[i] for i in members]
        deltas, mask = flat_updates([task_of[u.client].arrays for u in ups], [u.arrays for u in ups],
                                    [u.arrays.get(CLASS_COUNTS) for u in ups], row_keys)
        for i, u, c in zip(members, ups, direction_cosines(deltas, mask).tolist()):
            u.metrics[COSINE_KEY] = c
            if c < min_cos:
                u.metrics[CLIP_SCALE_KEY] = 0.0
                drop.add(i)
    return [u for i, u in enumerate(updates) if i not in drop]
