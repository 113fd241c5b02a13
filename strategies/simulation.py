"""``fedsparse run``: the Flower Simulation Engine (Ray backend), in this process.

It runs the same ServerApp and ClientApp that ``flwr run .`` loads from ``pyproject.toml``,
with the run config handed to both sides the way Flower does it: from an app directory's
``[tool.flwr.app.config]`` (written to a temporary directory, so an installed fedsparse
needs no source checkout). Ray is shut down afterwards, so the run leaves no process
behind. The summed RSS and PSS of the whole process tree (Ray included) is sampled during
the run (``fedsparse.accounting.memory``: the PSS less often) and added to ``metrics.json``
under ``memory``.

With ``ray-address`` (or ``$RAY_ADDRESS``) the run attaches to a running Ray cluster instead
(``ray_address``): the cluster's CPUs are the clients' (no ``num_cpus``; ``client-cpus`` is
checked against its largest node), the workers keep their own ``PYTHONPATH`` (fedsparse is
installed on every node), and the run ends by disconnecting: Ray ends the run's own actors
with its job and leaves the cluster, and every other job on it, running. ``memory`` is then
this process's alone; ``ray_nodes`` has the clients' processes, node by node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from fedsparse import processes
from fedsparse.accounting.memory import ProcessTreeMonitor
from fedsparse.config import RunConfig, toml_text
from fedsparse.engine.metrics import RunMetrics
from fedsparse.engine.nodes import with_addresses
from strategies import ray_arrays
from strategies.flower_internals import patched_pool, patched_vce, run_simulation_with_config


APP_PREFIX = "fedsparse-app-"  # the run's app directory in the temporary folder: fedsparse-app-<pid>-...


def write_app_dir(cfg: RunConfig, app_dir: Path) -> Path:
    """A minimal Flower app directory whose default run config is ``cfg``."""
    app = {"publisher": "fedsparse",
           "components": {"serverapp": "strategies.server_app:app", "clientapp": "clients.client_app:app"},
           "config": cfg.to_run_config()}
    project = {"project": {"name": "fedsparse-run", "version": "0.0.0"}, "tool": {"flwr": {"app": app}}}
    (app_dir / "pyproject.toml").write_text(toml_text(project))
    return app_dir


class SimulationExtraMissing(ImportError, ValueError):
    """Ray is not installed: ``fedsparse`` was installed without its ``simulation`` extra.
    A ``ValueError`` too, so that the CLI reports it as its one-line ``fedsparse: error: ...``."""


def import_ray() -> Any:
    """``ray``, or a one-line error saying how to get it (a client-only install has no Ray)."""
    try:
        import ray
    except ImportError as err:
        raise SimulationExtraMissing(
            f"the Simulation Engine needs Ray, which is not installed ({err}); install it with "
            "pip install 'fedsparse[simulation]' (from a checkout: pip install -e '.[simulation]'), "
            "or use --engine in-process or --engine plain", name="ray") from None
    return ray


# Ray starts its worker processes at nice 15 (its ``worker_niceness``), below this process and
# everything else on the machine. In a simulation the workers are the clients: they do the
# training, and at nice 15 every other runnable thread (this process's own, Ray's daemons)
# takes their cores first; the bare-PyTorch reference's workers run at nice 0. Ray's own job
# supervisor starts its workers at 0 the same way. An explicit RAY_worker_niceness wins.
WORKER_NICENESS = "RAY_worker_niceness"


def worker_niceness() -> str:
    """The niceness of the simulation's Ray workers: ``RAY_worker_niceness`` if set, else 0."""
    value = os.environ.get(WORKER_NICENESS, "").strip() or "0"
    try:
        if not -20 <= int(value) <= 19:
            raise ValueError
    except ValueError:
        raise ValueError(f"{WORKER_NICENESS}={value!r} is not a niceness (an integer from -20 to 19)") from None
    return value


LOCAL = "local"  # ray-address: a Ray of this machine, whatever $RAY_ADDRESS says


def ray_address(cfg: RunConfig) -> str | None:
    """The running Ray cluster the simulation attaches to: ``ray-address``, else
    ``$RAY_ADDRESS``; None (also for ``ray-address = "local"``): a Ray of this machine's
    cores, started and stopped by the run. A Ray Client address (``ray://``) is refused: the
    run's driver must be a process of the cluster (run it on the head node)."""
    address = cfg.ray_address.strip() or os.environ.get("RAY_ADDRESS", "").strip()
    if address.startswith("ray://"):
        raise ValueError(f"ray-address {address!r} is a Ray Client address; run fedsparse on a node of the cluster "
                         "(the head) with the cluster's own address, e.g. ray-address='HEAD-IP:6379' or 'auto'")
    return None if address in ("", LOCAL) else address


