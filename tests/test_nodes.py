"""fedsparse/engine/nodes.py (where clients ran), and the driver's side of attaching to a Ray
cluster (strategies/simulation.py's address and CPU checks, the adapter's error reasons). The
real two-node cluster is in tests/test_cluster.py."""

from __future__ import annotations

import os
import sys
import types

import pytest

from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.engine.nodes import NodeDataError, NodeTable, naming_the_node, node_key, with_addresses, worker_identity
from fedsparse.protocol import PEAK_RSS_KEY, RAY_NODE_KEY, WORKER_PID_KEY

NODE_A = "a1" * 28
NODE_B = "b2" * 28


def reply(node: str, pid: int, peak: float) -> dict[str, float]:
    return {RAY_NODE_KEY: node_key(node), WORKER_PID_KEY: pid, PEAK_RSS_KEY: peak}


def test_the_node_table_counts_tasks_processes_and_their_peaks_per_node():
    table = NodeTable()
    assert table.add([{PEAK_RSS_KEY: 5.0}]) is None  # a reply from outside Ray says no node
    assert table.add([reply(NODE_A, 1, 100.0), reply(NODE_A, 2, 50.0), reply(NODE_B, 7, 30.0)]) == 2
    assert table.add([reply(NODE_A, 1, 80.0), reply(NODE_A, 2, 70.0)]) == 1
    a, b = table.rows()
    # node a: 4 tasks by 2 processes whose peaks are 100 and 70 (a process's peak is its largest report)
    assert (a["tasks"], a["workers"], a["peak_rss_bytes_max"], a["peak_rss_bytes_sum"]) == (4, 2, 100, 170)
    assert (b["tasks"], b["workers"], b["peak_rss_bytes_sum"]) == (1, 1, 30)
    assert NODE_A.startswith(a["node"]) and NODE_B.startswith(b["node"])
    described = with_addresses(table.rows(), {NODE_A: {"address": "10.0.0.1", "cpus": 4.0}})
    assert described[0]["address"] == "10.0.0.1" and described[0]["node_id"] == NODE_A and described[0]["cpus"] == 4.0
    assert described[1]["address"] is None  # a node that joined after the table was taken
    resumed = NodeTable(table.rows())  # a resumed run goes on counting; its processes are new
    resumed.add([reply(NODE_A, 3, 10.0)])
    assert resumed.rows()[0]["tasks"] == 5 and resumed.rows()[0]["workers"] == 3


def test_the_node_key_is_exact_as_a_float():
    key = node_key("f" * 56)
    assert float(key) == key and int(float(key)) == key


def test_ray_nodes_round_trip_through_metrics_json(tmp_path):
    m = RunMetrics(config={}, engine="simulation", model_params=1, model_bytes=4, num_classes=2, test_examples=1,
                   head_dims=[1, 2])
    table = NodeTable()
    table.add([reply(NODE_A, 1, 100.0)])
    m.ray_nodes = table.rows()
    assert RunMetrics.load(m.write(tmp_path)).ray_nodes == table.rows()


def test_the_round_line_says_how_many_nodes_took_part():
    r = RoundMetrics(round=1, accuracy=0.5, loss=1.0, clients=3, examples=9, sampled=3, subnets=3, failures=0,
                     failed_error=0, failed_invalid=0, failed_lost=0, bytes_down_per_client=1e3,
                     bytes_up_per_client=1e3, bytes_down_total=3000, bytes_up_total=3000, seconds=1.0, elapsed=1.0)
    assert "nodes" not in r.line(2)  # not on Ray
    r.ray_nodes = 1
    assert "nodes" not in r.line(2)  # one machine, as always
    r.ray_nodes = 3
    assert "clients 3/3 done on 3 nodes, 0 failed" in r.line(2)


def fake_ray(monkeypatch, node_id: str = NODE_A, ip: str = "10.0.0.9") -> None:
    context = types.SimpleNamespace(get_node_id=lambda: node_id)
    ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context,
                                util=types.SimpleNamespace(get_node_ip_address=lambda: ip))
    monkeypatch.setitem(sys.modules, "ray", ray)


