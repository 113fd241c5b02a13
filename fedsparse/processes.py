"""Processes: find a run's processes, read their memory, stop them. On ``psutil``.

Every part of fedsparse that looks at other processes goes through here: the memory samplers
(``fedsparse.accounting.memory``), ``fedsparse devices`` and its deployment
(``fedsparse.local_deployment``), the Simulation Engine's driver (``strategies.simulation``:
Ray's processes), the local Ray cluster of the tests, and the client's own peak and start.

A process is a ``psutil.Process``: its pid and its start time (to the clock tick, 10 ms), so a
process that has exited and whose pid the kernel gave to a new one is never taken for it (``psutil`` checks before
every signal; ``children`` leaves out a "child" that started before its parent).

- **Finding** (``tree``, ``carrying``, ``naming``, ``run_processes``): a process's
  descendants; every process whose environment holds a run's token (``VAR=token``: what a run
  starts inherits it, wherever it is reparented when its parent dies); every process whose
  command line names a text.
- **Memory** (``rss``, ``rss_pss``, ``peak_rss_bytes``, ``rss_anon``): RSS is a counter the
  kernel keeps (``statm``, microseconds); PSS (shared pages divided among the processes that
  map them) walks the process's page tables (``smaps_rollup``, tens of ms). The peak RSS
  (``VmHWM``) and the anonymous RSS (``RssAnon``) are ``/proc/<pid>/status`` fields that
  ``psutil`` does not give: ``status_bytes`` reads them.
- **Stopping** (``stop``): SIGTERM, a grace period, SIGKILL for the survivors; our own exited
  children are reaped, and a zombie of another parent counts as gone.
- **Exiting** (``exit_without_final_collection``): this process ends without the
  interpreter's last full garbage collection.

Linux first: elsewhere the ``/proc`` fields are None and ``peak_rss_bytes`` falls back to
``getrusage``.
"""

from __future__ import annotations

import atexit
import gc
import os
import resource
import signal
import time
from typing import Callable, Iterable

import psutil


def exit_without_final_collection() -> None:
    """At this process's exit, freeze every object (``gc.freeze``) so that the interpreter's
    final full garbage collection has nothing to walk. A process with torch, timm and Flower
    loaded tracks 400,000-600,000 objects, and that last pass cost 1.0-1.3 s of CPU at the
    end of every ``fedsparse`` command and of every ``flwr-clientapp`` process (one per
    message). The exit still runs ``atexit`` handlers (registered earlier: this one runs
    first) and flushes the standard streams; objects left in reference cycles are not
    finalized, which a process that is ending does not need. Idempotent: a second call moves
    the one registration to the front."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def process(pid: int | None = None) -> psutil.Process | None:
    """Process ``pid`` (default: this one), None if there is none."""
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def tree(root: int | psutil.Process | None = None) -> list[psutil.Process]:
    """``root`` (default: this process) and all its descendants, ``root`` first; [] if it is gone."""
    top = root if isinstance(root, psutil.Process) else process(root)
    if top is None:
        return []
    try:
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def carrying(var: str, value: str) -> list[psutil.Process]:
    """Every process whose environment holds ``var=value`` (those whose environment this user
    may not read are left out)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(var) == value:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def naming(text: str) -> list[psutil.Process]:
    """Every process whose command line contains ``text``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if text in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def watching(pid: int) -> list[psutil.Process]:
    """Live processes started with ``--watch PID:START`` for ``pid``: helpers that end with
    ``pid`` without being in its process tree (the detached client worker, ``clients.worker``)."""
    found = []
    for proc in psutil.process_iter():
        try:
            args = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "--watch" in args:
            i = args.index("--watch")
            if i + 1 < len(args) and args[i + 1].split(":")[0] == str(pid) and alive(proc):
                found.append(proc)
    return found


def parent_and_start(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in hundredths of a second) of a live ``pid``; None when it is gone
    or a zombie. The pair names a process: a recycled pid has another start."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.ppid(), int(round(proc.create_time() * 100))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def command_line(pid: int) -> list[str]:
    """The arguments ``pid`` was started with ([] when it is gone or not readable)."""
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def run_processes(roots: Iterable[int], var: str, token: str) -> list[psutil.Process]:
    """A run's live processes: the trees of ``roots`` and every process whose environment
    holds ``var=token``; this process and zombies left out."""
    found = {p for root in roots for p in tree(root)} | set(carrying(var, token))
    return sorted((p for p in found if p.pid != os.getpid() and alive(p)), key=lambda p: p.pid)


def alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` is still running (not a zombie, and its pid not taken by another)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie included)."""
    return psutil.pid_exists(pid)


