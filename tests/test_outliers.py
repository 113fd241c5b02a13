"""The outlier record (fedsparse.engine.outliers) against a naive loop."""

from __future__ import annotations

import random

import pytest

from fedsparse.algorithms.robust import NORM_OUTLIER_KEY
from fedsparse.config import parse_pardon
from fedsparse.engine.outliers import OutlierRecord


def naive(events, needed, num_clients):
    """Strikes and bans from (round, client, clipped) events, one at a time."""
    strikes, banned = {}, {}
    for rnd, client, clipped in events:
        if clipped:
            strikes[client] = strikes.get(client, 0) + 1
            if strikes[client] >= needed and client not in banned and len(banned) < num_clients // 2:
                banned[client] = rnd
    return strikes, banned


@pytest.mark.parametrize("needed", [1, 2, 3])
def test_strikes_and_bans_against_a_naive_loop(needed):
    rng = random.Random(needed)
    rec = OutlierRecord(needed, 12)
    events = []
    for rnd in range(1, 30):
        clients = rng.sample(range(12), 5)
        clipped = [rng.random() < 0.3 for _ in clients]
        events += [(rnd, c, k) for c, k in zip(clients, clipped)]
        rec.note(rnd, clients, [{NORM_OUTLIER_KEY: 1.0} if k else {"clip-scale": 0.0} for k in clipped])
    strikes, banned = naive(events, needed, 12)
    assert rec.strikes == strikes and rec.banned == banned
    assert 0 < len(banned) <= 6  # at most half of the clients
    assert rec.eligible(range(12)) == [c for c in range(12) if c not in banned]
    again = OutlierRecord(needed, 12, rec.to_dict())  # what metrics.json (and so the checkpoint) keeps
    assert again.strikes == rec.strikes and again.banned == rec.banned


def test_off_pardon_and_bad_pardons():
    off = OutlierRecord(0, 10)
    assert off.note(1, [1, 2], [{NORM_OUTLIER_KEY: 1.0}] * 2) == [] and not off.strikes
    rec = OutlierRecord(1, 10)
    assert rec.note(3, [1, 2, 3], [{NORM_OUTLIER_KEY: 1.0}] * 3) == [1, 2, 3]
    assert rec.pardon(parse_pardon("2,7")) == [2] and set(rec.banned) == {1, 3} and 2 not in rec.strikes
    assert rec.pardon(parse_pardon("")) == []
    assert rec.pardon(parse_pardon("all")) == [1, 3] and not rec.banned and not rec.strikes
    for bad in ("x", "1,y", "-3"):
        with pytest.raises(ValueError, match="outlier-pardon"):
            parse_pardon(bad)
