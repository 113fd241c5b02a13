"""Training algorithms by name: ``strategy = "<name>"`` in a run config picks one.

Register a new one with ``@register`` on its ``Algorithm`` subclass; the module must be
imported before ``make_algorithm`` is called (the built-ins are imported here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from fedsparse.algorithms.base import Algorithm, ClientTask, ClientUpdate, State

if TYPE_CHECKING:
    from fedsparse.config import RunConfig

ALGORITHMS: dict[str, type[Algorithm]] = {}
# name -> functions that may pick another class for a config (e.g. ``ist`` from the closed form)
SELECTORS: dict[str, list[Callable[["RunConfig"], type[Algorithm] | None]]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make ``cls`` available as ``strategy = cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ALGORITHMS[cls.name] = cls
    return cls


def register_selector(name: str) -> Callable:
    """Decorator: ``fn(cfg)`` returns the class that runs ``strategy = name`` for ``cfg``, or None
    to leave it to the registered class (a variant living in its own module)."""

    def add(fn: Callable[["RunConfig"], type[Algorithm] | None]) -> Callable:
        SELECTORS.setdefault(name, []).append(fn)
        return fn

    return add


def algorithm_names() -> tuple[str, ...]:
    return tuple(ALGORITHMS)


def make_algorithm(cfg: "RunConfig") -> Algorithm:
    """The algorithm ``cfg.strategy`` names, or a one-line ``ValueError`` listing the choices."""
    try:
        cls = ALGORITHMS[cfg.strategy]
    except KeyError:
        raise ValueError(f"Unknown strategy {cfg.strategy!r}; valid choices: {', '.join(ALGORITHMS)}") from None
    for select in SELECTORS.get(cfg.strategy, []):
        cls = select(cfg) or cls
    return cls(cfg)


from fedsparse.algorithms import closed_form, fedavg, ist, residual_ist  # noqa: E402,F401  (register the built-ins)

__all__ = ["ALGORITHMS", "Algorithm", "ClientTask", "ClientUpdate", "State", "algorithm_names", "make_algorithm",
           "register", "register_selector"]