def rss_pss(proc: int | psutil.Process, pss: bool = True) -> tuple[int, int | None]:
    """(RSS, PSS) of one process in bytes, 0 for each once it has exited; PSS None unless
    ``pss`` (reading it walks the process's page tables); the RSS where the PSS is hidden."""
    try:
        proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        rss = proc.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, (0 if pss else None)
    if not pss:
        return rss, None
    try:
        return rss, proc.memory_full_info().pss
    except psutil.NoSuchProcess:
        return rss, 0
    except (psutil.AccessDenied, AttributeError):  # another user's, or no smaps on this system
        return rss, rss


def rss(proc: int | psutil.Process | None = None) -> int:
    """Resident set size of ``proc`` (default: this process) in bytes; 0 once it has exited."""
    return rss_pss(os.getpid() if proc is None else proc, pss=False)[0]


def summed_rss(procs: Iterable[psutil.Process]) -> int:
    """The RSS of ``procs``, summed, each process once (those that have exited count 0)."""
    return sum(rss(p) for p in {p.pid: p for p in procs}.values())


def status_bytes(field: str, pid: int | None = None) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (e.g. ``VmHWM``, ``RssAnon``, which ``psutil``
    does not give) in bytes; None where it cannot be read."""
    try:
        with open(f"/proc/{pid or os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_anon(pid: int | None = None) -> int:
    """Anonymous resident memory of a process in bytes (``RssAnon``: heap, tensors, stacks),
    without the file-backed pages of mapped libraries, which the kernel shares and may evict."""
    return status_bytes("RssAnon", pid) or 0


def reset_peak_rss() -> bool:
    """Start this process's peak RSS (``VmHWM``) over from its current RSS (Linux: ``5`` to
    ``/proc/self/clear_refs``); returns whether it could. A client calls it when a task starts,
    so the peak it reports is that task's, not the process's since it started: a simulated
    client shares its actor process with every client the actor ran before."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of its address space.

    NOTE: not ``getrusage().ru_maxrss`` where ``/proc`` exists: Linux carries the high-water
    mark of the address space a process had before ``exec`` into ``ru_maxrss``, so a fresh
    ``python`` forked from a 3 GB parent reports 3 GB from its first line.
    """
    hwm = status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def start_time(pid: int | None = None) -> float | None:
    """When process ``pid`` (default: this one) started, wall clock (10 ms resolution), or None.

    ``psutil`` adds the start, counted in clock ticks since boot, to the boot time of
    ``/proc/stat``, which is rounded to whole seconds (it put starts up to a second early);
    here the boot is now minus ``CLOCK_BOOTTIME`` instead."""
    proc = process(pid)
    if proc is None:
        return None
    try:
        since_boot = proc.create_time() - psutil.boot_time()
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot
    except (psutil.NoSuchProcess, OSError, AttributeError):
        return None


def _gone(proc: psutil.Process) -> bool:
    """Whether ``proc`` has exited. An exited child of this process is reaped: by its
    ``psutil.Popen`` (which keeps its exit code) where it is one, else here; a zombie of
    another parent counts as gone (only its parent can reap it)."""
    if isinstance(proc, psutil.Popen):
        return proc.poll() is not None
    try:
        if not proc.is_running():
            return True
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    try:
        os.waitpid(proc.pid, os.WNOHANG)  # still a zombie: its pid cannot have been taken
    except ChildProcessError:
        pass
    return True


def _send(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)  # psutil: never to another process that took the pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


def stop(procs: Iterable[psutil.Process], grace: float = 10.0, terminate: bool = True,
         find: Callable[[], Iterable[psutil.Process]] | None = None, kill_wait: float = 5.0) -> list[psutil.Process]:
    """Stop ``procs``: SIGTERM (unless not ``terminate``: then they are only waited for), up to
    ``grace`` seconds for them to exit, SIGKILL for the survivors, up to ``kill_wait`` seconds
    more; returns those still alive (should be none), by pid.

    ``find``: called at every poll, the processes that belong to the set now (a process
    started while the others stop); new ones get the signal of the moment."""
    pending = {p for p in procs if p.pid != os.getpid()}
    sig = signal.SIGTERM if terminate else None
    if sig is not None:
        for proc in pending:
            _send(proc, sig)

    def wait(seconds: float) -> None:
        nonlocal pending
        deadline, pause = time.monotonic() + seconds, 0.01
        while True:
            for proc in find() if find is not None else ():
                if proc not in pending and proc.pid != os.getpid():
                    pending.add(proc)
                    if sig is not None:
                        _send(proc, sig)
            pending = {p for p in pending if not _gone(p)}
            if not pending or time.monotonic() >= deadline:
                return
            time.sleep(pause)
            pause = min(2 * pause, 0.2)

    wait(grace)
    if pending:
        sig = signal.SIGKILL
        for proc in pending:
            _send(proc, sig)
        wait(kill_wait)
    return sorted(pending, key=lambda p: p.pid)
