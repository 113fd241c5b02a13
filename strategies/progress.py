"""Progress of a run: replies counted as they arrive, and one line per round.

A Grid's ``send_and_receive`` blocks until every reply is in or the round times out.
``PollingGrid`` wraps the run's Grid and does the same with ``push_messages`` and a
``pull_messages`` poll (what Flower's own Grids do inside), calling back each time replies
arrive and giving up early when the run is being stopped. ``RoundLine`` shows "clients
done" live on a terminal, and prints the engine's lines (one per round) through Flower's
logger, which ``flwr run`` streams too.

The live part is a single terminal line rewritten in place (carriage return), only when
the stream is a TTY, and wiped before anything else is logged in the round; where the
output is a file or a pipe there is exactly one line per round.
"""

from __future__ import annotations

import sys
import threading
import time
from logging import INFO
from typing import Any, Callable, Iterable, TextIO

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

# (done, total, errors, finished): replies so far, messages sent, error replies among them;
# called once the messages are pushed, whenever replies arrive, every TICK_SECONDS
# otherwise, and once with finished=True when the wait is over (all in, or timed out)
ReplyCallback = Callable[[int, int, int, bool], None]

# The wait between pulls starts at POLL_SECONDS after a push or a reply and doubles while
# nothing arrives, up to POLL_MAX_SECONDS. In the Simulation Engine REPLY_STORED ends the wait
# as soon as a reply is stored, so the doubling costs nothing there; in deployment nothing
# signals, and a round that waits for slow devices pulls from the SuperLink about 4 times a
# second instead of 100, a reply waiting at most POLL_MAX_SECONDS to be seen. (Flower's
# InMemoryGrid polls every 0.1 s, its HttpGrid every 3 s.)
POLL_SECONDS = 0.01
POLL_MAX_SECONDS = 0.25
TICK_SECONDS = 1.0  # the callback also runs this often while nothing arrives
# Set by the Simulation Engine's LinkState when it stores a reply (strategies.flower_internals.
# patched_vce): the wait below then pulls at once instead of at its next poll.
REPLY_STORED = threading.Event()


class StoredReplies:
    """Ids of the messages whose replies the simulation's LinkState stored since the last
    ``take`` (``strategies.flower_internals.patched_vce`` adds them; ``active`` while it runs).

    Flower's ``pull_messages`` checks every message id it is asked about, under the LinkState's
    lock: asking for all the round's pending ids each time a reply arrives cost O(K) per reply,
    O(K^2) per round (1,000 clients per round: most of the server's 18 CPU seconds a round,
    docs/benchmarks/scaling.md). With this feed a pull asks only for the replies stored since
    the last one."""

    def __init__(self) -> None:
        self.active = False
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, message_id: str) -> None:
        with self._lock:
            self._ids.add(message_id)

    def take(self) -> set[str]:
        with self._lock:
            ids, self._ids = self._ids, set()
        return ids


STORED_REPLIES = StoredReplies()


class PollingGrid(Grid):
    """A Grid that forwards everything to ``grid``; ``send_and_receive`` reports replies as they come."""

    def __init__(self, grid: Grid, on_replies: ReplyCallback | None = None, poll: float = POLL_SECONDS,
                 stop: threading.Event | None = None, max_poll: float = POLL_MAX_SECONDS) -> None:
        self.grid = grid
        self.on_replies = on_replies
        self.poll = poll  # the first wait after a push or a reply
        self.max_poll = max(poll, max_poll)  # the longest, reached by doubling while nothing arrives
        self.stop = stop  # set: stop waiting (the run is being interrupted)

    # --- plain delegation -------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:  # anything a concrete Grid adds (close, ...)
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)

    # --- the one behaviour we change ----------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         on_message: Callable[[Message], None] | None = None,
                         after_push: Callable[[], None] | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all are in or ``timeout`` seconds have passed;
        ``on_message`` is called with each reply as it arrives (while the others are awaited),
        ``after_push`` once the messages are on their way (work that need not delay them)."""
        pending = set(self.grid.push_messages(messages))
        total = len(pending)
        if after_push is not None:
            after_push()
        if not total:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        errors = 0
        self._report(0, total, 0, False)
        last_report = time.monotonic()
        wait = self.poll
        full_pull_at = 0.0  # when a pull next asks for every pending reply (at least once a tick)
        try:
            while pending:
                REPLY_STORED.clear()  # before the pull: a reply stored after it wakes the wait below
                if STORED_REPLIES.active and time.monotonic() < full_pull_at:
                    ask = pending & STORED_REPLIES.take()  # the replies stored since the last pull
                else:  # everything (errors Flower makes at pull time: an expired message, a lost node)
                    ask, full_pull_at = set(pending), time.monotonic() + TICK_SECONDS
                got = list(self.grid.pull_messages(ask)) if ask else []
                if got:
                    wait = self.poll
                    replies.extend(got)
                    for reply in got if on_message is not None else ():
                        on_message(reply)
                    pending.difference_update(m.metadata.reply_to_message_id for m in got)
                    errors += sum(1 for m in got if m.has_error())
                if got or time.monotonic() - last_report >= TICK_SECONDS:  # a tick keeps "elapsed" moving
                    self._report(len(replies), total, errors, False)
                    last_report = time.monotonic()
                if not pending or (self.stop is not None and self.stop.is_set()):
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                REPLY_STORED.wait(wait if left is None else min(wait, left))
                wait = min(2 * wait, self.max_poll)
        finally:
            self._report(len(replies), total, errors, True)
        return replies

    def _report(self, done: int, total: int, errors: int, finished: bool) -> None:
        if self.on_replies is not None:
            self.on_replies(done, total, errors, finished)


class RoundLine:
    """The terminal side of progress: a live line while replies come in, one line per round."""

    def __init__(self, num_rounds: int, started: float | None = None, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.num_rounds = num_rounds
        self.started = time.perf_counter() if started is None else started
        self.stream = stream if stream is not None else sys.stderr
        if live is None:
            isatty = getattr(self.stream, "isatty", None)
            live = bool(isatty and isatty())
        self.live = live
        self._shown = False

    def replies(self, server_round: int, done: int, total: int, errors: int, finished: bool) -> None:
        """Rewrite the live line (TTY only); wipe it when the round's wait is over."""
        if not self.live:
            return
        if finished:
            self.clear()
            return
        elapsed = time.perf_counter() - self.started
        text = f"round {server_round}/{self.num_rounds} | clients {done}/{total} done"
        text += f" ({errors} failed)" if errors else ""
        self.stream.write(f"\r\x1b[2K{text} | elapsed {elapsed:.1f}s")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False

    def say(self, text: str) -> None:
        """A finished line (a round's, or the engine's), through Flower's logger."""
        self.clear()
        log(INFO, "%s", text)
