"""Run a fedsparse experiment on the Flower Simulation Engine (Ray backend), in-process.

``fedsparse run`` lands here. It runs the same ServerApp and ClientApp that
``flwr run .`` loads from ``pyproject.toml``, with the run config handed to both sides
the way Flower does it: from an app directory's ``[tool.flwr.app.config]`` (written to a
temporary directory, so an installed fedsparse needs no source checkout). Ray is shut
down afterwards, so the run leaves no process behind. The summed RSS and PSS of the whole
process tree (Ray's processes included) is sampled during the run and added to
``metrics.json`` under ``memory``. Flower's per-node message polling is replaced by one
pass per poll for the run (``strategies.vce_patch``; ``fast_message_dispatch`` in
``metrics.json`` says whether it was installed).

NOTE: this uses ``flwr.simulation.run_simulation._run_simulation``: the public
``run_simulation`` hands every app an empty run config (flwr 1.42). The import is checked
at call time and fails with a clear message if Flower changes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fedsparse.config import RunConfig
from fedsparse.memory import ProcessTreeMonitor
from strategies.vce_patch import patched_vce


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


def simulate(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; returns the metrics.json content."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning; no GPUs used
    # One math thread per client actor: Ray runs floor(cores / client-cpus) actors side by side.
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cfg.client_cpus)))

    try:
        import ray
        from flwr.app import Context, RecordDict
        from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
        from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.constant import NOOP_FEDERATION_ID
        from flwr.supercore.run import Run
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supercore.telemetry import EventType
    except ImportError as err:
        raise RuntimeError(f"this Flower version lacks an API fedsparse run uses ({err}); install flwr 1.42") from None

    from clients.client_app import app as client_app
    from strategies.server_app import app as server_app

    run_config = cfg.to_run_config()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    app_dir = Path(tempfile.mkdtemp(prefix="fedsparse-app-"))
    monitor = ProcessTreeMonitor(interval=1.0)
    try:
        write_app_dir(cfg, app_dir)
        with patched_vce() as fast_dispatch, monitor:
            _run_simulation(
                num_supernodes=cfg.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config=backend_config,
                server_app_context=context,
                app_dir=str(app_dir),
                run=run,
                is_app=True,
            )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(app_dir, ignore_errors=True)
    metrics_path = Path(cfg.out_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"the run ended without writing {metrics_path}; see the log above")
    metrics = json.loads(metrics_path.read_text())
    # Memory of the whole run: this process, Ray's GCS and raylet, and every worker.
    metrics["memory"] = monitor.summary()
    metrics["fast_message_dispatch"] = fast_dispatch
    tmp = metrics_path.with_suffix(".json.part")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, metrics_path)
    return metrics
