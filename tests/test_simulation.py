"""strategies/simulation.py: how the Simulation Engine starts Ray."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedsparse import processes
from strategies.simulation import WORKER_NICENESS, start_ray, worker_niceness

# starts a Ray cluster the size of the machine: one at a time (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("ray")


def test_workers_default_to_nice_0_and_an_explicit_setting_wins(monkeypatch):
    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    assert worker_niceness() == "0"
    monkeypatch.setenv(WORKER_NICENESS, " 15 ")
    assert worker_niceness() == "15"


@pytest.mark.parametrize("value", ["high", "1.5", "20", "-21"])
def test_a_bad_niceness_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(WORKER_NICENESS, value)
    with pytest.raises(ValueError, match=f"^{WORKER_NICENESS}=.* is not a niceness") as err:
        worker_niceness()
    assert "\n" not in str(err.value)


def test_simulated_clients_run_at_nice_0_and_ray_stops_without_waiting(monkeypatch):
    """Ray would start its workers (the simulated clients) at nice 15, below this process, and
    wait a second for each of its own processes at shutdown. Killed at once, Ray's processes
    take the raylet's agents with them: left alone, those outlived it by about a minute."""
    import subprocess

    ray = pytest.importorskip("ray")
    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as simulate() sets it: no FutureWarning
    assert not ray.is_initialized()

    @ray.remote(num_cpus=1)
    class Probe:
        def niceness(self) -> int:
            return os.getpriority(os.PRIO_PROCESS, 0)

    start_ray({"num_cpus": 1, "include_dashboard": False})
    try:
        actor = Probe.remote()
        # nice 0 on top of the driver's own (a suite run under `nice -n 5` has its workers at 5)
        assert ray.get(actor.niceness.remote(), timeout=120) == os.getpriority(os.PRIO_PROCESS, 0)
        ray_processes = [info.process for infos in ray._private.worker._global_node.all_processes.values()
                         for info in infos]
        raylet = next(p.pid for p in ray_processes if "raylet" in " ".join(processes.command_line(p.pid)))
        # (a short-lived child of the raylet may be a zombie by now: command_line says [] for it;
        # an agent may still be starting, under its script's name before its ray:: title)
        deadline = time.monotonic() + 60
        while not (agents := [p for p in processes.tree(raylet)[1:]
                              if "agent" in " ".join(processes.command_line(p.pid)).lower()]):
            assert time.monotonic() < deadline, "the raylet started no agent within a minute"
            time.sleep(0.1)
        waits = []  # Popen.wait calls while Ray shuts down
        real_wait = subprocess.Popen.wait

        def wait(self, timeout=None):
            waits.append((self.pid, timeout))
            return real_wait(self, timeout)

        monkeypatch.setattr(subprocess.Popen, "wait", wait)
    finally:
        ray.shutdown()
        monkeypatch.undo()
    # started with SIGTERM blocked, Ray's own processes are killed at once, not sent SIGTERM and
    # waited for a second each (a SIGKILL in the end all the same), and reaped
    assert len(ray_processes) >= 3
    assert not [w for w in waits if w[0] in {p.pid for p in ray_processes} and w[1] is not None]
    assert [p.returncode for p in ray_processes] == [-signal.SIGKILL] * len(ray_processes)
    # the raylet's dashboard and runtime-env agents are gone too (or dead, waiting for init to reap them)
    assert len(agents) >= 1
    deadline = time.monotonic() + 10
    while (alive := [p.pid for p in agents if processes.alive(p)]):
        assert time.monotonic() < deadline, f"the raylet's agents outlived it: {alive}"
        time.sleep(0.05)


def test_a_bad_niceness_leaves_the_signals_unblocked(monkeypatch):
    monkeypatch.setenv(WORKER_NICENESS, "high")
    monkeypatch.setattr("strategies.simulation.import_ray", lambda: type("Ray", (), {"is_initialized": staticmethod(lambda: False)}))
    with pytest.raises(ValueError, match="is not a niceness"):
        start_ray({"num_cpus": 1})
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_app_directories_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from strategies import ray_arrays
    from strategies.simulation import APP_PREFIX

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{APP_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{APP_PREFIX}{os.getpid()}-def"
    other = tmp_path / "fedsparse-appendix"
    for d in (dead, live, other):
        d.mkdir()
        (d / "pyproject.toml").write_text("")
    assert ray_arrays.sweep_stale(tmp_path, APP_PREFIX) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
