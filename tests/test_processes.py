"""fedsparse.processes against real processes: trees, tokens, memory, start times, stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch

from fedsparse import processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
HOLD_200MB = ("import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); "
              "time.sleep(60)")
IGNORES_SIGTERM = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); "
                   "time.sleep(60)")
TOKEN_VAR = "FEDSPARSE_PROCESSES_TEST_TOKEN"


@pytest.fixture
def cleanup():
    """Processes a test started: whatever is left of them is killed at the end."""
    started: list[psutil.Process] = []
    yield started
    for proc in started:
        if processes.alive(proc):
            proc.kill()
    psutil.wait_procs(started, timeout=5)


def test_a_tree_is_its_root_first_and_every_descendant(cleanup):
    child = psutil.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          f"p = subprocess.Popen({SLEEP!r}); print(p.pid, flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True)
    cleanup.append(child)
    grandchild = int(child.stdout.readline())
    cleanup.append(psutil.Process(grandchild))
    assert [p.pid for p in processes.tree(child.pid)] == [child.pid, grandchild]
    mine = [p.pid for p in processes.tree()]
    assert mine[0] == os.getpid() and {child.pid, grandchild} <= set(mine)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert processes.tree(int(gone.stdout)) == []


def test_a_reparented_process_is_found_by_its_token_and_stopped(cleanup):
    """The shell exits at once: its sleep is no longer in its tree, but carries the token."""
    token = uuid.uuid4().hex
    shell = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True,
                           env={**os.environ, TOKEN_VAR: token}, check=True)
    orphan = psutil.Process(int(shell.stdout))
    cleanup.append(orphan)
    assert orphan not in processes.tree()
    assert processes.carrying(TOKEN_VAR, token) == [orphan]
    assert processes.carrying(TOKEN_VAR, uuid.uuid4().hex) == []
    found = processes.run_processes([os.getpid()], TOKEN_VAR, token)  # (other tests' children may be in this tree)
    assert orphan in found and os.getpid() not in [p.pid for p in found]  # this process left out
    assert processes.stop(processes.run_processes([], TOKEN_VAR, token), grace=5) == []
    assert not processes.alive(orphan) and processes.carrying(TOKEN_VAR, token) == []


def test_processes_are_found_by_a_text_of_their_command_line(cleanup):
    marker = f"fedsparse-test-{uuid.uuid4().hex}"
    proc = psutil.Popen([*SLEEP, marker])
    cleanup.append(proc)
    assert processes.naming(marker) == [proc]
    proc.kill()
    proc.wait()
    assert processes.naming(marker) == []


def test_rss_and_pss_of_a_process_holding_200_mb(cleanup):
    child = psutil.Popen([sys.executable, "-c", HOLD_200MB], stdout=subprocess.PIPE, text=True)
    cleanup.append(child)
    assert child.stdout.readline().startswith("ok")
    rss, pss = processes.rss_pss(child.pid)
    assert rss >= 200 * 2**20 and 0 < pss <= rss
    assert processes.rss_pss(child, pss=False)[1] is None
    assert processes.rss(child) >= 200 * 2**20
    assert processes.summed_rss(processes.tree()) >= processes.rss() + 200 * 2**20


def test_an_exited_process_counts_zero():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert processes.rss_pss(p.pid) == (0, 0)
    assert processes.rss_pss(p.pid, pss=False) == (0, None)  # as for a live process: no PSS asked, none given
    assert processes.rss(p.pid) == 0 and processes.start_time(p.pid) is None


def test_status_fields_are_bytes_and_agree_with_the_rss():
    vm_rss, rss = processes.status_bytes("VmRSS"), processes.rss()
    assert vm_rss is not None and abs(vm_rss - rss) < 16 * 2**20
    assert processes.status_bytes("NoSuchField") is None
    assert 0 < processes.rss_anon() <= processes.peak_rss_bytes()


def test_peak_rss_is_in_bytes_and_sees_a_large_allocation():
    block = torch.ones(64 * 2**20)  # 256 MiB of fp32, every page touched
    assert block.sum() == 64 * 2**20
    assert processes.peak_rss_bytes() > 256 * 2**20  # would fail if ru_maxrss (KiB) were read as bytes


def test_peak_rss_of_a_fresh_process_is_its_own_not_its_parents():
    block = torch.ones(128 * 2**20)  # this (parent) process now holds 512 MiB more
    assert block[-1] == 1
    out = subprocess.run([sys.executable, "-c", "from fedsparse.processes import peak_rss_bytes; print(peak_rss_bytes())"],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) < processes.peak_rss_bytes() - 400 * 2**20


def test_start_time_is_the_wall_clock_of_the_start():
    """A ClientApp's first stamp: its process's start on the wall clock, within a clock tick
    (not /proc/stat's whole-second boot time, which psutil adds)."""
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        started = processes.start_time(proc.pid)
    finally:
        proc.wait()
    assert started is not None and before - 0.02 <= started <= time.time()
    assert started - before < 0.5
    assert abs(processes.start_time() - psutil.Process().create_time()) < 1.01


def test_stop_terminates_and_kills_what_ignores_sigterm(cleanup):
    polite = psutil.Popen(SLEEP)
    stubborn = psutil.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, text=True)
    cleanup += [polite, stubborn]
    assert stubborn.stdout.readline().startswith("ok")
    t0 = time.monotonic()
    assert processes.stop([polite, stubborn], grace=1.0) == []
    assert time.monotonic() - t0 >= 1.0  # SIGKILL only after the grace period
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL  # reaped by their Popens
    assert not processes.alive(polite) and not processes.alive(stubborn)


