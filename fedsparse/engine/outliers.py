"""The run's outlier record: a client whose updates are too large round after round stops being
sampled.

Clipping (``fedsparse.algorithms.robust.clip_updates``) bounds what one reply can do, but a
hostile client that is clipped every time it is sampled still moves the head by ``clip-factor``
honest updates, in its own direction, each time; over a long run that adds up (scaling x4 at
100 clients a round for 50 rounds: -2.9 points with clipping and the direction check alone,
measured with the closed form on the features alone and the clients at lr 1e-3,
``ridge-features = 0, residual-lr = 0.001``). Honest updates seldom reach the bound (11 of
4,900 in that run without attackers). So the engine counts, per client, the rounds in which its update was
clipped (a *strike*: the update's RMS was over
``clip-factor`` x the round's median, whether or not the direction check then dropped it);
at ``outlier-strikes`` strikes the client is *banned*: it is not sampled again in this run.

- Only clipping counts. The direction check drops some honest updates under label skew (411 of
  4,900 in that run), so its drops are no evidence of hostility.
- At most half of ``num-clients`` are banned: the median-based defences assume an honest
  majority, and past that the record would only starve the run.
- Undoing a ban: ``outlier-pardon`` ("all", or client ids "3,17") readmits clients, with their
  strikes cleared, when a run starts or resumes (it may change on ``--resume``).
  ``outlier-strikes = 0`` keeps no record. The record is part of ``metrics.json`` (``outliers``)
  and so of the checkpoint: a resumed run keeps its bans.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from fedsparse.algorithms.robust import NORM_OUTLIER_KEY


class OutlierRecord:
    """Strikes and bans per client (module docstring). ``strikes`` <= 0: keeps no record."""

    def __init__(self, strikes: int, num_clients: int, data: Mapping[str, Any] | None = None) -> None:
        self.needed = strikes
        self.cap = max(num_clients // 2, 0)
        data = data or {}
        self.strikes: dict[int, int] = {int(c): int(n) for c, n in data.get("strikes", {}).items()}
        self.banned: dict[int, int] = {int(c): int(r) for c, r in data.get("banned", {}).items()}

    @property
    def active(self) -> bool:
        return self.needed > 0

    def pardon(self, who: "set[int] | str") -> list[int]:
        """Readmit ``who`` ("all" or ids; "" nobody) and clear their strikes; returns the
        banned clients readmitted."""
        if who == "":
            return []
        chosen = set(self.strikes) | set(self.banned) if who == "all" else set(who)  # type: ignore[arg-type]
        freed = sorted(c for c in chosen if c in self.banned)
        for c in chosen:
            self.strikes.pop(c, None)
            self.banned.pop(c, None)
        return freed

    def eligible(self, available: Iterable[int]) -> list[int]:
        """The ``available`` clients that are not banned."""
        return [c for c in available if c not in self.banned]

    def note(self, server_round: int, clients: Sequence[int], metrics: Sequence[Mapping[str, float]]) -> list[int]:
        """Count the round's strikes (``metrics[i]`` is client ``clients[i]``'s accepted update's
        record); returns the clients banned by this round."""
        if not self.active:
            return []
        newly = []
        for client, m in zip(clients, metrics):
            if not m.get(NORM_OUTLIER_KEY):
                continue
            self.strikes[client] = self.strikes.get(client, 0) + 1
            if (self.strikes[client] >= self.needed and client not in self.banned
                    and len(self.banned) < self.cap):
                self.banned[client] = server_round
                newly.append(client)
        return newly

    def to_dict(self) -> dict[str, Any]:
        """For ``metrics.json``: client id (as a string) -> strikes, and -> the round of its ban."""
        return {"strikes": {str(c): n for c, n in sorted(self.strikes.items())},
                "banned": {str(c): r for c, r in sorted(self.banned.items())}}
