"""End-to-end IST on Flower's Deployment Engine: a real SuperLink, two SuperNodes, ``flwr run``.

Everything listens on 127.0.0.1 only, on free ports picked at run time. Each Flower process
gets its own temporary ``FLWR_HOME`` (``~/.flwr`` is never touched), its own working folder
and a log file; ``docs/deployment.md`` has the same steps as shell commands.

Every process the test starts (and everything they spawn: the SuperLink's SuperExec and its
``flwr-serverapp``, the SuperNodes' SuperExecs and ``flwr-clientapp`` processes) carries a
per-test token in its environment; teardown signals the started process groups plus every
process that carries the token or descends from a started one (SIGTERM, then SIGKILL), and
fails if any of them is still alive afterwards.

The bundled CIFAR-10 sample (10,000 / 2,000 JPEGs) takes ~2.5 minutes to encode on a 2-core
machine, so the federated run uses a class-balanced subset of it (300 train / 100 test images)
as a ``cifar10`` data-dir; ``test_fab_code_finds_bundled_sample`` checks separately that the
code shipped in the FAB finds the bundled archive itself.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import psutil
import pytest

from fedsparse.local_deployment import Processes, free_ports
from fedsparse.config import run_config_arg, toml_text

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, never another address
BIN = Path(sys.executable).parent  # the virtualenv's console scripts
SAMPLE_ARCHIVE = REPO / "fedsparse" / "assets" / "cifar10-sample.tar.gz"
TOKEN_VAR = "FEDSPARSE_DEPLOYMENT_TEST_TOKEN"
CONNECTION = "fedsparse-test"  # the [superlink.<name>] entry written into the CLI's config.toml
FAB_MAX_SIZE = 10 * 1024 * 1024  # flwr.common.constant.FAB_MAX_SIZE
RUN_TIMEOUT = 300.0  # seconds for `flwr run`; a healthy run takes ~40 s on 2 cores
TERM_GRACE = 10.0  # seconds between SIGTERM and SIGKILL


def _exe(name: str) -> str:
    path = BIN / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "?"


class Deployment(Processes):
    """The processes of one test: logs, homes and working folders under ``root``, started and
    stopped as ``fedsparse devices`` does (``Processes``), with this test's own token variable."""

    token_var = TOKEN_VAR

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cli_home = self._home("cli")

    def _home(self, name: str) -> Path:
        home = self.root / "flwr-home" / name
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env(self, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        # Processes.env puts the virtualenv's scripts first on PATH: the SuperLink and SuperNodes
        # spawn flower-superexec by name
        return super().env(home, {"FEDSPARSE_CACHE": str(self.root / "cache"), **(extra or {})})

    def start_superlink(self, port: int, certs: Path | None = None, node_auth: bool = False) -> None:
        """Plaintext (``--insecure``), or TLS with the files of ``make_certificates(certs)``
        and, with ``node_auth``, SuperNode authentication (docs/deployment.md, "TLS ...")."""
        if certs is None:
            security = ["--insecure"]
        else:
            security = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                        "--ssl-keyfile", str(certs / "server.key")]
        if node_auth:
            security.append("--enable-supernode-auth")
        args = [_exe("flower-superlink"), *security, "--host", HOST, "--port", str(port),
                "--disable-runtime-dependency-installation"]
        self.spawn("superlink", args, self._home("superlink"))
        self.wait_listening("superlink", port)

    def start_supernode(self, partition_id: int, num_partitions: int, superlink_port: int, port: int,
                        root_cert: Path | None = None, key: Path | None = None, name: str = "",
                        node_config: str = "") -> str:
        """A SuperNode: plaintext, or TLS trusting ``root_cert``; with ``key``, it authenticates
        with that private key; ``node_config`` replaces its partition keys (e.g. a node with its
        own data: ``data-dir='...' client-id=0``). Returns its name (the name of its log)."""
        name = name or f"supernode-{partition_id}"
        security = ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
        if key is not None:
            security += ["--auth-supernode-private-key", str(key)]
        args = [_exe("flower-supernode"), *security, "--superlink", f"{HOST}:{superlink_port}",
                "--host", HOST, "--port", str(port),
                "--node-config", node_config or f"partition-id={partition_id} num-partitions={num_partitions}"]
        self.spawn(name, args, self._home(name))  # own FLWR_HOME: nodes install the FAB there
        return name

    def wait_listening(self, name: str, port: int, timeout: float = 60.0) -> None:
        try:
            super().wait_listening(name, port, timeout)
        except RuntimeError as err:
            raise AssertionError(f"{err}\n{self.tail()}") from None

    def write_connection(self, superlink_port: int, root_cert: Path | None = None) -> Path:
        """The ``[superlink.<name>]`` entry of the CLI's ``$FLWR_HOME/config.toml``: plaintext,
        or TLS trusting ``root_cert``."""
        config = self.cli_home / "config.toml"
        security = {"insecure": True} if root_cert is None else {"root-certificates": str(root_cert)}
        config.write_text(toml_text({"superlink": {CONNECTION: {"address": f"{HOST}:{superlink_port}", **security}}}))
        return config

    def wait_for_log(self, name: str, pattern: str, count: int = 1, timeout: float = 60.0) -> str:
        """Wait until ``name``'s log has ``count`` lines matching ``pattern``; returns the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log(name)
            if len(re.findall(pattern, text)) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: {count} x {pattern!r} not logged after {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.3)

    def flwr(self, name: str, args: list[str], timeout: float) -> tuple[int, str]:
        """Run the ``flwr`` CLI to completion: (exit code, output); fails the test on timeout
        (teardown then stops it with everything else)."""
        proc = self.spawn(name, [_exe("flwr"), *args], self.cli_home)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`flwr {args[0]}` still running after {timeout:.0f}s") from None
        return rc, (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> list[str]:
        """Stop everything this test started; returns what is still alive afterwards (should be [])."""
        left = super().stop(TERM_GRACE, reap=5.0)
        return [f"{pid}: {_cmdline(pid)}" for pid in left]

    def tail(self, lines: int = 60) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            parts.append(f"===== {log.name} (last {min(lines, len(text))} of {len(text)} lines) =====")
            parts.extend(text[-lines:])
        return "\n".join(parts)


@pytest.fixture
def deployment(tmp_path: Path):
    dep = Deployment(tmp_path)
    try:
        yield dep
    finally:
        left = dep.stop()
        assert not left, "processes still alive after SIGKILL:\n" + "\n".join(left)


# --- data -------------------------------------------------------------------------------------


def sample_subset(dest: Path, per_class: dict[str, int]) -> Path:
    """The first ``per_class[split]`` images of every class of the bundled sample, as a class-folder tree."""
    if not SAMPLE_ARCHIVE.is_file():
        pytest.skip(f"bundled sample not found: {SAMPLE_ARCHIVE}")
    taken: Counter = Counter()
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class:
                continue
            if taken[parts[0], parts[1]] < per_class[parts[0]]:
                taken[parts[0], parts[1]] += 1
                tar.extract(member, dest, filter="data")
    assert taken, f"no train/<class>/<image> members in {SAMPLE_ARCHIVE}"
    return dest


def tiny_run_config(tmp_path: Path) -> dict[str, object]:
    """Two clients, two rounds, a small head, on 300 train / 100 test images of the sample."""
    data = sample_subset(tmp_path / "data", {"train": 30, "test": 10})
    return {
        "dataset": "cifar10",
        "data-dir": str(data),
        "num-clients": 2,
        "clients-per-round": 2,
        "num-rounds": 2,
        "local-steps": 5,
        "hidden": "64,64",
        "out-dir": str(tmp_path / "out"),  # resolved by the ServerApp process (the SuperLink's cwd if relative)
        "cache-dir": str(tmp_path / "cache"),
        "round-timeout": 120.0,
        "ist-start": "random",  # every round trains slices of the MLP (from the closed form, round 1 sends statistics)
    }


def run_to_completion(deployment: Deployment, run_config: dict[str, object]) -> tuple[str, dict]:
    """``flwr run --stream`` on the test's connection, then ``flwr ls``: the streamed log and
    the run's ``flwr ls`` entry, after checking that the run finished as completed."""
    rc, log = deployment.flwr(
        "flwr-run", ["run", str(REPO), CONNECTION, "--stream", "--run-config", run_config_arg(run_config)],
        timeout=RUN_TIMEOUT,
    )
    assert rc == 0, f"flwr run exited with {rc}"
    match = re.search(r"Successfully started run (\d+)", log)
    assert match, "flwr run did not start a run"
    run_id = match.group(1)
    # `flwr run` exits 0 even when the ServerApp raises, so check the run's final status too
    assert "ServerApp raised an exception" not in log
    rc_ls, ls_out = deployment.flwr("flwr-ls", ["ls", CONNECTION, "--run-id", run_id, "--format", "json"], timeout=60.0)
    assert rc_ls == 0, f"flwr ls exited with {rc_ls}"
    runs = json.loads(ls_out[ls_out.index("{"):])["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    return log, runs[0]


# --- the tests -------------------------------------------------------------------------------


def check_ist_run(out: Path, run_config: dict[str, object], traffic: dict[str, int]) -> dict:
    """What two IST rounds of ``tiny_run_config`` over two SuperNodes must have written to
    ``out`` (by the ServerApp under the SuperLink): every round with both clients, a changed
    model, and each client sent only its slice, by the server's, the clients' and Flower's own
    count (``traffic``: the run's ``network-traffic`` from ``flwr ls``). Returns metrics.json."""
    import torch

    from fedsparse.config import RunConfig
    from fedsparse.model.head import MLPHead
    from fedsparse.task import initial_head

    metrics = json.loads((out / "metrics.json").read_text())
    cfg = RunConfig.from_run_config(metrics["config"])
    assert cfg == RunConfig.from_run_config(run_config)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert "accuracy" in metrics["initial"]
    for entry in metrics["rounds"]:
        assert (entry["clients"], entry["failures"]) == (2, 0), entry

    # --- the model changed: model.pt vs the initial head built from the same RunConfig ---
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    dims = MLPHead.from_state_dict(state).dims
    assert dims[1:-1] == cfg.hidden_sizes and dims[-1] == 10, dims
    initial = initial_head(cfg, dims[0], dims[-1]).state_dict()
    assert initial.keys() == state.keys()
    assert all(initial[k].shape == state[k].shape for k in state)
    unchanged = [k for k in state if torch.equal(initial[k], state[k])]
    assert not unchanged, f"tensors identical to the initial head after 2 IST rounds: {unchanged}"

    # --- each client received only its slice (2 subnets: about half the model) ---
    full = metrics["model_bytes"]
    for entry in metrics["rounds"]:
        down = entry["bytes_down_per_client"]
        assert 0 < down <= full / 2 * 1.01, (down, full)
        # what the clients measured themselves (clients.mods.message_bytes_mod): the same slice
        received = entry["client_bytes_received_mean"]
        assert received is not None and 0 < received <= full / 2 * 1.01, (received, full)
        assert abs(received - down) <= 0.05 * down, (received, down)
    # Flower's count agrees: all messages of the run together carry about half a model per
    # client and round each way (the full model to each client would be >= 1.0 x this budget)
    budget = len(metrics["rounds"]) * 2 * full
    for key in ("inbound-bytes", "outbound-bytes"):
        assert 0 < traffic.get(key, 0) <= 0.6 * budget, (key, traffic, budget)
    return metrics


CIFAR10_CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def own_folder(tmp_path: Path, name: str, classes: dict[str, str]) -> Path:
    """A node's own images: ``{folder name: sample class}`` folders of 10 images each, taken from
    the bundled sample (a folder may carry a name that is not a class of the run)."""
    src = sample_subset(tmp_path / f"{name}-src", {"train": 10}) / "train"
    dest = tmp_path / name
    dest.mkdir()
    for folder, sample_class in classes.items():
        shutil.copytree(src / sample_class, dest / folder)
    return dest


def test_fab_code_finds_bundled_sample(tmp_path: Path) -> None:
    """The FAB `flwr run` ships is small, leaves out the venv and tests, and its code (which
    shadows the installed package on the SuperLink and SuperNodes) finds the bundled sample."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    build = subprocess.run([_exe("flwr"), "build", "--app", str(REPO)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stdout + build.stderr
    (fab,) = tmp_path.glob("*.fab")
    assert fab.stat().st_size <= FAB_MAX_SIZE
    names = zipfile.ZipFile(io.BytesIO(fab.read_bytes())).namelist()
    assert {"pyproject.toml", "strategies/server_app.py", "clients/client_app.py", "fedsparse/data/datasets.py"} <= set(names)
    assert not [n for n in names if n.startswith((".venv/", ".git/")) or "/test_" in n or n.startswith("test_")], names

    app = tmp_path / "app"
    zipfile.ZipFile(fab).extractall(app)
    # what flwr-serverapp / flwr-clientapp do: put the app folder first on sys.path, then import
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import fedsparse.data.datasets as d\n"
        "assert d.__file__.startswith(sys.argv[1]), d.__file__\n"
        "train, test = d.load_splits('cifar10-sample', '', sys.argv[2])\n"
        "print(len(train), len(test))\n"
    )
    probe = subprocess.run([sys.executable, "-c", code, str(app), str(tmp_path / "cache")], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr


# --- TLS and SuperNode authentication ---------------------------------------------------------


def _run_tool(args: list[str], cwd: Path) -> None:
    if shutil.which(args[0]) is None:
        pytest.skip(f"{args[0]} not installed")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}{proc.stderr}"


def make_certificates(dest: Path) -> Path:
    """A self-signed CA (``ca.crt``) and a server certificate for 127.0.0.1 (``server.pem``,
    ``server.key``): the openssl commands of docs/deployment.md."""
    dest.mkdir(parents=True)
    _run_tool(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "365", "-subj", "/CN=fedsparse-ca",
               "-keyout", "ca.key", "-out", "ca.crt"], dest)
    _run_tool(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
               "-keyout", "server.key", "-out", "server.csr"], dest)
    (dest / "san.ext").write_text(f"subjectAltName=IP:{HOST},DNS:localhost\n")
    _run_tool(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
               "-days", "365", "-out", "server.pem", "-extfile", "san.ext"], dest)
    return dest


def make_key_pair(path: Path) -> Path:
    """A SuperNode's EC key pair in OpenSSH format (``path``, ``path.pub``), as docs/deployment.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run_tool(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)], path.parent)
    return path


def cli_json(deployment: Deployment, name: str, args: list[str]) -> dict:
    """A ``flwr ... --format json`` command that must succeed: its JSON reply."""
    rc, out = deployment.flwr(name, [*args, "--format", "json"], timeout=60.0)
    assert rc == 0 and "{" in out, f"`flwr {' '.join(args)}` exited with {rc}:\n{out}"
    reply = json.loads(out[out.index("{"):])
    assert reply.get("success", True), reply
    return reply


FLEET_JOIN = r'"POST /v1/fleet/(?:register|activate)-node'  # a SuperNode joining, in the SuperLink's access log


def test_ist_over_tls_with_supernode_auth(deployment: Deployment, tmp_path: Path) -> None:
    """Two IST rounds over a real SuperLink with TLS and ``--enable-supernode-auth`` and the two
    SuperNodes whose keys were registered, each client getting only its slice
    (``check_ist_run``); one node trains on its partition of the run's data, the other on its
    own image folder (node config ``data-dir``, three of the ten classes), extracting its
    features in round 1 and reading them from its cache in round 2; an unknown run-config key
    refused by name; a SuperNode with an unregistered key and a plaintext one refused, and the
    SuperLink knows the two registered nodes only. (A node folder with a class the run does not
    know: tests/test_client_app.py; an error reply counted as a failure: tests/test_faults.py.)"""
    started = time.monotonic()
    certs = make_certificates(tmp_path / "certs")
    ca = certs / "ca.crt"
    keys = {name: make_key_pair(tmp_path / "keys" / name) for name in ("node0", "node1", "unregistered")}
    camera = own_folder(tmp_path, "camera", {"cat": "cat", "dog": "dog", "ship": "ship"})
    run_config = {**tiny_run_config(tmp_path), "classes": CIFAR10_CLASSES}
    node_configs = ["", f"data-dir='{camera}' client-id=1"]  # node 0: partition 0 of the run's data
    out = Path(run_config["out-dir"])
    link_port, *node_ports = free_ports(5)
    try:
        deployment.start_superlink(link_port, certs=certs, node_auth=True)
        deployment.write_connection(link_port, root_cert=ca)

        # --- register two keys, start their SuperNodes over TLS ---
        registered = {}
        for i in (0, 1):
            reply = cli_json(deployment, f"flwr-register-{i}",
                             ["supernode", "register", f"{keys[f'node{i}']}.pub", CONNECTION, "--name", f"node{i}"])
            registered[str(reply["node-id"])] = f"node{i}"
        assert len(registered) == 2, registered
        for i in (0, 1):
            deployment.start_supernode(i, 2, link_port, node_ports[i], root_cert=ca, key=keys[f"node{i}"],
                                       node_config=node_configs[i])

        # An unknown key never reaches fedsparse: Flower's CLI says only "Invalid run
        # configuration", the SuperLink's log names the key (docs/deployment.md says so).
        rc, bad = deployment.flwr("flwr-run-bad-key", ["run", str(REPO), CONNECTION, "--run-config",
                                                       run_config_arg({**run_config, "bogus-key": 3})], timeout=120)
        assert "Invalid run configuration" in bad, bad
        deployment.wait_for_log("superlink", r"Could not start run: Key 'bogus-key' is not present", timeout=10)

        # --- two IST rounds ---
        t_run = time.monotonic()
        log, run = run_to_completion(deployment, run_config)
        t_run = time.monotonic() - t_run
        assert f"writing to {out}" in log
        metrics = check_ist_run(out, run_config, run.get("network-traffic", {}))
        # the node with its own folder: its 30 images, extracted in round 1, cached in round 2
        own = [next(c for c in r["per_client"] if c["client"] == 1) for r in metrics["rounds"]]
        assert [(c["status"], c["examples"]) for c in own] == [("ok", 30)] * 2, own
        assert [c["feature_cache_hit"] for c in own] == [0, 1], own
        print(f"\ndeployment test: {time.monotonic() - started:.1f}s to the run's end; `flwr run` {t_run:.1f}s, "
              f"ServerApp {metrics.get('wall_seconds', float('nan')):.1f}s, rounds "
              + ", ".join(f"{r['seconds']:.1f}s" for r in metrics["rounds"]))

        # --- a key the SuperLink does not know: activation refused, the SuperNode exits ---
        rogue = deployment.start_supernode(0, 2, link_port, node_ports[2], root_cert=ca, key=keys["unregistered"],
                                           name="supernode-unregistered-key")
        try:
            rc = deployment.procs[rogue].wait(timeout=120.0)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the SuperNode with an unregistered key still runs\n{deployment.tail()}") from None
        assert rc != 0
        assert "Failed to activate SuperNode" in deployment.log(rogue)
        assert "No SuperNode found with the given public key" in deployment.log("superlink")

        # --- a plaintext SuperNode: no TLS handshake, so not one request reaches the Fleet API ---
        joins = len(re.findall(FLEET_JOIN, deployment.log("superlink")))
        assert joins >= 3, joins  # the two registered SuperNodes and the refused one are in the log
        plain = deployment.start_supernode(1, 2, link_port, node_ports[3], name="supernode-plaintext")
        deployment.wait_for_log(plain, r"Connection attempt failed", count=2, timeout=90.0)
        # still trying (flower-supernode retries without limit by default), never let in
        assert deployment.procs[plain].poll() is None, deployment.log(plain)[-2000:]
        assert len(re.findall(FLEET_JOIN, deployment.log("superlink"))) == joins

        # --- what the SuperLink knows: the two registered nodes, both online, no other ---
        nodes = cli_json(deployment, "flwr-supernode-list", ["supernode", "list", CONNECTION])["nodes"]
        assert {str(n["node-id"]): n["status"] for n in nodes} == {nid: "online" for nid in registered}, nodes
        print(f"\nTLS + SuperNode auth: run {run.get('run-id', '?')} over TLS with nodes {sorted(registered.values())}; "
              f"unregistered key refused (exit {rc}); plaintext SuperNode never reached the Fleet API")
    except BaseException:
        print(deployment.tail())
        raise
