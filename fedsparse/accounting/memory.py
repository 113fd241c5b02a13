"""Memory of a whole run: this process and every descendant (Ray's GCS, raylet and workers).

``ProcessTreeMonitor`` samples, in a process of its own, the resident set size (RSS) of the
process tree, summed, and its proportional set size (PSS: shared pages divided among the
processes that map them, so the torch libraries that every worker maps count once), read
through ``fedsparse.processes``. Linux only; elsewhere it records nothing and says so.
``MemorySampler`` samples, in a thread, the summed RSS of several trees (``fedsparse devices``:
each device's SuperNode); ``PeakAnonSampler`` the peak anonymous RSS of this process.

RSS is a counter the kernel keeps (``statm``): reading it costs microseconds. PSS is not: the
kernel walks every page table of the process (``smaps_rollup``), 20-40 ms for a simulated
client or a ServerApp here, with that process's memory map locked for reading. Walking the
tree every second took 7.4% of a core in a simulated run of the paper setting, on a 2-core
machine whose cores the clients need. So every sample has the RSS, and only some the PSS: a
walk of the tree starts no sooner than ``1 / PSS_DUTY`` times the last walk's length after
it (at most 2% of the time walking; 1.3% of a core for the whole sampler in the same run).
The samples taken on entry and on exit always have both.

``python -m fedsparse.accounting.memory ROOT INTERVAL FILE PSS_DUTY`` is that sampling
process: it appends one sample of ROOT's tree (itself left out) every INTERVAL seconds to
FILE, at nice 19, until the monitor says stop, or its process dies (its standard input
closes; the file is then deleted).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedsparse import processes

PSS_DUTY = 0.02  # the sampling process walks page tables (PSS) at most this share of the time


@dataclass
class TreeSample:
    t: float
    processes: int
    rss: int
    pss: int | None  # None: a sample without a page-table walk


def tree_sample(root: int, t: float, leave_out: int | None = None, pss: bool = True) -> TreeSample:
    """The summed RSS and (if ``pss``) PSS of ``root``'s process tree (``leave_out`` left out)
    at time ``t``."""
    procs = [p for p in processes.tree(root) if p.pid != leave_out]
    sizes = [processes.rss_pss(p, pss) for p in procs]
    return TreeSample(t, len(procs), sum(r for r, _ in sizes),
                      sum(p or 0 for _, p in sizes) if pss else None)


def _sampler(root: int, interval: float, path: str, pss_duty: float = PSS_DUTY) -> None:
    """The sampling process: a sample of ``root``'s tree every ``interval`` s, one JSON line
    each, appended to ``path``, until its standard input says stop, or closes (its monitor's
    process died: ``path`` is then deleted). A sample walks page tables for the PSS when
    ``1 / pss_duty`` times the last walk's length has passed since that walk began."""
    background_priority()
    t0 = float(os.environ.get("FEDSPARSE_MEMORY_T0", time.perf_counter()))
    next_walk = 0.0  # when the next sample may walk page tables for the PSS
    with open(path, "a", buffering=1) as out:
        while True:
            ready, _, _ = select.select([sys.stdin], [], [], interval)
            if ready:  # the monitor is done ("stop"), or its process died (end of file)
                if not sys.stdin.readline().strip():
                    out.close()
                    Path(path).unlink(missing_ok=True)  # no one will read it
                return
            start = time.perf_counter()
            walk = start >= next_walk
            sample = tree_sample(root, start - t0, leave_out=os.getpid(), pss=walk)
            if walk:
                next_walk = start + (time.perf_counter() - start) / pss_duty
            out.write(json.dumps(vars(sample)) + "\n")


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
    """Sampler of the summed RSS and PSS of this process tree, every ``interval`` seconds.

    Use as a context manager: one sample on entry and one on exit, here, and in between a
    sampling process (``python -m fedsparse.accounting.memory``), whose samples ``samples``
    and the peaks hold after exit. Every sample has the summed RSS; the PSS only those where
    the sampler walked page tables (see the module: at most ``PSS_DUTY`` of the time), and
    the samples on entry and exit, so the peak PSS is the peak of fewer samples. A process,
    not a thread: a thread doing this at nice 19 holds this process's GIL while the simulated
    clients (nice 0) keep it off the cores, so the threads that run the rounds wait for it; a
    process has no GIL to hold. It leaves itself out of the tree it measures, and it ends
    when the monitor exits (which tells it to stop) or when this process dies (its standard
    input closes).
    """

    interval: float = 0.5
    pss_duty: float = PSS_DUTY
    samples: list[TreeSample] = field(default_factory=list)
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    available: bool = Path("/proc/self/statm").exists()

    def __post_init__(self) -> None:
        self._t0 = time.perf_counter()
        self._proc: subprocess.Popen | None = None
        self._file: Path | None = None

    def _add(self, s: TreeSample) -> TreeSample:
        self.samples.append(s)
        self.peak_rss, self.peak_pss = max(self.peak_rss, s.rss), max(self.peak_pss, s.pss or 0)
        self.peak_processes = max(self.peak_processes, s.processes)
        return s

    def sample(self) -> TreeSample:
        """One sample of the tree, taken here, added to ``samples``."""
        return self._add(tree_sample(os.getpid(), time.perf_counter() - self._t0))

    def __enter__(self) -> "ProcessTreeMonitor":
        if self.available:
            self.sample()
            fd, name = tempfile.mkstemp(prefix="fedsparse-memory-", suffix=".jsonl")
            os.close(fd)
            self._file = Path(name)
            # its own session: a terminal's Ctrl-C goes to the run, which then tells it to stop
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "fedsparse.accounting.memory", str(os.getpid()), repr(self.interval), name,
                     repr(self.pss_duty)],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                    env={**os.environ, "FEDSPARSE_MEMORY_T0": repr(self._t0), "PYTHONPATH": os.pathsep.join(
                        p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)})
            except OSError:  # no process to spare: the samples on entry and exit only
                self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.available:
            return
        if self._proc is not None:
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write(b"stop\n")  # the sampler's signal to stop (keeping its file)
                self._proc.stdin.close()
            except OSError:
                pass  # it has died: what it wrote is read below
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._file is not None:
            try:
                lines = self._file.read_text().splitlines()
            except OSError:
                lines = []
            self._file.unlink(missing_ok=True)
            self._file = None
            for line in lines:
                try:
                    self._add(TreeSample(**json.loads(line)))
                except (ValueError, TypeError):
                    pass  # a line cut short by a kill
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
            "pss_samples": sum(s.pss is not None for s in self.samples),
            "samples": [vars(s) for s in self.samples[::step]],
        }


