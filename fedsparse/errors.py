"""How an error reaches a person: one line.

``USER_ERRORS`` are the exceptions that bad input raises (a wrong value, path or file); the
command line and the ServerApp turn them into ``fedsparse: error: <one line>``. The engine
logs a failed client's reason the same way, cut to a length a log line can carry.
"""

from __future__ import annotations

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def one_line(what: object, limit: int | None = None) -> str:
    """An error or a (possibly multi-line) reason as one line: runs of whitespace become one
    space; an exception without a message gives its type's name; longer than ``limit``
    characters (when given), it is cut and ends in ``...``."""
    flat = " ".join(str(what).split())
    if not flat and isinstance(what, BaseException):
        flat = type(what).__name__
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return flat
