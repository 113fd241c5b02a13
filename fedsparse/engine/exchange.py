"""What a round's driver hands the round engine: each client's reply as it came back, each
failure, and the bytes and times of the exchange (``fedsparse.engine.rounds`` checks and uses
them; ``fedsparse.engine.adversary`` may replace hostile clients' replies first)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedsparse.algorithms.base import ClientTask, ClientUpdate


class RejectedReply(ValueError):
    """A reply the server does not use; ``code`` names the kind (counted in metrics.json)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Reply:
    """What came back from one client, decoded but not yet checked."""

    client: int
    arrays: dict[str, torch.Tensor]
    num_examples: object  # checked by check_reply: an int, at least 1
    metrics: dict[str, float] = field(default_factory=dict)
    # (task, RoundEngine.check's result) where a driver checked the reply as it arrived, while
    # the round's other clients were still training; finish_round then uses it for that task
    checked: tuple[ClientTask, "ClientUpdate | RejectedReply"] | None = field(default=None, repr=False, compare=False)


@dataclass
class Failure:
    """A client that answered with an error (``error``), a malformed reply (``invalid``)
    or not at all within the round's time (``lost``)."""

    client: int
    kind: str
    reason: str
    code: str = ""  # for invalid replies: what was wrong (RejectedReply.code)


@dataclass
class Exchange:
    """A round as the driver carried it out."""

    replies: list[Reply]
    failures: list[Failure]
    bytes_down: list[int]  # per message sent
    bytes_up: list[int]  # per reply received
    bytes_up_of: dict[int, int] = field(default_factory=dict)  # client -> bytes of its reply (per-client records)
    # wall-clock stamps where the transport has them (Flower's Grid): when the round's messages
    # were pushed, and when each client's reply arrived (fedsparse.accounting.timeline)
    pushed_at: float | None = None
    received_at: dict[int, float] = field(default_factory=dict)
