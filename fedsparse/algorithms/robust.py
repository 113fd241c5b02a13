"""The aggregation layer's defence, shared by the algorithms that train the head (IST, FedAvg,
FedOpt): before merging, every accepted update is clipped to ``clip-factor`` x the round's
median update RMS (``fedsparse.model.robust.clip_to_median``; docs/robustness.md says what it
stops and what it does not). The math is in ``fedsparse.model.robust``; this is the glue.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from fedsparse.algorithms.base import ClientTask, ClientUpdate
from fedsparse.model.robust import clip_to_median

CLIP_SCALE_KEY = "clip-scale"  # server side: the factor an accepted update was multiplied by (1 = untouched)


def clip_updates(tasks: Sequence[ClientTask], updates: Sequence[ClientUpdate], factor: float) -> list[ClientUpdate]:
    """``updates`` with their updates (reply - what their task sent) clipped to ``factor`` x the
    round's median update RMS; ``factor`` <= 0 or fewer than 3 updates: unchanged (a median of
    one or two replies is no reference). The metrics of a clipped update (the engine's own
    record of the reply) gain ``clip-scale``, so that the round's per-client records show it."""
    if factor <= 0 or len(updates) < 3:
        return list(updates)
    task_of = {t.client: t for t in tasks}
    clipped, scales = clip_to_median([task_of[u.client].arrays for u in updates], [u.arrays for u in updates], factor)
    out = []
    for u, a, s in zip(updates, clipped, scales):
        if s != 1.0:
            u.metrics[CLIP_SCALE_KEY] = s
            u = replace(u, arrays=a)
        out.append(u)
    return out
