"""Processes: find a run's processes (a process tree; every process whose environment carries
a run's token), and stop them (SIGTERM, a grace period, SIGKILL). Linux ``/proc``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _proc_table() -> dict[int, tuple[int, str]]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), fields[0])
    return table


def _has_token(pid: int, token: str, token_var: str) -> bool:
    try:
        return f"{token_var}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def tree(root: int, table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    table = _proc_table() if table is None else table
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root] if root in table else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def live_pids(roots: list[int], token: str, token_var: str) -> set[int]:
    """Live (not zombie) processes that descend from ``roots`` or carry ``token`` in ``token_var``."""
    table = _proc_table()
    found = {p for r in roots for p in tree(r, table)} | {p for p in table if _has_token(p, token, token_var)}
    found.discard(os.getpid())
    return {p for p in found if table.get(p, (0, "Z"))[1] != "Z"}


def stop_processes(procs: list[subprocess.Popen], token: str, token_var: str,
                   grace: float = 10.0, reap: float = 2.0) -> list[int]:
    """SIGTERM every group led by ``procs`` and every process carrying ``token``, SIGKILL what
    is left after ``grace`` seconds; returns the pids still alive afterwards (should be none).
    ``fedsparse devices`` and the deployment tests stop their processes with it."""
    roots = [p.pid for p in procs]

    def signal_all(sig: int) -> None:
        for proc in procs:
            if proc.poll() is None:  # leader alive: the group is certainly ours
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in live_pids(roots, token, token_var):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def wait_gone(timeout: float) -> set[int]:
        deadline = time.monotonic() + timeout
        while True:
            for proc in procs:
                proc.poll()  # reap our direct children
            alive = live_pids(roots, token, token_var)
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    signal_all(signal.SIGTERM)
    if wait_gone(grace):
        signal_all(signal.SIGKILL)
    left = wait_gone(5.0)
    for proc in procs:
        try:
            proc.wait(timeout=reap)
        except subprocess.TimeoutExpired:
            pass
    return sorted(left)
