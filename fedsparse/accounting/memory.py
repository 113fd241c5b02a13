"""Memory of a whole run: this process and every descendant (Ray's GCS, raylet and workers).

``ProcessTreeMonitor`` samples, in a background thread, the resident set size (RSS) of the
process tree, summed, and its proportional set size (PSS: shared pages divided among the
processes that map them, so the torch libraries that every worker maps count once). Linux
``/proc`` only; elsewhere it records nothing and says so.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(root: int | None = None) -> list[int]:
    """``root`` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    kids, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_pss(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) once it has exited."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0
    pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    except OSError:
        pss = rss
    return rss, pss


@dataclass
class TreeSample:
    t: float
    processes: int
    rss: int
    pss: int


def background_priority() -> None:
    """Give the calling thread alone the lowest CPU priority (nice 19; on Linux a thread id is a
    ``PRIO_PROCESS`` target), where the OS allows it: book-keeping threads (the memory sampler,
    the background writer of a round's files) then take the cores only when the simulated
    clients training on them leave them idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


@dataclass
class ProcessTreeMonitor:
    """Background sampler of the summed RSS and PSS of this process tree.

    Use as a context manager; ``peak_rss`` / ``peak_pss`` and ``samples`` are filled while it runs.
    """

    interval: float = 0.5
    samples: list[TreeSample] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    available: bool = Path("/proc/self/statm").exists()

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedsparse-memory", daemon=True)
        self._t0 = time.perf_counter()

    def sample(self) -> TreeSample:
        pids = process_tree()
        sizes = [rss_pss(p) for p in pids]
        s = TreeSample(time.perf_counter() - self._t0, len(pids), sum(r for r, _ in sizes), sum(p for _, p in sizes))
        self.samples.append(s)
        self.peak_rss, self.peak_pss = max(self.peak_rss, s.rss), max(self.peak_pss, s.pss)
        self.peak_processes = max(self.peak_processes, s.processes)
        return s

    def _loop(self) -> None:
        background_priority()  # reading every process's smaps_rollup costs ~60 ms a second
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "ProcessTreeMonitor":
        if self.available:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.sample()

    def summary(self, max_samples: int = 200) -> dict:
        """JSON-able: peaks and a thinned time series (at most ``max_samples`` points)."""
        step = max(1, len(self.samples) // max_samples)
        return {
            "available": self.available,
            "peak_summed_rss_bytes": self.peak_rss,
            "peak_summed_pss_bytes": self.peak_pss,
            "peak_processes": self.peak_processes,
            "interval_seconds": self.interval,
            "samples": [vars(s) for s in self.samples[::step]],
        }


def proc_status_bytes(field: str, pid: int | None = None) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``VmHWM``, ``RssAnon``) in bytes; None
    where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid or os.getpid()}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_anon(pid: int | None = None) -> int:
    """Anonymous resident memory of a process in bytes (``RssAnon``: heap, tensors, stacks),
    without the file-backed pages of mapped libraries, which the kernel shares and may evict."""
    return proc_status_bytes("RssAnon", pid) or 0


class PeakAnonSampler:
    """Peak of this process's ``RssAnon`` while the block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedsparse-anon", daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, rss_anon())
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> "PeakAnonSampler":
        self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())
