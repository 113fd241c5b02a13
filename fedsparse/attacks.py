"""Hostile clients inside the bounds: the attack catalogue, as transformations of a reply.

Every attack turns what a client would honestly send (``honest``: the arrays of its reply)
into what a hostile client sends instead, given what it was sent (``sent``: the task's
arrays). A reply that passes every check of ``fedsparse.engine.rounds.check_reply`` stays
one: same arrays, dtypes and shapes, finite, and (with the default strengths) within the
``update-bound``. Pure functions on state dicts, no Flower, no engine; the engine applies
them through ``fedsparse.engine.adversary``.

An attack acts on the reply's *model arrays* (those it was sent, e.g. an IST slice) and
leaves the rest honest (class counts). A reply of statistics (a ``stats`` task: ridge or
NCM sums, sent nothing) is attacked the same way with ``sent`` taken as zeros, so a hostile
client can poison the statistics of a closed-form head too.

The catalogue (``strength`` 0 = the default in ``DEFAULT_STRENGTH``):

- ``gaussian``: the honest reply plus Gaussian noise of ``strength`` x each array's RMS;
- ``sign-flip``: the update (reply - sent) negated and multiplied by ``strength``;
- ``scale``: every array multiplied by ``strength``;
- ``zero``: all-zero arrays;
- ``free-rider``: the arrays sent, unchanged (no work done; statistics: zeros);
- ``label-flip``: data poisoning: the client trains (or computes its statistics) on labels
  ``C - 1 - y``; built by ``fedsparse.engine.adversary`` (it needs the client's data);
- ``alie``: "a little is enough" (Baruch et al. 2019): ``mean - z * std`` of the honest
  updates, coordinate by coordinate, ``z`` from the number of clients and of hostile ones
  (or ``strength`` when set);
- ``ipm``: inner-product manipulation (Xie et al. 2020): ``-strength * mean`` of the honest updates;
- ``min-max`` / ``min-sum`` (Shejwalkar and Houmansadr 2021): ``mean - gamma * std`` with the
  largest ``gamma`` whose distance to every honest update (min-max: the largest; min-sum: the
  sum of squares) stays within that of the honest updates among themselves.

The last four collude: the hostile clients of a group of clients that were sent the same
arrays (an IST subnet's group; FedAvg: the whole round) see every reply of that group,
their own honest ones included (the omniscient attacker of the literature), and all send
the same malicious reply. A group of one has nothing to collude with: ALIE and min-max then
send the honest update, IPM still negates it.

``drop`` is not an attack: the same hostile clients simply fail (the reference an attack is
measured against). Which clients are hostile: ``hostile_clients``, a fixed set of
``fault-rate`` of all ``num-clients`` clients drawn from the seed, so about that fraction of
every round's sample, the same clients in every round, in every driver and on every resume.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Mapping, Sequence

import torch

State = dict[str, torch.Tensor]

SINGLE = ("gaussian", "sign-flip", "scale", "zero", "free-rider", "label-flip")
COLLUDING = ("alie", "ipm", "min-max", "min-sum")
ATTACKS = SINGLE + COLLUDING
DROP = "drop"  # the same hostile clients, failing: the reference
ATTACK_MODES = ATTACKS + (DROP,)

DEFAULT_STRENGTH = {"gaussian": 1.0, "sign-flip": 4.0, "scale": 4.0, "ipm": 0.5, "alie": 0.0}


def hostile_clients(seed: int, num_clients: int, rate: float) -> frozenset[int]:
    """The run's hostile clients: ``round(rate * num_clients)`` of the ids ``0 .. num_clients - 1``,
    drawn from ``seed`` (the same in every round, driver and resume)."""
    n = round(float(rate) * int(num_clients)) if rate > 0 else 0
    return frozenset(random.Random(f"hostile\x00{int(seed)}").sample(range(int(num_clients)), n))


def attack_generator(seed: int, server_round: int, client: int) -> torch.Generator:
    """The generator of a hostile client's random draws in a round (Gaussian noise)."""
    rng = random.Random(f"attack\x00{int(seed)}\x00{int(server_round)}\x00{int(client)}")
    return torch.Generator().manual_seed(rng.getrandbits(63))


def strength_of(attack: str, strength: float) -> float:
    """``strength``, or the attack's default when it is 0."""
    return float(strength) if strength else DEFAULT_STRENGTH.get(attack, 0.0)


