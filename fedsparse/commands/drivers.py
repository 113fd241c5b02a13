"""The drivers that run a config's rounds: one table for every command.

``simulation`` is Flower's Simulation Engine (Ray); ``in-process`` the Strategy adapter and
the ClientApp exchanging real Flower Messages in this process (no Ray); ``plain`` the same
``RoundEngine`` with PyTorch only. The same config gives the same model on each.
``fedsparse run``, ``check``, ``sweep`` and ``overhead`` take their ``--engine(s)`` from
``DRIVERS``; ``overhead`` adds its bare-PyTorch ``reference``, which is not a driver of the
engine.
"""

from __future__ import annotations

from typing import Callable

from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics

DRIVERS = ("simulation", "in-process", "plain")


def check_driver(name: str) -> str:
    if name not in DRIVERS:
        raise ValueError(f"Unknown engine {name!r}; valid choices: {', '.join(DRIVERS)}")
    return name


def run_with_engine(cfg: RunConfig, engine: str, report: Callable[[str], None] | None = None) -> RunMetrics:
    """Run ``cfg`` on one of ``DRIVERS``; returns its ``RunMetrics``. ``report``: the engine's
    progress lines (the engine's default when None; the Simulation Engine's run in their own
    processes and keep theirs)."""
    check_driver(engine)
    if engine == "simulation":
        from strategies.simulation import simulate

        return simulate(cfg)
    from fedsparse.engine.rounds import RoundEngine

    round_engine = RoundEngine(cfg, report=report)
    if engine == "in-process":
        from strategies.in_process import in_process_run

        return in_process_run(cfg, round_engine)
    from fedsparse.engine.plain import PlainTransport

    return round_engine.run(PlainTransport(cfg))
