"""One Ctrl-C (SIGINT) or SIGTERM stops a run cleanly.

The first signal sets the engine's stop event (``fedsparse.engine.rounds.STOP``) and says so in
one line: no new round starts, a round still waiting for replies is abandoned, the finished
rounds' ``metrics.json``, ``checkpoint.pt`` and ``model.pt`` stay on disk, and the command
exits with 128 + the signal number (130 or 143). Further signals are ignored: nothing is
needed, and nothing prints a traceback.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from fedsparse.engine.rounds import STOP

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """What the handler saw: the first signal's number (None: none)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)


@contextmanager
def stop_on_signals(resume_hint: str = "") -> Iterator[Interrupt]:
    """Inside the block, SIGINT and SIGTERM request a clean stop instead of raising."""
    seen = Interrupt()

    def handler(signum: int, frame: object) -> None:
        if seen.signum is not None:
            return
        seen.signum = signum
        STOP.set()
        print(f"fedsparse: {signal.Signals(signum).name} received; stopping after the finished rounds"
              + (f" (resume with: {resume_hint})" if resume_hint else ""), file=sys.stderr, flush=True)

    STOP.clear()
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
