"""ProcessTreeMonitor: the summed memory of this process and its descendants."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fedsparse.accounting.memory import ProcessTreeMonitor
from fedsparse.processes import exists, rss_pss, tree

HOLD_200MB = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ok', flush=True); time.sleep(30)"


def test_tree_includes_children_and_grandchildren():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "print(p.pid, flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        pids = [p.pid for p in tree()]
        assert child.pid in pids and grandchild in pids
    finally:
        child.kill()
        child.wait()


def test_monitor_sees_a_child_holding_200_mb():
    own_rss, _ = rss_pss(os.getpid())
    with ProcessTreeMonitor(interval=0.05) as mon:
        child = subprocess.Popen([sys.executable, "-c", HOLD_200MB], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().startswith("ok")
            time.sleep(0.3)
        finally:
            child.kill()
            child.wait()
    summary = mon.summary()
    assert summary["peak_processes"] >= 2
    assert summary["peak_summed_rss_bytes"] >= own_rss + 190 * 2**20
    assert 0 < summary["peak_summed_pss_bytes"] <= summary["peak_summed_rss_bytes"]
    assert len(summary["samples"]) >= 3


def test_the_sampler_walks_page_tables_for_the_pss_only_part_of_the_time():
    from fedsparse.accounting.memory import PSS_DUTY, tree_sample

    assert 0 < PSS_DUTY <= 0.05
    light = tree_sample(os.getpid(), 0.0, pss=False)
    assert light.pss is None and light.rss > 0
    # a PSS walk comes no sooner than 1 / pss_duty times the last walk's length after it
    walked = {}
    for duty in (1e-9, 1.0):
        with ProcessTreeMonitor(interval=0.02, pss_duty=duty) as mon:
            deadline = time.monotonic() + 20  # the sampler's samples, however slow it starts
            while len(mon._file.read_text().splitlines()) < 8 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(mon.samples) >= 8 and all(s.rss > 0 for s in mon.samples)
        assert mon.samples[0].pss and mon.samples[-1].pss  # on entry and on exit, here
        assert 0 < mon.peak_pss <= mon.peak_rss
        walked[duty] = mon.summary()["pss_samples"]
    assert walked[1e-9] == 3  # entry, exit and the sampler's first walk
    assert walked[1.0] >= 8  # a duty of 1: every sample walks


def test_peak_anon_sampler_sees_a_short_lived_allocation():
    from fedsparse.accounting.memory import PeakAnonSampler
    from fedsparse.processes import rss_anon

    before = rss_anon()
    with PeakAnonSampler(interval=0.001) as s:
        block = bytearray(150 * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        time.sleep(0.05)
        del block
    assert before > 0 and s.peak >= before + 140 * 2**20


def test_the_sampler_is_a_process_that_ends_with_the_monitor_or_its_process():
    with ProcessTreeMonitor(interval=0.05) as mon:
        sampler = mon._proc.pid
        time.sleep(0.5)
        assert sampler in [p.pid for p in tree()]
    assert sampler not in [p.pid for p in tree()] and len(mon.samples) >= 4
    assert all(s.processes >= 1 for s in mon.samples)
    # a run killed with its monitor running leaves no sampler, and no file, behind
    run = subprocess.Popen([sys.executable, "-c", "import time; from fedsparse.accounting.memory import "
                            "ProcessTreeMonitor as M; m = M(interval=0.05).__enter__(); "
                            "print(m._proc.pid, m._file, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        pid, samples_file = run.stdout.readline().split()
        orphan = int(pid)
        assert exists(orphan)
        deadline = time.monotonic() + 10
        while os.path.getsize(samples_file) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.getsize(samples_file) > 0  # it was sampling
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 10
    while exists(orphan) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not exists(orphan)
    assert not os.path.exists(samples_file)


def test_without_a_process_to_spare_the_monitor_keeps_its_own_samples(monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with ProcessTreeMonitor(interval=0.05) as mon:
        time.sleep(0.1)
    assert len(mon.samples) == 2 and mon.peak_rss > 0  # on entry and on exit
