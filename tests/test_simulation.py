"""strategies/simulation.py: how the Simulation Engine starts Ray."""

from __future__ import annotations

import os

import pytest

from strategies.simulation import WORKER_NICENESS, start_ray, worker_niceness


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


def test_simulated_clients_run_at_the_niceness_of_this_process(monkeypatch):
    """Ray would start its workers (the simulated clients) at nice 15, below this process."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert not ray.is_initialized()

    @ray.remote(num_cpus=1)
    class Probe:
        def niceness(self) -> int:
            return os.getpriority(os.PRIO_PROCESS, 0)

    start_ray({"num_cpus": 1, "include_dashboard": False})
    try:
        actor = Probe.remote()
        assert ray.get(actor.niceness.remote(), timeout=120) == 0
    finally:
        ray.shutdown()


def test_a_bad_niceness_leaves_the_signals_unblocked(monkeypatch):
    import signal

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
