"""``fedsparse run``: the Flower Simulation Engine (Ray backend), in this process.

It runs the same ServerApp and ClientApp that ``flwr run .`` loads from ``pyproject.toml``,
with the run config handed to both sides the way Flower does it: from an app directory's
``[tool.flwr.app.config]`` (written to a temporary directory, so an installed fedsparse
needs no source checkout). Ray is shut down afterwards, so the run leaves no process
behind. The summed RSS and PSS of the whole process tree (Ray included) is sampled during
the run and added to ``metrics.json`` under ``memory``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedsparse.accounting.memory import ProcessTreeMonitor
from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics
from strategies.flower_internals import patched_vce, run_simulation_with_config


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app_dir(cfg: RunConfig, app_dir: Path) -> Path:
    """A minimal Flower app directory whose default run config is ``cfg``."""
    lines = [
        "[project]",
        'name = "fedsparse-run"',
        'version = "0.0.0"',
        "[tool.flwr.app]",
        'publisher = "fedsparse"',
        "[tool.flwr.app.components]",
        'serverapp = "strategies.server_app:app"',
        'clientapp = "clients.client_app:app"',
        "[tool.flwr.app.config]",
        *(f'"{k}" = {_toml_value(v)}' for k, v in cfg.to_run_config().items()),
    ]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def simulate(cfg: RunConfig) -> RunMetrics:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; returns the run's metrics."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning; no GPUs used
    # One math thread per client actor: Ray runs floor(cores / client-cpus) actors side by side.
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cfg.client_cpus)))
    import ray

    from clients.client_app import app as client_app
    from strategies.server_app import app as server_app

    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    app_dir = Path(tempfile.mkdtemp(prefix="fedsparse-app-"))
    monitor = ProcessTreeMonitor(interval=1.0)
    try:
        write_app_dir(cfg, app_dir)
        with patched_vce() as fast_dispatch, monitor:
            run_simulation_with_config(server_app, client_app, cfg.num_clients, cfg.to_run_config(),
                                       backend_config, app_dir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(app_dir, ignore_errors=True)
    metrics_path = Path(cfg.out_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"the run ended without writing {metrics_path}; see the log above")
    metrics = RunMetrics.load(metrics_path)
    metrics.memory = monitor.summary()  # this process, Ray's GCS and raylet, and every worker
    metrics.extra["fast_message_dispatch"] = fast_dispatch
    metrics.write(cfg.out_dir)
    return metrics
