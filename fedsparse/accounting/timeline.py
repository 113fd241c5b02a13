"""The timeline of a deployed round: where its seconds go.

A client stamps (wall clock, ``time.time()``) when its ClientApp process started
(``fedsparse.processes.start_time``), when its imports were done (the train handler runs), when
its features were ready, when training was done and when its reply was built; the server stamps
when it pushed the round's messages and when each reply arrived. ``client_timeline`` turns one
reply's stamps into seconds after the push. A round's overhead
(``RoundMetrics.overhead_seconds``, set by the round engine) is its seconds minus the slowest
client's own work (extracting features plus training): what the round costs beyond the work
itself (Flower's polls, process starts, imports, serialization).

Offsets between the two sides assume one clock (loopback, or devices synchronised by NTP);
the client's own intervals (process start to reply) hold on any clock.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

from fedsparse import protocol as p

# reply metric -> name of the stamp in a per-client timeline, in the order they happen
CLIENT_STAMPS = {
    p.PROCESS_START_KEY: "process_start",
    p.IMPORTS_DONE_KEY: "imports_done",
    p.FEATURES_READY_KEY: "features_ready",
    p.TRAINED_KEY: "trained",
    p.REPLY_BUILT_KEY: "reply_built",
}
# the parts of a client's round between consecutive stamps (from the push to the reply's arrival)
PARTS = {
    "delivery": ("pushed", "process_start"),  # SuperLink -> SuperNode (poll) -> SuperExec (poll) -> process
    "imports": ("process_start", "imports_done"),  # Python, Flower, the ClientApp module
    "features": ("imports_done", "features_ready"),  # config, data listing, feature cache (or extraction)
    "training": ("features_ready", "trained"),
    "reply": ("trained", "reply_built"),  # arrays into a record
    "return": ("reply_built", "received"),  # ClientApp -> SuperNode (poll) -> SuperLink -> server's pull
}


def client_timeline(metrics: Mapping[str, float], pushed: float | None, received: float | None) -> dict[str, float]:
    """One client's stamps as seconds after the push (``pushed``; None: after its process start)."""
    stamps = {name: float(metrics[key]) for key, name in CLIENT_STAMPS.items() if key in metrics}
    if pushed is not None and stamps.get("process_start", pushed) < pushed:
        del stamps["process_start"]  # a long-lived process (a simulation's worker): not started for this message
    if received is not None:
        stamps["received"] = received
    zero = pushed if pushed is not None else stamps.get("process_start")
    if zero is None:
        return {}
    return {name: round(t - zero, 4) for name, t in stamps.items()}


def parts_of(timeline: Mapping[str, float]) -> dict[str, float]:
    """The seconds of each part (``PARTS``) that both ends of are known (the push is 0)."""
    points = {"pushed": 0.0, **timeline}
    return {part: round(points[b] - points[a], 4) for part, (a, b) in PARTS.items() if a in points and b in points}


def median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def summarize_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over the rounds of ``metrics.json``: the median round, slowest work and overhead, and the
    median of each part over every client and round; the same over the rounds after the first
    (features cached, no first-round identity queries)."""
    def over(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        parts: dict[str, list[float]] = {k: [] for k in PARTS}
        for r in rs:
            for c in r.get("per_client", []):
                for k, v in parts_of(c.get("timeline", {})).items():
                    parts[k].append(v)
        return {
            "rounds": len(rs),
            "round_seconds_median": median([r["seconds"] for r in rs]),
            "work_seconds_median": median([r["work_seconds"] for r in rs if r.get("work_seconds") is not None]),
            "overhead_seconds_median": median([r["overhead_seconds"] for r in rs
                                               if r.get("overhead_seconds") is not None]),
            "parts_median": {k: median(v) for k, v in parts.items()},
        }

    return {"all": over(rounds), "after_first": over(rounds[1:])}
