"""``fedsparse devices``: emulated devices under operating-system limits, on the Deployment Engine.

One end-to-end run (a SuperLink and two SuperNodes with their own folders and client workers,
three rounds) that must leave no process and no cgroup behind, and the limits themselves on a
plain process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from fedsparse.commands.devices import Device, parse_limits, parse_profiles
from fedsparse.limits import Limits, own_cgroups
from fedsparse.processes import run_processes
from fedsparse.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]
MARK = "FEDSPARSE_DEVICES_TEST_MARK"


def own_cgroup_children(tag: str) -> list[str]:
    """Child cgroups named ``tag*`` under this process's own cgroups."""
    out = []
    for c, path in own_cgroups().items():
        base = Path("/sys/fs/cgroup") / c / path.lstrip("/")
        if base.is_dir():
            out += [str(p) for p in base.glob(f"{tag}*")]
    return out


def test_memory_limit_stops_a_process_that_exceeds_it(tmp_path: Path) -> None:
    """The limit a device runs under, on a process that allocates past it: killed inside its
    cgroup (counted as an OOM kill), or, without cgroups, run under the documented RLIMIT_AS."""
    lim = Limits(f"fedsparse-devices-test-{os.getpid()}")
    device = Device(0, PROFILES["tiny"], tmp_path)
    device.limit_mib = 150
    lim.prepare(device)
    code = ("import resource, sys; print(resource.getrlimit(resource.RLIMIT_AS)[0], flush=True); "
            "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('alive', flush=True)")
    try:
        proc = subprocess.run([sys.executable, "-c", code], preexec_fn=lim.preexec(device), capture_output=True,
                              text=True, timeout=60)
        if lim.kind.startswith("cgroup"):
            assert proc.returncode == -9 and "alive" not in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
            assert lim.oom_kills(device) in (None, 1)
            assert lim.peak_bytes(device) <= 150 * 2**20
        else:
            assert int(proc.stdout.split()[0]) == (150 + 4096) * 2**20
    finally:
        assert lim.release([device]) == []


def test_rlimit_fallback_refuses_an_allocation_past_it(tmp_path: Path) -> None:
    """``--limits rlimit`` (the path of a machine without writable cgroups), run here: the
    device's process gets RLIMIT_AS = its limit + the address-space headroom and one CPU per
    thread of its profile; an allocation past the limit fails with MemoryError in that process
    (which the ClientApp reports as an error reply) instead of taking memory from the host."""
    lim = Limits(f"fedsparse-devices-test-{os.getpid()}", prefer="rlimit")
    assert lim.kind == "rlimit"
    device = Device(0, PROFILES["tiny"], tmp_path)
    device.limit_mib = 150
    lim.prepare(device)
    limit = (150 + 4096) * 2**20
    code = ("import os, resource; print(resource.getrlimit(resource.RLIMIT_AS)[0], len(os.sched_getaffinity(0)), flush=True); "
            "b = bytearray(64 * 2**20); print('small ok', flush=True); "
            f"b = bytearray({limit + 2**30})")
    try:
        proc = subprocess.run([sys.executable, "-c", code], preexec_fn=lim.preexec(device), capture_output=True,
                              text=True, timeout=60)
        lines = proc.stdout.split("\n")
        assert lines[0].split() == [str(limit), str(min(PROFILES["tiny"].threads, os.cpu_count() or 1))]
        assert "small ok" in proc.stdout and proc.returncode == 1 and "MemoryError" in proc.stderr, proc.stderr[-500:]
    finally:
        assert lim.release([device]) == []


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        parse_profiles("tiny,huge")
    with pytest.raises(ValueError, match="--profiles is empty"):
        parse_profiles(" , ")
    assert parse_limits("", 2) == [0, 0] and parse_limits("300,0", 2) == [300, 0]
    for text in ("300", "a,b", "-1,0"):
        with pytest.raises(ValueError, match="--memory-limit-mib"):
            parse_limits(text, 2)


