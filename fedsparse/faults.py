"""Fault injection for studies and tests: which client misbehaves in which round, and how.

Pure functions, no Flower here; ``clients.mods.fault_injection_mod`` applies them.
A client fails in a round when a uniform draw seeded by ``(seed, round, partition id)``
falls under ``fault-rate``, so the same clients fail in the same rounds on every run, in
simulation and in deployment alike. Modes:

- ``raise``: the ClientApp raises; Flower turns that into an error reply;
- ``nan``: the client trains, then replies with NaN and Inf in every array (a diverged client);
- ``hang``: the client never answers in time: it sleeps ``round-timeout + HANG_MARGIN_SECONDS``
  and then raises. The sleep is bounded on purpose: in simulation a sleeping client holds
  one of the few Ray actors, and an endless sleep would stall every later round and the
  end of the run (Flower's simulation runtime waits for running clients when it stops);
- ``mix``: each failing client picks one of the three, by a second seeded draw.

The attack modes (``fedsparse.attacks.ATTACK_MODES``: a hostile client that replies inside
the bounds, or ``drop``) are not drawn here: ``draw_fault`` returns None for them and the round
engine applies them (``fedsparse.engine.adversary``) to a fixed set of hostile clients.
"""

from __future__ import annotations

import random
from typing import Mapping

import torch

from fedsparse.attacks import ATTACK_MODES

FAULT_MODES = ("raise", "nan", "hang", "mix")  # clients that fail
ALL_FAULT_MODES = FAULT_MODES + ATTACK_MODES  # what fault-mode accepts
BASIC_MODES = ("raise", "nan", "hang")
HANG_MARGIN_SECONDS = 2.0


def _rng(seed: int, server_round: int, partition_id: int) -> random.Random:
    # string seeding is stable across processes (random.Random hashes str with SHA-512)
    return random.Random(f"fault\x00{int(seed)}\x00{int(server_round)}\x00{int(partition_id)}")


def draw_fault(seed: int, server_round: int, partition_id: int, rate: float, mode: str) -> str | None:
    """The fault of client ``partition_id`` in ``server_round`` ("raise", "nan", "hang"), or None."""
    if mode not in ALL_FAULT_MODES:
        raise ValueError(f"Unknown fault-mode {mode!r}; valid choices: {', '.join(ALL_FAULT_MODES)}")
    if rate <= 0 or mode in ATTACK_MODES:
        return None
    rng = _rng(seed, server_round, partition_id)
    if rng.random() >= rate:
        return None
    return BASIC_MODES[rng.randrange(len(BASIC_MODES))] if mode == "mix" else mode


def hang_seconds(round_timeout: float) -> float:
    """How long a hanging client sleeps: past the server's deadline, but not forever."""
    return float(round_timeout) + HANG_MARGIN_SECONDS


def poison(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with NaN in the first and +Inf in the last element of every tensor."""
    out = {}
    for key, value in state.items():
        t = torch.as_tensor(value).detach().clone().float()
        flat = t.view(-1)
        if flat.numel():
            flat[0] = float("nan")
            flat[-1] = float("inf") if flat.numel() > 1 else float("nan")
        out[key] = t
    return out