def test_stop_waits_without_signalling_then_kills(cleanup):
    quick = psutil.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    slow = psutil.Popen(SLEEP)
    cleanup += [quick, slow]
    assert processes.stop([quick, slow], grace=3.0, terminate=False) == []
    assert quick.returncode == 0 and slow.returncode == -signal.SIGKILL


def test_an_exited_child_is_reaped_by_stop():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    deadline = time.monotonic() + 10
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not processes.alive(proc)  # a zombie is not alive
    assert processes.stop([proc], grace=0) == []
    assert not processes.exists(child.pid)  # reaped: no zombie left


def test_stop_finds_the_processes_started_while_it_stops(cleanup):
    """A process that starts another when told to stop: the newcomer carries the token and is
    stopped too."""
    token = uuid.uuid4().hex
    script = ("import signal, subprocess, sys, time\n"
              "def bye(*_):\n"
              f"    subprocess.Popen({SLEEP!r}, start_new_session=True)\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "print('ok', flush=True)\n"
              "time.sleep(60)\n")
    parent = psutil.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, TOKEN_VAR: token})
    cleanup.append(parent)
    assert parent.stdout.readline().startswith("ok")
    assert processes.stop([parent], grace=10, find=lambda: processes.run_processes([], TOKEN_VAR, token)) == []
    assert processes.carrying(TOKEN_VAR, token) == []


def test_stop_never_signals_a_process_that_took_a_stopped_ones_pid(cleanup):
    """A process that has exited, and whose pid the kernel gave to a new one, is gone: the new
    one is not signalled. The pid is recycled for real (``ns_last_pid``, root only), a few clock
    ticks later: a process is its pid and its start time, counted in ticks (10 ms)."""
    first = psutil.Popen(SLEEP)
    stale = psutil.Process(first.pid)
    first.kill()
    first.wait()
    time.sleep(0.05)
    newcomer = None
    for _ in range(50):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
                fh.write(str(stale.pid - 1))
        except OSError as err:
            pytest.skip(f"cannot choose the next pid here ({err.strerror}): needs root")
        candidate = psutil.Popen(SLEEP)
        cleanup.append(candidate)
        if candidate.pid == stale.pid:
            newcomer = candidate
            break
        candidate.kill()
        candidate.wait()
    assert newcomer is not None, "the kernel never gave the pid out again"
    assert newcomer != stale and not processes.alive(stale)
    assert processes.stop([stale], grace=0) == []
    time.sleep(0.2)
    assert newcomer.poll() is None and processes.alive(newcomer)  # untouched


def test_summed_rss_counts_a_process_once():
    """A process listed twice (in a SuperNode's tree and among the processes watching it)
    counts once."""
    me = processes.process()
    assert processes.summed_rss([me, psutil.Process(os.getpid())]) == processes.summed_rss([me]) > 0


CYCLE_AT_EXIT = """
import atexit, sys
atexit.register(print, "atexit ran", flush=True)  # registered first: runs last
from fedsparse.processes import exit_without_final_collection
if sys.argv[1] == "freeze":
    exit_without_final_collection()
    exit_without_final_collection()  # idempotent

class Node:
    def __del__(self):
        print("finalized", flush=True)

a, b = Node(), Node()
a.other, b.other = b, a  # a cycle: only the garbage collector frees it
del a, b
import gc; gc.disable()  # nothing collects it before the exit
"""


@pytest.mark.parametrize("mode", ["freeze", "plain"])
def test_exit_without_final_collection_skips_only_the_last_collection(mode):
    """The interpreter's exit walks every tracked object once more to free cycles; with
    ``exit_without_final_collection`` it does not (the cycle here is never finalized), and the
    atexit handlers registered before still run."""
    out = subprocess.run([sys.executable, "-c", CYCLE_AT_EXIT, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines.count("ran") == 1 and lines.count("finalized") == (0 if mode == "freeze" else 2), out.stdout