@pytest.mark.slow
def test_two_emulated_devices_with_client_workers_train_and_leave_nothing_behind() -> None:
    """Two devices (``tiny``, ``large``) under their profiles' limits, three rounds, with
    ``--client-worker``: per device, one worker extracts in round 1 (within its limit) and one
    serves the rounds after it from the cache; the report has every device's memory, bytes and
    the rounds' timeline; the command's end leaves no process (each carries the command's
    token), no worker socket and no cgroup. (The ClientApp without a worker, a fresh
    ``flwr-clientapp`` per message, runs in tests/test_deployment.py; ``devices`` differs from
    it by one node-config key.)"""
    mark = uuid.uuid4().hex
    out = Path(tempfile.mkdtemp(prefix="fsd-"))  # short: the workers' sockets go under it
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedsparse.commands.cli", "devices", "--profiles", "tiny,large", "--num-rounds", "3",
             "--images-per-device", "10", "--test-images", "20", "--run-timeout", "300", "--out", str(out),
             "--client-worker", "--run-config", "hidden='16,16' local-steps=2 round-timeout=120.0"],
            cwd=REPO, env={**os.environ, MARK: mark}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = proc.communicate(timeout=420)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, output[-3000:]
        assert run_processes([], MARK, mark) == [], "processes left behind"
        assert own_cgroup_children(f"fedsparse-devices-{proc.pid}-") == [], "cgroups left behind"

        report = json.loads((out / "devices.json").read_text())
        assert report["rounds"] == 3 and report["finished"] is True and report["client_worker"] is True
        rows = {r["profile"]: r for r in report["devices"]}
        assert set(rows) == {"tiny", "large"}
        for name, row in rows.items():
            assert row["status"] == "ok" and row["rounds_ok"] == 3, row
            assert row["images"] == 10 and row["budget_mib"] == row["limit_mib"] == PROFILES[name].memory_mib
            assert row["bytes_down"] > 0 and row["bytes_up"] > 0
            assert row["client_peak_rss_mib"] > 100 and row["node_peak_rss_mib"] >= row["client_peak_rss_mib"]
            # the node's peak counts its worker
            assert row["node_peak_rss_cached_mib"] >= row["client_peak_rss_cached_mib"] > 100
            # each extracts in its first round, within its limit, and reads the cache after it
            assert row["features"] == "on device" and row["extract_seconds"] > 0
            assert row["client_peak_rss_first_mib"] > row["client_peak_rss_cached_mib"]  # timm and the encoder
        assert rows["tiny"]["bytes_down"] < rows["large"]["bytes_down"]  # a narrower slice for the weaker device
        md = (out / "devices.md").read_text()
        assert "| device-0 | tiny |" in md and "| device-1 | large |" in md

        logs = sorted((out / "workers").glob("*.log"))
        assert len(logs) == 2, logs  # one per device (node id and run)
        for log in logs:
            text = log.read_text()
            # the worker that extracted in round 1 made way for one that served rounds 2 and 3
            assert text.count("listening at") == 2 and text.count("stopped: it extracted features") == 1, text
            assert text.count("stopped: SIGTERM") == 1, text
        assert list((out / "workers").glob("*.sock")) == []

        metrics = json.loads((out / "run" / "metrics.json").read_text())
        assert [len(r["per_client"]) for r in metrics["rounds"]] == [2, 2, 2]
        # the timeline: every client's stamps, in the order they happen, after the push; the
        # round's overhead is its seconds beyond the slowest client's work
        order = ["process_start", "imports_done", "features_ready", "trained", "reply_built", "received"]
        for r in metrics["rounds"]:
            work = max(c["extract_seconds"] + c["train_seconds"] for c in r["per_client"])
            assert abs(r["work_seconds"] - work) < 1e-9 and abs(r["overhead_seconds"] - (r["seconds"] - work)) < 1e-9
            for c in r["per_client"]:
                stamps = [c["timeline"][k] for k in order]
                assert 0 <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= r["seconds"], c["timeline"]
        assert report["timeline"]["all"]["rounds"] == 3 and report["timeline"]["after_first"]["rounds"] == 2
        assert report["timeline"]["all"]["overhead_seconds_median"] > 0
        assert "**overhead**" in md and "| device-0 | tiny | on device |" in md
    finally:
        shutil.rmtree(out, ignore_errors=True)
