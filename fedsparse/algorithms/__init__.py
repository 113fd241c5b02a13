"""Training algorithms by name: ``strategy = "<name>"`` in a run config picks one.

Register a new one with ``@register`` on its ``Algorithm`` subclass; the module must be
imported before ``make_algorithm`` is called (the built-ins are imported here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsparse.algorithms.base import Algorithm, ClientTask, ClientUpdate, State

if TYPE_CHECKING:
    from fedsparse.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``strategy = cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def make_algorithm(cfg: "RunConfig") -> Algorithm:
    """The algorithm ``cfg.strategy`` names, or a one-line ``ValueError`` listing the choices."""
    try:
        cls = ALGORITHMS[cfg.strategy]
    except KeyError:
        raise ValueError(f"Unknown strategy {cfg.strategy!r}; valid choices: {', '.join(ALGORITHMS)}") from None
    return cls(cfg)


from fedsparse.algorithms import closed_form, fedavg, ist  # noqa: E402,F401  (register the built-ins)

__all__ = ["ALGORITHMS", "Algorithm", "ClientTask", "ClientUpdate", "State", "algorithm_names", "make_algorithm",
           "register"]
