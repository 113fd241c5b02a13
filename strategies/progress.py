"""Progress of a run: replies counted as they arrive, and one line per round.

Flower's ``Strategy.start`` calls ``grid.send_and_receive``, which blocks until every reply
is in or the round times out. ``PollingGrid`` wraps the run's Grid and does the same with
``push_messages`` and a ``pull_messages`` poll (what Flower's own Grids do inside), calling
back each time replies arrive. Our strategies pass it to ``Strategy.start``
(``LiveReplies``), so ``RoundLine`` can show "clients done" live on a terminal, and print
one line per round (round, clients done / sampled, failures, accuracy, bytes, elapsed)
through Flower's logger, which ``flwr run`` streams too.

The live part is a single terminal line rewritten in place (carriage return), only when
the stream is a TTY, and wiped before anything else is logged in the round; where the
output is a file or a pipe there is exactly one line per round.
"""

from __future__ import annotations

import logging
import sys
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

POLL_SECONDS = 0.1  # Flower's InMemoryGrid polls every 0.1 s, its HttpGrid every 3 s
TICK_SECONDS = 1.0  # the callback also runs this often while nothing arrives


class PollingGrid(Grid):
    """A Grid that forwards everything to ``grid``; ``send_and_receive`` reports replies as they come."""

    def __init__(self, grid: Grid, on_replies: ReplyCallback | None = None, poll: float = POLL_SECONDS) -> None:
        self.grid = grid
        self.on_replies = on_replies
        self.poll = poll

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
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all are in or ``timeout`` seconds have passed."""
        pending = set(self.grid.push_messages(messages))
        total = len(pending)
        if not total:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        errors = 0
        self._report(0, total, 0, False)
        last_report = time.monotonic()
        try:
            while pending:
                got = list(self.grid.pull_messages(pending))
                if got:
                    replies.extend(got)
                    pending.difference_update(m.metadata.reply_to_message_id for m in got)
                    errors += sum(1 for m in got if m.has_error())
                if got or time.monotonic() - last_report >= TICK_SECONDS:  # a tick keeps "elapsed" moving
                    self._report(len(replies), total, errors, False)
                    last_report = time.monotonic()
                if not pending:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                time.sleep(self.poll if left is None else min(self.poll, left))
        finally:
            self._report(len(replies), total, errors, True)
        return replies

    def _report(self, done: int, total: int, errors: int, finished: bool) -> None:
        if self.on_replies is not None:
            self.on_replies(done, total, errors, finished)


class LiveReplies:
    """Mixin for a Strategy: ``start`` runs on a ``PollingGrid``; set ``on_replies`` to watch.

    ``on_replies(round, done, total, errors, finished)`` is called from the ServerApp's
    thread each time replies arrive, and once when the round's wait is over.
    """

    on_replies: Callable[[int, int, int, int, bool], None] | None = None
    stats: Any = None

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> Any:
        return super().start(PollingGrid(grid, self._replies_arrived), *args, **kwargs)  # type: ignore[misc]

    def _replies_arrived(self, done: int, total: int, errors: int, finished: bool) -> None:
        if self.on_replies is not None and self.stats is not None:
            self.on_replies(self.stats.round, done, total, errors, finished)


def format_round(entry: dict, num_rounds: int) -> str:
    """The one line of a finished round, from its ``metrics.json`` entry."""
    failed = entry.get("failures", 0)
    detail = ""
    if failed:
        kinds = [f"{entry.get(f'failed_{k}', 0)} {k}" for k in ("error", "invalid", "lost") if entry.get(f"failed_{k}")]
        detail = f": {', '.join(kinds)}" if kinds else ""
    return (
        f"round {entry['round']}/{num_rounds} | clients {entry['clients']}/{entry['sampled']} done, "
        f"{failed} failed{detail} | accuracy {entry['accuracy']:.4f} | "
        f"{entry['bytes_down_per_client'] / 1e3:.1f} kB down, {entry['bytes_up_per_client'] / 1e3:.1f} kB up per client | "
        f"round {entry['seconds']:.1f}s, elapsed {entry['elapsed']:.1f}s"
    )


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

    def round_done(self, entry: dict) -> None:
        self.clear()
        log(INFO, "%s", format_round(entry, self.num_rounds))


# Flower's Strategy.start logs five lines per round ("[ROUND r/N]", the aggregated train
# MetricRecord, "Global evaluation", the evaluation MetricRecord, blank lines); the round
# line above says the same in one. Their format strings, as flwr 1.42 writes them:
_FLOWER_ROUND_LINES = frozenset({
    "",
    "[ROUND %s/%s]",
    "\t└──> Aggregated MetricRecord: %s",
    "Global evaluation",
    "\t└──> MetricRecord: %s",
    "Initial global evaluation results: %s",
})


class QuietFlowerRounds(logging.Filter):
    """Drops Flower's own per-round INFO lines (used while ``run_server`` runs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == INFO and isinstance(record.msg, str) and record.msg in _FLOWER_ROUND_LINES)
