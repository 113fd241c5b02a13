"""Where the clients ran: the Ray node and process of each client task, and the run's node table.

A client that runs inside a Ray worker (the Simulation Engine, on one machine or a cluster)
adds to its reply's metrics its node (``ray-node``: the first 13 hex digits of the Ray node id,
as an integer, exact in a float too) and its process (``worker-pid``); elsewhere it adds
nothing, and imports no Ray (``worker_identity``). The server sums them per node
(``NodeTable``) into ``RunMetrics.ray_nodes``: one row per node with its client tasks, its
client processes and their peak RSS. ``fedsparse run`` adds each node's address and CPUs.

A client on a cluster node reads its data and writes its feature cache on that node; when
either fails, ``naming_the_node`` turns the error into one line naming the node
(``NodeDataError``), which the server counts as that client's failure.
"""

from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

from fedsparse.errors import one_line
from fedsparse.protocol import PEAK_RSS_KEY, RAY_NODE_KEY, WORKER_PID_KEY

NODE_KEY_DIGITS = 13  # 52 bits of the node id: an integer a float holds exactly


def node_key(node_id: str) -> int:
    """The number a client reports for Ray node ``node_id`` (hex)."""
    return int(node_id[:NODE_KEY_DIGITS], 16)


def _ray_worker() -> Any:
    """Ray, when this process is connected to it (a Ray worker, or a driver); else None. Never
    imports Ray: a client on a device has none."""
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return None
    return ray


def worker_identity() -> dict[str, int]:
    """``{ray-node, worker-pid}`` in a process connected to Ray, else ``{}``."""
    ray = _ray_worker()
    if ray is None:
        return {}
    return {RAY_NODE_KEY: node_key(ray.get_runtime_context().get_node_id()), WORKER_PID_KEY: os.getpid()}


def node_name() -> str:
    """This machine, and its Ray node where there is one: ``host (Ray node 10.0.0.2, 1f2e3d4c)``."""
    host = socket.gethostname()
    ray = _ray_worker()
    if ray is None:
        return host
    try:
        address = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - the name is for an error message; the host is enough
        address = "?"
    return f"{host} (Ray node {address}, {ray.get_runtime_context().get_node_id()[:8]})"


class NodeDataError(RuntimeError):
    """A client's data or feature cache could not be used on the node it ran on."""


@contextmanager
def naming_the_node() -> Iterator[None]:
    """Inside a Ray worker, a missing data set or an unwritable cache (``OSError``, or the
    ``ValueError`` the data loaders raise for a bad folder) becomes a one-line
    ``NodeDataError`` naming the node; elsewhere errors pass unchanged."""
    try:
        yield
    except (OSError, ValueError) as err:
        if _ray_worker() is None:
            raise
        raise NodeDataError(f"on node {node_name()}: {one_line(err)}") from None


class NodeTable:
    """Client tasks, processes and peak RSS per Ray node, summed over the run's replies."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self._rows: dict[int, dict[str, Any]] = {}
        self._peaks: dict[tuple[int, int], float] = {}  # (node, pid) -> its largest reported peak
        for row in rows:  # a resumed run's table: its counts go on; its processes are gone
            self._rows[int(row["node"], 16)] = dict(row)

    def add(self, replies: Iterable[Mapping[str, float]]) -> int | None:
        """Count the replies' metrics; returns how many nodes they came from (None: no reply
        said, as outside Ray)."""
        seen = set()
        for metrics in replies:
            if RAY_NODE_KEY not in metrics:
                continue
            key = int(metrics[RAY_NODE_KEY])
            seen.add(key)
            row = self._rows.setdefault(key, {"node": f"{key:0{NODE_KEY_DIGITS}x}", "address": None, "tasks": 0,
                                              "workers": 0, "peak_rss_bytes_sum": 0, "peak_rss_bytes_max": 0})
            row["tasks"] += 1
            pid = int(metrics.get(WORKER_PID_KEY, -1))
            peak = float(metrics.get(PEAK_RSS_KEY, 0.0))
            before = self._peaks.get((key, pid))
            if before is None:
                row["workers"] += 1
            if before is None or peak > before:
                self._peaks[(key, pid)] = peak
                row["peak_rss_bytes_sum"] += int(peak - (before or 0.0))
                row["peak_rss_bytes_max"] = max(row["peak_rss_bytes_max"], int(peak))
        return len(seen) if seen else None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per node, in the order first seen: ``node`` (the id's first hex digits),
        ``address`` (filled by the driver), ``tasks``, ``workers`` (client processes),
        ``peak_rss_bytes_sum`` (their peaks, summed) and ``peak_rss_bytes_max``."""
        return [dict(row) for row in self._rows.values()]


def with_addresses(rows: Iterable[Mapping[str, Any]], nodes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (``NodeTable.rows()``) with each node's ``address``, full ``node_id`` and
    ``cpus`` from ``nodes`` (Ray node id -> {address, cpus})."""
    out = []
    for row in rows:
        row = dict(row)
        for node_id, info in nodes.items():
            if node_id.startswith(row["node"]):
                row.update(address=info.get("address"), node_id=node_id, cpus=info.get("cpus"))
        out.append(row)
    return out