class Sampled(Protocol):
    """What ``MemorySampler`` samples: a device of ``fedsparse devices`` (``fedsparse.commands.devices.Device``)."""

    proc: subprocess.Popen | None  # the root of the tree (its SuperNode); None: not started
    sampled_peak_bytes: int  # the largest summed RSS sampled
    samples: list[tuple[float, int]]  # (wall clock, summed RSS), every sample


class MemorySampler(threading.Thread):
    """Samples the summed RSS of every device's SuperNode process tree and its client worker
    (detached from the tree, it watches the SuperNode)."""

    def __init__(self, devices: list[Sampled], interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.devices, self.interval, self.done = devices, interval, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for d in self.devices:
                if d.proc is not None:
                    # its detached client worker (clients.worker) watches it from outside its tree
                    total = processes.summed_rss(processes.tree(d.proc.pid) + processes.watching(d.proc.pid))
                    d.sampled_peak_bytes = max(d.sampled_peak_bytes, total)
                    d.samples.append((time.time(), total))
            self.done.wait(self.interval)


class PeakAnonSampler:
    """Peak of this process's ``RssAnon`` while the block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedsparse-anon", daemon=True)

    def _loop(self) -> None:
        while True:
            self.peak = max(self.peak, processes.rss_anon())
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> "PeakAnonSampler":
        self.peak = processes.rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, processes.rss_anon())


if __name__ == "__main__":
    _sampler(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