def check_reachable(address: str, seconds: float = 5.0) -> None:
    """A one-line error when nothing answers at a cluster's ``HOST:PORT`` (Ray itself retries
    for minutes before it gives up, with SIGINT blocked while it starts)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # Ray's own lookup (the cluster started on this machine), or a form Ray will judge
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}); start it with "
                         f"`ray start --head --port={port}` on {host}, or check the address and the firewall") from None


def start_ray(init_args: dict[str, Any]) -> None:
    """``ray.init`` as Flower's Ray backend does it, with SIGINT and SIGTERM blocked while Ray
    starts its processes, and its workers at ``worker_niceness()``. Attaching to a running
    cluster (``init_args["address"]`` other than ``local``) starts no process: the driver's
    ``sys.path`` is not handed to the workers (its folders are this machine's), and Ray's
    processes are the cluster's, never killed by the run."""
    ray = import_ray()

    if ray.is_initialized():
        return
    attach = init_args.get("address", LOCAL) != LOCAL
    if attach:
        pythonpath = os.environ.get("PYTHONPATH", "")  # an explicit one: the same folders on every node
    else:
        pythonpath = os.pathsep.join(sys.path)  # as flwr's RayBackend.init_ray
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath
    # Ray's processes inherit the signal mask of the thread that starts them: with SIGINT and
    # SIGTERM blocked they are not hit by a signal sent to the whole process group (a terminal's
    # Ctrl-C, a service manager's stop); fedsparse gets it, stops, and shuts Ray down.
    # Ray's core also installs a C-level SIGTERM handler in this process that logs a stack trace
    # and then dies; the Python handlers in place before (fedsparse's clean stop) are put back.
    env_vars = {WORKER_NICENESS: worker_niceness()}  # a bad value raises here
    if pythonpath:
        env_vars["PYTHONPATH"] = pythonpath
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(handlers))
    try:
        ray.init(runtime_env={"env_vars": env_vars}, **{"include_dashboard": False, **init_args})
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, h in handlers.items():
                if h is not None:
                    signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if not attach:
        stop_without_grace(ray)


def cluster_nodes() -> dict[str, dict[str, Any]]:
    """The alive nodes of the Ray cluster this process is connected to: node id ->
    ``{address, cpus}``."""
    ray = import_ray()
    return {n["NodeID"]: {"address": n.get("NodeManagerAddress"), "cpus": n.get("Resources", {}).get("CPU", 0.0)}
            for n in ray.nodes() if n.get("Alive")}


def check_cluster_cpus(cfg: RunConfig, nodes: dict[str, dict[str, Any]], address: str) -> None:
    """A client needs ``client-cpus`` of one node's CPUs: more than the largest node has and
    Ray could not place a single client."""
    largest = max((info["cpus"] for info in nodes.values()), default=0.0)
    if cfg.client_cpus > largest:
        raise ValueError(f"client-cpus ({cfg.client_cpus:g}) exceeds the CPUs of every node of the Ray cluster at "
                         f"{address} ({len(nodes)} nodes, the largest with {largest:g}); "
                         "the Simulation Engine could not place a single client")


_ACTOR_NODES: dict[str, str] = {}  # client actor id -> its Ray node id


def actor_node(actor: Any) -> str | None:
    """The Ray node a client actor runs on (asked once per actor), None if it does not say
    within a minute (its Arrays then travel through Ray)."""
    ray = import_ray()
    key = actor._actor_id.hex()
    if key not in _ACTOR_NODES:
        try:
            _ACTOR_NODES[key] = ray.get(actor.__ray_call__.remote(ray_arrays.node_id), timeout=60)
        except Exception:  # noqa: BLE001 - an actor that cannot start: Flower reports it; Ray's path is safe
            return None
    return _ACTOR_NODES[key]


def arrays_to(actor: Any, message: Any = None) -> Any:
    """Around the submission of ``message`` to ``actor``: its Arrays go by file only when the
    actor runs on this node; for another node each big Array is put in Ray's object store once
    (``strategies.ray_arrays.share``: a group's members share their slice)."""
    node = actor_node(actor) if actor is not None else None
    if message is not None and node != ray_arrays.this_node():
        ray_arrays.share(a for record in message.content.array_records.values() for a in record.values())
    return ray_arrays.sending_to(node)


def stop_without_grace(ray: Any) -> bool:
    """Make ``ray.shutdown`` kill Ray's own processes at once; returns whether it could.

    ``ray.shutdown`` stops each of Ray's processes (GCS, raylet, log monitor, API server,
    reaper) gracefully: SIGTERM, then up to a second's wait, then SIGKILL. The processes
    ``start_ray`` starts have SIGTERM blocked, so every wait ran its full second: 5 s at the
    end of every run (a quarter of the README's default run beyond its rounds), ending in the
    SIGKILL anyway. Ray's node object is private; where it changes, the waits come back and
    nothing else does.

    Killed this way, the raylet's own children (its dashboard and runtime-env agents, idle
    workers) outlive it: an agent that sees its raylet die reports it to the GCS, which is gone
    too, and retries for about a minute. (Killed one by one, a second apart, the GCS was still
    there to take the report.) So they are killed with it: every descendant of Ray's processes
    found just before, that is still the same process."""
    try:
        node = ray._private.worker._global_node
        kill_all = node.kill_all_processes
        ray_processes = node.all_processes
    except AttributeError:
        return False

    def kill_all_at_once(check_alive: bool = True, allow_graceful: bool = False, wait: bool = False) -> None:
        roots = [info.process.pid for infos in list(ray_processes.values()) for info in infos]
        left = [p for root in roots for p in processes.tree(root)[1:]]
        kill_all(check_alive=check_alive, allow_graceful=False, wait=True)  # SIGKILL, then reap at once
        processes.stop(left, grace=0, terminate=False)  # each still the same process: a reused pid is not

    node.kill_all_processes = kill_all_at_once
    return True


