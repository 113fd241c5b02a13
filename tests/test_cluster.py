"""A run attached to a real Ray cluster: two ``ray start`` nodes on this machine, each with its
own CPU, as a user with two machines starts them (``docs/scaling.md``), in a private folder
and stopped by signalling the processes this module started (``strategies.local_cluster``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import torch

from fedsparse import processes
from fedsparse.config import RunConfig
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine
from strategies.local_cluster import LocalCluster

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]  # starts Ray: one at a time (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes of one CPU each; their workers import this checkout and share a feature cache
    (one machine: the same path on every node)."""
    cache = str(tmp_path_factory.mktemp("cluster-cache"))
    nodes = LocalCluster(PYTHONPATH=str(ROOT), FEDSPARSE_CACHE=cache)
    nodes.cache = cache
    try:
        nodes.start_head()
        nodes.add_worker()
        yield nodes
    finally:
        nodes.stop()
    assert not processes.naming(nodes.temp), "the cluster's processes outlived the test"


SECOND_JOB = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)

@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.n = 0
    def bump(self):
        self.n += 1
        return self.n

counter = Counter.remote()
print(ray.get(counter.bump.remote(), timeout=60), flush=True)
sys.stdin.readline()  # until the test says
print(ray.get(counter.bump.remote(), timeout=30), flush=True)
"""


@pytest.fixture
def cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=2, local_steps=3, batch_size=4,
                     cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), save_seconds=0.0)


def test_a_run_attached_to_a_two_node_cluster_uses_both_and_leaves_it_running(cluster, cfg, monkeypatch):
    """Both nodes run clients; the Arrays for the actor on the other node travel through Ray,
    those for the driver's node through shared-memory files; the model is the one the plain
    loop gives for the same seed; the cluster and another job on it are still running after."""
    from strategies import ray_arrays
    from strategies.simulation import simulate

    second = subprocess.Popen([sys.executable, "-c", SECOND_JOB, cluster.address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=cluster.env())
    try:
        assert second.stdout.readline().strip() == "1"  # the other job is up, with its actor
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # as a user attaches: the environment
        monkeypatch.setenv(ray_arrays.MIN_BYTES_VAR, "0")  # every Array of the driver's is "big"
        metrics = simulate(cfg.replace(out_dir=str(Path(cfg.out_dir) / "cluster")))
        second.stdin.write("\n")
        second.stdin.flush()
        assert second.stdout.readline().strip() == "2"  # the other job's actor lived through the run
    finally:
        second.kill()
        second.wait()
    assert [r.round for r in metrics.rounds] == [1, 2] and all(r.clients == 3 for r in metrics.rounds)
    assert metrics.extra["ray_cluster"] == {"address": cluster.address, "attached": True, "nodes": 2, "cpus": 2.0}
    # both nodes ran clients, and ray_nodes says which, where and how many
    alive = set(cluster.alive_nodes())
    assert len(metrics.ray_nodes) == 2 and {n["node_id"] for n in metrics.ray_nodes} == alive
    assert all(n["tasks"] >= 1 and n["workers"] == 1 and n["peak_rss_bytes_max"] > 0 and n["address"]
               for n in metrics.ray_nodes)
    assert sum(n["tasks"] for n in metrics.ray_nodes) == 2 * 3
    assert any(r.ray_nodes == 2 for r in metrics.rounds)
    # the cross-node path: the actor on the worker node got its Arrays through Ray and sent them
    # back that way; the actor on the driver's node through files
    assert metrics.extra["arrays_by_node"] is True
    cross = metrics.extra["cross_node_arrays"]
    assert cross["sent"] > 0 and cross["received"] > 0
    # the driver put each Array for the other node in the object store once and sent the reference
    assert 0 < cross["put"] <= cross["by_ref"] <= cross["sent"], cross
    assert metrics.extra["shared_memory_arrays"]["sent"] > 0
    # the plain loop's model, bit for bit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = RoundEngine(cfg.replace(out_dir=str(Path(cfg.out_dir) / "plain")), report=lambda s: None)
        plain.run(PlainTransport(plain.cfg))
    model = torch.load(Path(cfg.out_dir) / "cluster" / "model.pt")
    assert model.keys() == plain.state.keys() and all(torch.equal(model[k], plain.state[k]) for k in model)
    # the cluster is still up: both nodes, their processes; the run's client actors are gone
    assert all(p.poll() is None for p in cluster.procs)
    assert set(cluster.alive_nodes()) == alive
    deadline = time.monotonic() + 30
    while actors := client_actors(cluster):
        assert time.monotonic() < deadline, f"the run's client actors outlived it: {actors}"
        time.sleep(0.2)


def client_actors(cluster: LocalCluster) -> list[int]:
    """Live Flower client actors among the cluster's processes."""
    out = []
    for p in [p for proc in cluster.procs for p in processes.tree(proc.pid)]:
        try:
            if "ClientAppActor" in " ".join(p.cmdline()) and processes.alive(p):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def test_an_unwritable_cache_on_a_worker_node_fails_its_clients_in_one_line_naming_it(cluster, cfg, monkeypatch,
                                                                                        tmp_path):
    """A node whose feature cache cannot be written (its $FEDSPARSE_CACHE is a file): its clients
    fail with one line naming the node, counted as failures; the round ends, the other nodes'
    clients count."""
    from strategies.simulation import simulate

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    cluster.add_worker(FEDSPARSE_CACHE=str(blocker / "cache"))
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        monkeypatch.setenv("FEDSPARSE_CACHE", cluster.cache)  # the driver's, and the first two nodes'

        metrics = simulate(cfg.replace(cache_dir="", num_rounds=1, clients_per_round=6,
                                       out_dir=str(Path(cfg.out_dir) / "bad-node")))
    finally:
        cluster.stop_node(cluster.procs[-1])  # this test's node only
    rnd = metrics.rounds[0]
    assert rnd.failed_error >= 1 and rnd.clients >= 1 and rnd.clients + rnd.failures == 6
    reasons = [c.reason for c in rnd.per_client if c.status == "error"]
    assert reasons and all("on node" in r and "Ray node" in r and "\n" not in r for r in reasons)