def attacked_keys(sent: Mapping[str, torch.Tensor], honest: Mapping[str, torch.Tensor]) -> list[str]:
    """The arrays an attack changes: those sent and sent back (model arrays); all of them when
    nothing was sent (statistics)."""
    keys = [k for k in honest if k in sent and tuple(sent[k].shape) == tuple(honest[k].shape)]
    return keys if keys else list(honest)


def _base(sent: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    got = sent.get(key)
    if got is None or tuple(got.shape) != tuple(like.shape):
        return torch.zeros_like(like, dtype=torch.float64)
    return got.to(torch.float64)


def _rms(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).pow(2).mean().sqrt()) if t.numel() else 0.0


def single_attack(attack: str, sent: Mapping[str, torch.Tensor], honest: Mapping[str, torch.Tensor],
                  strength: float = 0.0, gen: torch.Generator | None = None) -> State:
    """The reply of a hostile client that acts alone (``attack`` in ``SINGLE`` but label-flip)."""
    if attack not in SINGLE or attack == "label-flip":
        raise ValueError(f"single_attack: {attack!r} is not one of {', '.join(a for a in SINGLE if a != 'label-flip')}")
    s = strength_of(attack, strength)
    out: State = dict(honest)
    for key in attacked_keys(sent, honest):
        h = honest[key]
        h64, base = h.to(torch.float64), _base(sent, key, h)
        if attack == "gaussian":
            noise = torch.randn(h.shape, generator=gen, dtype=torch.float64)
            new = h64 + s * _rms(h64) * noise
        elif attack == "sign-flip":
            new = base - s * (h64 - base)
        elif attack == "scale":
            new = s * h64
        elif attack == "zero":
            new = torch.zeros_like(h64)
        else:  # free-rider: what it was sent (statistics: nothing, i.e. zeros)
            new = base
        out[key] = new.to(h.dtype)
    return out


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping (data poisoning): class ``c`` becomes ``num_classes - 1 - c``."""
    return (num_classes - 1 - y.long()).to(y.dtype)


def alie_z(n: int, f: int) -> float:
    """ALIE's ``z`` for ``n`` clients of which ``f`` hostile (Baruch et al. 2019, Alg. 3):
    ``s = floor(n / 2 + 1) - f``, ``z = Phi^-1((n - s) / n)``; 0 when that is not positive."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0.5 or p >= 1:
        return 0.0 if p <= 0.5 else 3.0
    return NormalDist().inv_cdf(p)


def _gamma(mu: torch.Tensor, direction: torch.Tensor, updates: torch.Tensor, kind: str) -> float:
    """The largest ``gamma`` (bisection, 30 steps in [0, 50]) with ``mu + gamma * direction``
    as close to the honest ``updates`` as they are to each other (min-max or min-sum)."""
    dist = torch.cdist(updates, updates)
    if kind == "min-max":
        bound = float(dist.max())
    else:
        bound = float(dist.pow(2).sum(1).max())
    if bound <= 0 or float(direction.norm()) == 0:
        return 0.0

    def ok(g: float) -> bool:
        d = (updates - (mu + g * direction)).norm(dim=1)
        return (float(d.max()) if kind == "min-max" else float(d.pow(2).sum())) <= bound

    lo, hi = 0.0, 50.0
    if ok(hi):
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def colluding_attack(attack: str, sent: Mapping[str, torch.Tensor], honest: Sequence[Mapping[str, torch.Tensor]],
                     n_hostile: int, strength: float = 0.0) -> State:
    """The one reply that every hostile client of a group sends, from the group's honest
    replies ``honest`` (all sent ``sent``; ``n_hostile`` of them hostile)."""
    if attack not in COLLUDING:
        raise ValueError(f"colluding_attack: {attack!r} is not one of {', '.join(COLLUDING)}")
    if not honest:
        raise ValueError("colluding_attack needs at least one honest reply")
    keys = attacked_keys(sent, honest[0])
    bases = [_base(sent, k, honest[0][k]) for k in keys]
    flat = torch.stack([torch.cat([(h[k].to(torch.float64) - b).reshape(-1) for k, b in zip(keys, bases)])
                        for h in honest])
    mu = flat.mean(0)
    std = flat.std(0, unbiased=False)
    s = strength_of(attack, strength)
    if attack == "alie":
        z = s if s else alie_z(len(honest), n_hostile)
        mal = mu - z * std
    elif attack == "ipm":
        mal = -s * mu
    else:
        mal = mu + _gamma(mu, -std, flat, attack) * (-std)
    out: State = dict(honest[0])
    pos = 0
    for k, b in zip(keys, bases):
        n = b.numel()
        out[k] = (b + mal[pos:pos + n].view_as(b)).to(honest[0][k].dtype)
        pos += n
    return out
