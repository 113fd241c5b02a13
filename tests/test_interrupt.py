"""One Ctrl-C (or SIGTERM, to the process or its group) stops `fedsparse run` cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsparse.engine.metrics import RunMetrics
from test_run import RUN_TOKEN, processes_of_run, run_token

# starts a Ray cluster the size of the machine: one at a time (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("ray")
ROOT = Path(__file__).resolve().parents[1]


def start_run(tmp_path: Path, make_image_tree, engine: str) -> tuple[subprocess.Popen, Path]:
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    out = tmp_path / "out"
    overrides = (f"dataset=imagefolder data-dir='{root}' encoder=builtin-random hidden='24,24' num-clients=6 "
                 f"clients-per-round=3 num-rounds=400 local-steps=3 batch-size=4 cache-dir='{tmp_path / 'cache'}'")
    proc = subprocess.Popen([sys.executable, "-m", "fedsparse.commands.cli", "run", "--engine", engine,
                             "--run-config", overrides, "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, RUN_TOKEN: (token := run_token())})
    proc.token = token
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if len(json.loads((out / "metrics.json").read_text())["rounds"]) >= 2:
                return proc, out
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the run did not finish 2 rounds in time")


@pytest.mark.slow
@pytest.mark.parametrize("engine, signum, to_group", [
    # a terminal's Ctrl-C reaches the whole process group: Ray's processes, started with SIGINT
    # and SIGTERM blocked together (strategies.simulation.start_ray), ignore it; a service
    # manager's SIGTERM to every process is the same case for the other signal of that mask
    ("simulation", signal.SIGINT, True),
    ("simulation", signal.SIGTERM, False),  # kill <pid>
    ("plain", signal.SIGINT, True),
])
def test_one_signal_stops_the_run_cleanly(tmp_path, make_image_tree, engine, signum, to_group):
    proc, out = start_run(tmp_path, make_image_tree, engine)
    t0 = time.monotonic()
    send = (lambda s: os.killpg(proc.pid, s)) if to_group else (lambda s: os.kill(proc.pid, s))
    send(signum)
    time.sleep(0.3)
    if proc.poll() is None:
        send(signum)  # an impatient second signal changes nothing and prints nothing
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - t0
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert seconds < 30, seconds
    assert "Traceback" not in stderr and "SIGTERM received at" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if "received; stopping" in line]
    assert len(said) == 1, stderr[-3000:]
    assert "stopped:" in stdout
    m = RunMetrics.load(out)
    rounds = [r.round for r in m.rounds]
    assert len(rounds) >= 2 and rounds == list(range(1, len(rounds) + 1)) and not m.finished
    assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
    time.sleep(1)
    assert processes_of_run(proc.pid, proc.token) == [], "the run left Ray processes behind"