def test_a_killed_driver_takes_only_its_own_actors_with_it(cluster, cfg):
    """``fedsparse run`` attached to the cluster, SIGKILLed after its first round: Ray ends the
    run's client actors (the dead job's); the nodes stay up."""
    import json

    out = Path(cfg.out_dir) / "killed"
    long = cfg.replace(num_rounds=200)
    args = [sys.executable, "-m", "fedsparse.commands.cli", "run", "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in long.to_run_config().items() if k != "out-dir"),
            "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**cluster.env(), "RAY_ADDRESS": cluster.address}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.json").is_file() or not json.loads((out / "metrics.json").read_text())["rounds"]:
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not finish a round"
            time.sleep(0.1)
        assert client_actors(cluster)  # its actors run on the cluster's nodes
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while actors := client_actors(cluster):
        assert time.monotonic() < deadline, f"a killed run's client actors outlived it: {actors}"
        time.sleep(0.2)
    assert all(p.poll() is None for p in cluster.procs) and len(cluster.alive_nodes()) == 2


def test_flwr_run_on_the_managed_superlink_attaches_through_ray_address(cluster, cfg, tmp_path):
    """``flwr run .`` with ``RAY_ADDRESS`` in its environment: Flower's managed local SuperLink
    (started by this ``flwr run``, with its environment) runs the simulation on the cluster:
    clients on both nodes, the run completed, the cluster up afterwards. The SuperLink is
    stopped by pid (it names this test's ``FLWR_HOME``)."""
    import json
    import shlex

    from strategies.local_cluster import free_port

    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "flwr-run"
    bin_dir = Path(sys.executable).parent
    env = {**cluster.env(), "RAY_ADDRESS": cluster.address, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{bin_dir}:{cluster.env().get('PATH', '')}"}
    run_config = {**cfg.to_run_config(), "out-dir": str(out)}
    args = [str(bin_dir / "flwr"), "run", str(ROOT), "--stream",
            "--run-config", " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items()),
            "--federation-config", f"num-supernodes={cfg.num_clients} client-resources-num-cpus=1"]
    try:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "ServerApp raised an exception" not in log, log[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
    finally:
        superlink = [p for p in processes.naming(str(home)) if p.pid != os.getpid()]
        processes.stop(superlink, grace=30)
    assert superlink, f"no managed SuperLink logging into {home}: {shlex.join(args)}"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["clients"] == 3 and r["failures"] == 0 for r in metrics["rounds"])
    # the clients ran on both nodes of the cluster: Flower's ray.init attached to it
    assert len(metrics["ray_nodes"]) == 2 and all(n["tasks"] >= 1 for n in metrics["ray_nodes"]), metrics["ray_nodes"]
    assert sum(n["tasks"] for n in metrics["ray_nodes"]) == 2 * 3
    # and left it running, both nodes
    assert all(p.poll() is None for p in cluster.procs) and len(cluster.alive_nodes()) == 2
    deadline = time.monotonic() + 60
    while actors := client_actors(cluster):
        assert time.monotonic() < deadline, f"the run's client actors outlived it: {actors}"
        time.sleep(0.2)