def simulate(cfg: RunConfig) -> RunMetrics:
    """Run ``cfg`` with ``cfg.num_clients`` virtual SuperNodes; returns the run's metrics."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning; no GPUs used
    # One math thread per client actor: Ray runs floor(cores / client-cpus) actors side by side.
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(cfg.client_cpus)))
    ray = import_ray()

    from clients.client_app import app as client_app
    from strategies.server_app import app as server_app

    address = ray_address(cfg)
    init_args: dict[str, Any] = {"include_dashboard": False}
    if address is None:
        init_args.update(address=LOCAL, num_cpus=os.cpu_count() or 1)
    else:
        init_args["address"] = address  # the cluster's resources: Ray refuses num_cpus here
    backend_config = {"client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    # named by this process: a killed run's app directory is removed by the next run
    ray_arrays.sweep_stale(Path(tempfile.gettempdir()), APP_PREFIX)
    app_dir = Path(tempfile.mkdtemp(prefix=f"{APP_PREFIX}{os.getpid()}-"))
    monitor = ProcessTreeMonitor(interval=1.0)
    arrays_dir = None
    by_node = False
    theirs = set(processes.tree()[1:])  # the caller's own children (another job's driver, say): not the run's
    try:
        if address is not None:
            check_reachable(address)
        start_ray(init_args)
        nodes = cluster_nodes()
        if address is not None:
            check_cluster_cpus(cfg, nodes, address)
            print(f"fedsparse run: attached to the Ray cluster at {address}: {len(nodes)} nodes, "
                  f"{sum(n['cpus'] for n in nodes.values()):g} CPUs", flush=True)
        if ray_arrays.enabled():  # the slices travel through shared memory, not Ray's object store
            ray_arrays.sweep_stale()
            arrays_dir = ray_arrays.make_run_dir()
            ray_arrays.install(arrays_dir)
        write_app_dir(cfg, app_dir)
        with patched_vce() as fast_dispatch, monitor, \
                (patched_pool(arrays_to) if arrays_dir is not None else contextlib.nullcontext(False)) as by_node:
            run_simulation_with_config(server_app, client_app, cfg.num_clients, cfg.to_run_config(),
                                       backend_config, app_dir)
    finally:
        # what is left of Ray: Flower's backend has usually shut Ray down by now (its raylet's
        # descendants are killed with it: stop_without_grace); if the run failed before that,
        # Ray's GCS, raylet, agents and workers. Attached to a cluster, this process started none
        # of Ray's processes: ray.shutdown() disconnects, and Ray ends this job's actors.
        children = [p for p in processes.tree()[1:] if p not in theirs]
        if arrays_dir is not None:
            ray_arrays.uninstall()  # keeps COUNTS (the next install resets them)
        if ray.is_initialized():
            ray.shutdown()
        # Ray ends its workers after ray.shutdown returns: 3 s for them, then SIGKILL
        processes.stop(children, grace=3.0, terminate=False)
        _ACTOR_NODES.clear()
        shutil.rmtree(app_dir, ignore_errors=True)
        if arrays_dir is not None:
            shutil.rmtree(arrays_dir, ignore_errors=True)
    metrics_path = Path(cfg.out_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"the run ended without writing {metrics_path}; see the log above")
    metrics = RunMetrics.load(metrics_path)
    metrics.memory = monitor.summary()  # this process, Ray's GCS and raylet, and every worker
    metrics.extra["driver_peak_rss_bytes"] = processes.peak_rss_bytes()  # this process alone: the server
    metrics.extra["fast_message_dispatch"] = fast_dispatch
    # Arrays that went through shared-memory files (strategies.ray_arrays): sent to the clients,
    # received in their replies; false where that path is off
    metrics.extra["shared_memory_arrays"] = dict(ray_arrays.COUNTS) if arrays_dir is not None else False
    # big Arrays that went through Ray because their receiver was on another node (or unknown)
    metrics.extra["cross_node_arrays"] = dict(ray_arrays.CROSS_NODE) if arrays_dir is not None else False
    metrics.extra["arrays_by_node"] = by_node  # whether the sender knew each client actor's node
    metrics.extra["ray_cluster"] = {"address": address or LOCAL, "attached": address is not None,
                                    "nodes": len(nodes), "cpus": sum(n["cpus"] for n in nodes.values())}
    metrics.ray_nodes = with_addresses(metrics.ray_nodes, nodes)
    metrics.write(cfg.out_dir)
    return metrics