def test_a_client_names_its_node_only_inside_ray(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert worker_identity() == {}
    with pytest.raises(FileNotFoundError):  # outside Ray: the error as it was
        with naming_the_node():
            raise FileNotFoundError("data-dir /data/cifar10 does not exist")
    fake_ray(monkeypatch)
    assert worker_identity() == {RAY_NODE_KEY: node_key(NODE_A), WORKER_PID_KEY: os.getpid()}
    with pytest.raises(NodeDataError) as err:
        with naming_the_node():
            raise PermissionError("cache-dir /cache is not writable:\n  Permission denied")
    text = str(err.value)
    assert text.startswith("on node ") and "(Ray node 10.0.0.9, a1a1a1a1)" in text
    assert text.endswith("cache-dir /cache is not writable: Permission denied") and "\n" not in text


def test_ray_task_errors_are_reduced_to_the_clientapps_own_message():
    from strategies.adapter import error_gist

    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
              "(pid=1, ip=10.0.0.2, actor_id=7b)\n  File \"x.py\", line 3, in run\n    raise\n"
              "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
              "Message: on node h (Ray node 10.0.0.2, 1f2e3d4c): cache-dir is not writable'>")
    assert error_gist(reason) == "on node h (Ray node 10.0.0.2, 1f2e3d4c): cache-dir is not writable"
    assert error_gist("<class 'ValueError'>:<'bad'>") == "<class 'ValueError'>:<'bad'>"


def test_the_cluster_address_comes_from_the_key_then_the_environment(monkeypatch):
    from strategies.simulation import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(RunConfig()) is None  # today's local Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(RunConfig()) == "10.0.0.1:6379"
    assert ray_address(RunConfig(ray_address="10.0.0.2:6379")) == "10.0.0.2:6379"  # the key wins
    assert ray_address(RunConfig(ray_address="local")) is None  # a local Ray, whatever the environment says
    with pytest.raises(ValueError, match="^ray-address 'ray://h:10001' is a Ray Client address"):
        ray_address(RunConfig(ray_address="ray://h:10001"))


def test_client_cpus_must_fit_on_one_node_of_the_cluster():
    from strategies.simulation import check_cluster_cpus

    nodes = {NODE_A: {"address": "a", "cpus": 4.0}, NODE_B: {"address": "b", "cpus": 8.0}}
    check_cluster_cpus(RunConfig(client_cpus=8.0), nodes, "h:6379")
    with pytest.raises(ValueError, match=r"client-cpus \(9\) exceeds the CPUs of every node .* \(2 nodes, the largest "
                                         r"with 8\)"):
        check_cluster_cpus(RunConfig(client_cpus=9.0), nodes, "h:6379")


def test_an_attached_run_checks_client_cpus_against_the_cluster_not_this_machine(monkeypatch, tmp_path):
    """``fedsparse check`` (and ``run``) on a machine with fewer cores than a cluster node."""
    from fedsparse.commands import cli

    cores = os.cpu_count() or 1
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="exceeds the .* CPU cores here"):
        cli.check_client_cpus(RunConfig(client_cpus=cores + 1.0))
    args = cli.build_parser().parse_args(["check", "--out", str(tmp_path / "run"), "--run-config",
                                          f"client-cpus={cores + 1} ray-address='h:6379'"])
    assert cli.cmd_check(args) == 0


def test_the_scaling_walkthroughs_ray_start_flags_and_keys_exist():
    """docs/scaling.md names ``ray start`` flags and run-config keys a user types as written."""
    import re
    import subprocess
    from pathlib import Path

    from fedsparse.config import config_keys

    text = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        pytest.skip("no ray command (the simulation extra is not installed)")
    help_text = subprocess.run([str(ray), "start", "--help"], capture_output=True, text=True, check=True).stdout
    commands = re.findall(r"ray start[^\n`]*", text) + re.findall(r"`ray start --help`:([^)]*)\)", text)
    flags = set(re.findall(r"--[a-z][a-z-]+", " ".join(commands)))
    assert {"--head", "--port", "--num-cpus", "--address"} <= flags
    assert [f for f in flags if f not in help_text] == []
    for key in re.findall(r"\b([a-z]+(?:-[a-z]+)+)='", text):  # key='value' in the run configs shown
        assert key in config_keys(), key


def test_an_unreachable_cluster_is_one_line_at_once():
    import socket

    from strategies.simulation import check_reachable

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=rf"^cannot reach the Ray cluster at 127.0.0.1:{port} \(.*\); start it with "
                                         rf"`ray start --head --port={port}` on 127.0.0.1"):
        check_reachable(f"127.0.0.1:{port}", seconds=2)
    check_reachable("auto")  # Ray finds it itself
