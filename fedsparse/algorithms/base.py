"""The algorithm protocol: plan a round, aggregate its replies. No Flower here.

A training algorithm decides two things each round, and nothing else:

- ``plan``: which arrays and which per-round settings each of the round's clients gets
  (one ``ClientTask`` per client; IST sends slices, FedAvg the full head);
- ``aggregate``: how the accepted replies (``ClientUpdate``) become the next global head.

Sampling, messages, reply checks, byte accounting, evaluation, checkpoints and progress
belong to the round engine (``fedsparse.engine``) and its drivers, the same for every
algorithm. An algorithm that keeps state across rounds (a server optimizer's moments, a
rolling window) returns it from ``state_dict`` so that a resumed run continues exactly.

Adding an algorithm = one module with a subclass of ``Algorithm`` decorated with
``@register`` (see ``fedsparse.algorithms``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from fedsparse.config import RunConfig

State = dict[str, torch.Tensor]

# What a client does with a task (``ClientTask.config[CLIENT_TASK]``); see fedsparse.engine.client.
TRAIN = "train"  # train the received (sub-)head on its features, send it back
STATS = "stats"  # send sufficient statistics of its features (closed-form heads: fed3r, fedncm)

# Per-round settings an algorithm may add to ``ClientTask.config`` (ints, floats, strings).
LABEL_AWARE_KEY = "label-aware"  # 1: train only the output rows of the classes held, reply class counts
NUM_CLASSES_KEY = "num-classes"  # the head's output width (a client's shapes for class counts, statistics)
STATS_KEY = "stats"  # which statistics a STATS task sends: "ridge", "ncm"
CLASS_COUNTS = "class-counts"  # reply array of label-aware training: examples per class, float32 [C]
WITH_STATS_KEY = "with-stats"  # a TRAIN task that also replies these statistics ("ridge"), as stats.<name>
STATS_PREFIX = "stats."  # a training reply's statistics: stats.gram-triu, stats.xty
FROZEN_KEY = "frozen"  # a TRAIN task: arrays whose names start with this are not trained nor sent back

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class ClientTask:
    """What one client receives in a round.

    Attributes:
        client: the client's id (its partition id in simulation).
        arrays: the tensors it receives (an IST slice, the full head, ...).
        config: per-round settings it trains with; the engine adds ``server-round``,
            ``local-steps``, ``lr`` and ``batch-size``, the algorithm anything else
            (``subnet``, ``num-subnets``, ...). Values are int, float or str.
        group: clients with the same group receive the same arrays (one copy is built).
        meta: what the algorithm keeps for ``aggregate`` (e.g. the slice's indices);
            server-side only, never sent.
        reply: the arrays the client must send back (name -> (shape, dtype)) when they
            differ from ``arrays`` (statistics, class counts); None = exactly ``arrays``.
            The engine rejects any other reply (``reply_spec``).
        check: server-side only: ``check(arrays, num_examples)`` raises ``ValueError`` (one
            line) for a reply that passed the generic checks but cannot be honest (statistics
            that no data gives); the engine then rejects it as ``implausible``.
    """

    client: int
    arrays: State
    config: dict[str, Any] = field(default_factory=dict)
    group: int | None = None
    meta: Any = None
    reply: Spec | None = None
    check: Callable[[Mapping[str, torch.Tensor], int], None] | None = None

    def reply_spec(self) -> Spec:
        """Name -> (shape, dtype) of every array the reply must hold, and nothing else."""
        if self.reply is not None:
            return dict(self.reply)
        return {k: (tuple(v.shape), v.dtype) for k, v in self.arrays.items()}


@dataclass
class ClientUpdate:
    """An accepted reply: the client's arrays (checked against what it was sent),
    its example count and its metrics."""

    client: int
    arrays: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm(ABC):
    """A federated training algorithm on the head's state dict.

    Subclasses set ``name`` and implement ``plan`` and ``aggregate``. They receive the
    run's ``RunConfig`` and derive all randomness from ``cfg.seed`` and the round, so that
    a round's plan is a pure function of (config, round, state, clients).
    """

    name: ClassVar[str] = ""
    client_task: ClassVar[str] = TRAIN
    # True: ``plan`` takes ``capacities=`` (one relative capacity per client, from device
    # profiles; fedsparse.profiles) and sizes what it sends to them (IST). The engine passes
    # them only to such algorithms and only when some client of the round has a profile.
    supports_capacities: ClassVar[bool] = False

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg

    def client_lr(self) -> float:
        """The clients' learning rate before ``lr-schedule`` (``lr``, unless the algorithm has its own)."""
        return self.cfg.lr

    @abstractmethod
    def plan(self, server_round: int, state: Mapping[str, torch.Tensor], clients: Sequence[int]) -> list[ClientTask]:
        """One task per client of ``clients`` (in that order)."""

    @abstractmethod
    def aggregate(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor],
        tasks: Sequence[ClientTask],
        updates: Sequence[ClientUpdate],
    ) -> State:
        """The next global state from the round's accepted updates (in task order).

        ``updates`` may be fewer than ``tasks`` (failed clients) or empty; an algorithm
        then keeps what no update covers.
        """

    def state_dict(self) -> dict[str, Any]:
        """Server-side state that the next rounds depend on (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def describe(self) -> str:
        """One line for the run's log."""
        return self.name
