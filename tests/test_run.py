"""`fedsparse run` end to end on the Flower Simulation Engine (Ray), offline, as a user runs it.
(Its bad input, in process and as the installed command: tests/test_bad_input.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsparse.processes import run_processes
from fedsparse.config import resolve

ROOT = Path(__file__).resolve().parents[1]


def fedsparse(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    token = run_token()
    env = {**os.environ, "FEDSPARSE_CACHE": str(cache), RUN_TOKEN: token}
    with subprocess.Popen(
        [sys.executable, "-m", "fedsparse.commands.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.pid, result.token = proc.pid, token
    return result


RUN_TOKEN = "FEDSPARSE_TEST_RUN"  # in a run's environment: every process it starts inherits it


def run_token() -> str:
    return os.urandom(8).hex()


def processes_of_run(pid: int, token: str) -> list[str]:
    """Processes left by the run whose driver had ``pid`` and whose environment held
    ``RUN_TOKEN=token``: Ray names its session folder ``session_<date>_<driver pid>``, its
    workers descend from the raylet, and anything the run started, wherever it was reparented
    (the raylet's agents once the raylet is gone), carries the token. Zombies aside
    (``fedsparse.processes.run_processes``)."""
    rows = [line.split(None, 1) for line in subprocess.run(
        ["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]]
    roots = [int(p) for p, args in rows if f"_{pid}/" in args or f"_{pid} " in args]
    left = {p.pid for p in run_processes(roots, RUN_TOKEN, token)}
    return [args for p, args in rows if int(p) in left]


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory) -> Path:
    """One feature cache for this module's end-to-end runs: the default run starts it empty
    (the README's first run), the FedAvg run then finds its clients' features there."""
    return tmp_path_factory.mktemp("run-cache")


@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
@pytest.mark.slow
def test_default_run_learns_and_writes_its_files(tmp_path, run_cache):
    proc = fedsparse("run", "--out", str(tmp_path / "out"), cache=run_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final accuracy" in proc.stdout
    # the run's own round lines and summary, not Flower's per-round lines and final dump
    assert "Final results" not in proc.stderr and "[ROUND" not in proc.stderr
    assert proc.stderr.count("round 1/") == 1

    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "model.pt").stat().st_size > 0
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    cfg = resolve(ROOT / "configs" / "quickstart.toml")
    assert metrics["config"] == {**cfg.to_run_config(), "out-dir": str(out)}
    assert cfg.num_clients >= 20 and cfg.num_rounds >= 5
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, cfg.num_rounds + 1))
    for r in rounds:
        assert {"round", "accuracy", "loss", "clients", "bytes_down_per_client", "bytes_up_per_client", "seconds"} <= r.keys()
        assert r["clients"] == cfg.clients_per_round and r["failures"] == 0
        # every client received only its slice: at most 1/K of the full model (+1% headers)
        assert r["bytes_down_per_client"] <= metrics["model_bytes"] / cfg.clients_per_round * 1.01
    acc = [r["accuracy"] for r in rounds]
    chance = 1 / metrics["num_classes"]
    assert metrics["initial"]["accuracy"] < chance + 0.05
    assert acc[-1] > chance + 0.08, acc  # clearly above chance
    assert acc[-1] > acc[0] and max(acc[len(acc) // 2 :]) > max(acc[: len(acc) // 2]), acc  # rising over rounds
    assert processes_of_run(proc.pid, proc.token) == [], "the run left Ray processes behind"
    mem = metrics["memory"]  # the whole process tree: driver, Ray's GCS and raylet, workers
    assert mem["peak_processes"] >= 4 and mem["peak_summed_rss_bytes"] > 1 << 30
    assert "peak summed RSS" in proc.stdout


@pytest.mark.xdist_group("ray")  # starts Ray: one at a time (tests/conftest.py)
@pytest.mark.slow
def test_fedavg_baseline_runs_on_the_same_app(tmp_path, run_cache):
    # the default run's 20 clients: their features are in run_cache when the default run ran first
    proc = fedsparse(
        "run", "--out", str(tmp_path / "out"), "--run-config",
        "strategy=fedavg clients-per-round=2 num-rounds=2 hidden='64,64'",
        cache=run_cache,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2
    for r in metrics["rounds"]:
        assert r["clients"] == 2
        # FedAvg sends the whole head (plus a small config record)
        assert metrics["model_bytes"] <= r["bytes_down_per_client"] <= metrics["model_bytes"] * 1.01
    assert metrics["rounds"][-1]["accuracy"] > metrics["initial"]["accuracy"]
