"""A Ray cluster of several nodes on this machine, for tests and benchmarks of a cluster run.

Each node is a ``ray start --block`` process with its own CPUs, as on separate machines
(``docs/scaling.md``). The cluster lives in a private temporary folder (``--temp-dir``): its
address file is not the machine's default one (``/tmp/ray/ray_current_cluster``), so no other
``ray.init()`` on the machine finds it and attaches by mistake. ``stop`` signals the
``ray start`` processes this object started (each stops its own node's processes), never
``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsparse import processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """``ray start --block`` nodes of one cluster, started and stopped by this object.

    ``env``: extra environment for every node (its workers inherit it: ``PYTHONPATH``,
    ``FEDSPARSE_CACHE``); ``add_worker(**env)`` adds a node with more of its own."""

    def __init__(self, **env: str) -> None:
        self.temp = tempfile.mkdtemp(prefix="fsc-", dir="/tmp")  # short: Ray's socket paths go in it
        self.procs: list[subprocess.Popen] = []
        self.address = ""
        self._env = env

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
        env.update(self._env)
        env.update(extra)
        return env

    def _start(self, cpus: float, *args: str, **env: str) -> subprocess.Popen:
        ray = Path(sys.executable).parent / "ray"
        log = open(Path(self.temp) / f"node{len(self.procs)}.log", "w")
        proc = subprocess.Popen([str(ray), "start", "--block", f"--num-cpus={cpus:g}", "--disable-usage-stats",
                                 f"--dashboard-agent-listen-port={free_port()}", *args],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env(**env), start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_head(self, cpus: float = 1, **env: str) -> str:
        """The head node; returns the cluster's address (``IP:PORT``)."""
        self._start(cpus, "--head", f"--port={free_port()}", "--include-dashboard=false", f"--temp-dir={self.temp}",
                    f"--ray-client-server-port={free_port()}", **env)
        address_file = Path(self.temp) / "ray_current_cluster"
        self._wait(lambda: address_file.is_file() and address_file.read_text().strip(), "the head node")
        self.address = address_file.read_text().strip()
        self._wait(lambda: len(self.alive_nodes()) == 1, "the head node")
        return self.address

    def add_worker(self, cpus: float = 1, **env: str) -> None:
        before = len(self.alive_nodes())
        self._start(cpus, f"--address={self.address}", **env)
        self._wait(lambda: len(self.alive_nodes()) > before, "a worker node")

    def alive_nodes(self) -> list[str]:
        """Ids of the nodes the cluster reports alive, asked of its GCS (no driver needed)."""
        from ray._raylet import GcsClient

        try:
            nodes = GcsClient(address=self.address).get_all_node_info(timeout=5)
        except Exception:  # noqa: BLE001 - not up yet
            return []
        return [info.node_id.hex() if hasattr(info.node_id, "hex") else str(info.node_id)
                for info in nodes.values() if info.state == 0]  # ALIVE

    def _wait(self, ready, what: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            dead = any(p.poll() is not None for p in self.procs)
            if dead or time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp).glob("node*.log")))
                raise RuntimeError(f"{what} did not start ({'a node exited' if dead else 'timeout'}):\n{logs}")
            time.sleep(0.2)

    def stop_node(self, proc: subprocess.Popen) -> None:
        """Stop one node: SIGTERM to its ``ray start --block``, which stops its processes."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                processes.stop(processes.tree(proc.pid), grace=0, terminate=False)
                proc.wait()
        self.procs.remove(proc)

    def stop(self) -> None:
        """Stop every node this object started (workers first), then kill, by pid, anything
        of this cluster still running (it names the private folder), and remove the folder."""
        for proc in reversed(list(self.procs)):
            self.stop_node(proc)
        processes.stop(processes.naming(self.temp), grace=0, terminate=False)
        shutil.rmtree(self.temp, ignore_errors=True)
