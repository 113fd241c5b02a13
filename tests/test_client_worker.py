"""The long-lived client worker (``clients.worker``, node config ``client-worker = true``).

Each thin ClientApp runs in a fresh interpreter, as Flower's ``flwr-clientapp`` does: it reads
the Message and Context (Flower's protobuf) from files, calls ``clients.thin_app.app`` and
writes the reply. A ``sleep`` process stands for the SuperNode the worker watches
(``FEDSPARSE_CLIENT_WORKER_WATCH``); the sockets go to a private folder of the test's own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from clients import worker
from clients.client_app import app as full_app
from fedsparse.config import RunConfig
from fedsparse.protocol import (ARRAYS_KEY, CONFIG_KEY, FEATURES_READY_KEY, IMPORTS_DONE_KEY, METRICS_KEY,
                                PROCESS_START_KEY, TRAINED_KEY)
from fedsparse.task import initial_head
from strategies.flower_internals import set_task_identity

ROOT = Path(__file__).resolve().parents[1]

# a flwr-clientapp process: one message through the thin app; prints what it imported and its reply's path
THIN = r"""
import json, sys, time
t0 = time.time()
from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as PC, Message as PM
import clients.thin_app as thin
msg = message_from_proto(PM.FromString(open(sys.argv[1], "rb").read()))
ctx = context_from_proto(PC.FromString(open(sys.argv[2], "rb").read()))
reply = thin.app(msg, ctx)
open(sys.argv[3], "wb").write(message_to_proto(reply).SerializeToString())
print(json.dumps({"torch": "torch" in sys.modules, "t0": t0}))
"""


@pytest.fixture(autouse=True)
def task_identity():
    set_task_identity()


@pytest.fixture
def node(monkeypatch):
    """A stand-in SuperNode (a sleeping process), and a private socket folder, for one test;
    afterwards no worker of it is left."""
    sock_dir = Path(tempfile.mkdtemp(prefix="fsw-"))  # short: a Unix socket path has at most 107 bytes
    sleeper = subprocess.Popen(["sleep", "600"])
    monkeypatch.setenv(worker.WATCH_VAR, str(sleeper.pid))
    monkeypatch.setenv(worker.DIR_VAR, str(sock_dir / "w"))
    yield sleeper
    sleeper.kill()
    sleeper.wait()
    deadline = time.monotonic() + 10
    while worker.workers_of(sleeper.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = worker.workers_of(sleeper.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(sock_dir, ignore_errors=True)
    assert not left, f"workers left after their node ended: {left}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("worker-cache"))


def train_message(cfg: RunConfig, server_round: int = 1) -> Message:
    state = initial_head(cfg, 192, 10).state_dict()
    conf = ConfigRecord({"server-round": server_round, "local-steps": 3, "lr": 1e-3, "batch-size": 8})
    msg = Message(content=RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: conf}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    return msg


def context(cfg: RunConfig, **node_config) -> Context:
    return Context(run_id=11, node_id=7, node_config={"partition-id": 3, "num-partitions": 50, **node_config},
                   state=RecordDict(), run_config=cfg.to_run_config())


def thin(tmp_path: Path, msg: Message, ctx: Context, name: str) -> tuple[Message, dict]:
    """``msg`` through the thin ClientApp in a fresh interpreter: (reply, what it reported)."""
    paths = [tmp_path / f"{name}.{kind}" for kind in ("msg", "ctx", "reply")]
    paths[0].write_bytes(message_to_proto(msg).SerializeToString())
    paths[1].write_bytes(context_to_proto(ctx).SerializeToString())
    proc = subprocess.run([sys.executable, "-c", THIN, *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["stderr"] = proc.stderr
    return message_from_proto(ProtoMessage.FromString(paths[2].read_bytes())), report


def arrays(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error
    return reply.content[ARRAYS_KEY].to_torch_state_dict()


def wait_until(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_worker_serves_messages_with_the_same_model_and_a_thin_client_app(node, tmp_path, cache):
    """Two messages through two thin ClientApp processes: one worker starts with the first and
    answers both; neither thin process imports torch; each reply is bit for bit the in-process
    ClientApp's; the timeline is the thin process's start and imports, then the worker's work."""
    cfg = RunConfig(hidden="32,32", cache_dir=cache, local_steps=3)
    expected = [arrays(full_app(train_message(cfg, r), context(cfg))) for r in (1, 2)]  # also fills the cache
    assert not worker.workers_of(node.pid)
    pids = []
    for r in (1, 2):
        reply, report = thin(tmp_path, train_message(cfg, r), context(cfg, **{"client-worker": True}), f"r{r}")
        assert report["torch"] is False, "the thin ClientApp imported torch"
        got = arrays(reply)
        assert got.keys() == expected[r - 1].keys()
        assert all(torch.equal(got[k], expected[r - 1][k]) for k in got)
        m = reply.content[METRICS_KEY]
        assert report["t0"] - 1.0 <= m[PROCESS_START_KEY] <= report["t0"]  # the thin process's own start
        assert m[PROCESS_START_KEY] <= m[IMPORTS_DONE_KEY] <= m[FEATURES_READY_KEY] <= m[TRAINED_KEY]
        pids.append(worker.workers_of(node.pid))
    assert len(pids[0]) == 1 and pids[0] == pids[1], f"one worker for both messages, got {pids}"


def test_a_worker_that_extracted_features_makes_way_for_one_that_only_trains(node, tmp_path):
    """A cold cache: the worker extracts (timm, the encoder), answers, and exits; the next
    message starts a worker that reads the cache, and both replies are the in-process ones."""
    cfg = RunConfig(hidden="32,32", cache_dir=str(tmp_path / "cold"), local_steps=3)
    ctx = context(cfg, **{"client-worker": True})
    first, _ = thin(tmp_path, train_message(cfg, 1), ctx, "cold1")
    assert first.content[METRICS_KEY]["feature-cache-hit"] == 0
    log = worker.socket_path(7, 11).with_suffix(".log")
    assert wait_until(lambda: "stopped: it extracted features" in log.read_text()), log.read_text()
    assert wait_until(lambda: not worker.workers_of(node.pid))
    second, _ = thin(tmp_path, train_message(cfg, 2), ctx, "cold2")
    assert second.content[METRICS_KEY]["feature-cache-hit"] == 1
    assert len(worker.workers_of(node.pid)) == 1
    for r, reply in ((1, first), (2, second)):
        expected = arrays(full_app(train_message(cfg, r), context(cfg)))
        got = arrays(reply)
        assert all(torch.equal(got[k], expected[k]) for k in got)


def test_worker_ends_with_its_node_and_when_idle(node, tmp_path, cache, monkeypatch):
    cfg = RunConfig(hidden="32,32", cache_dir=cache, local_steps=3)
    # the features cached first: a worker that extracts them exits after its reply (tested below)
    full_app(train_message(cfg), context(cfg))
    reply, _ = thin(tmp_path, train_message(cfg), context(cfg, **{"client-worker": True}), "a")
    arrays(reply)
    (pid,) = worker.workers_of(node.pid)
    sock = worker.socket_path(7, 11)
    assert sock.exists() and (sock.parent.stat().st_mode & 0o777) == 0o700
    node.kill()
    node.wait()
    assert wait_until(lambda: worker._stat(pid) is None), "the worker outlived its node"
    assert not sock.exists(), "the worker left its socket behind"
    # idle: a worker whose node lives ends after client-worker-idle seconds without a message
    other = subprocess.Popen(["sleep", "600"])
    try:
        monkeypatch.setenv(worker.WATCH_VAR, str(other.pid))
        reply, _ = thin(tmp_path, train_message(cfg), context(cfg, **{"client-worker": "true", "client-worker-idle": 1}), "b")
        arrays(reply)
        (pid,) = worker.workers_of(other.pid)
        assert wait_until(lambda: worker._stat(pid) is None), "the idle worker did not end"
    finally:
        other.kill()
        other.wait()


def test_a_worker_that_dies_mid_message_leaves_it_to_the_thin_client_app(node, tmp_path, cache):
    """The worker at the socket dies on the message it got (as on an OOM kill): the thin app
    says so in one line and answers the message itself, with the same model."""
    cfg = RunConfig(hidden="32,32", cache_dir=cache, local_steps=3)
    expected = arrays(full_app(train_message(cfg), context(cfg)))
    path = worker.socket_path(7, 11)
    dying = subprocess.Popen([sys.executable, "-c",
                              "import os, sys, clients.worker as w\n"
                              "w.handle = lambda *a: os._exit(9)\n"
                              f"w.main(['--socket', sys.argv[1], '--watch', '{node.pid}'])", str(path)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert wait_until(lambda: path.exists(), 120)
        reply, report = thin(tmp_path, train_message(cfg), context(cfg, **{"client-worker": True}), "c")
        assert dying.wait(timeout=30) == 9
    finally:
        if dying.poll() is None:
            dying.kill()
    got = arrays(reply)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    lines = [line for line in report["stderr"].splitlines() if "client worker" in line]
    assert len(lines) == 1 and "lost" in lines[0] and "handling this message in the ClientApp process" in lines[0]


def test_errors_in_the_client_app_come_back_as_flowers_error_reply(node, tmp_path, cache):
    """A ClientApp exception in the worker is the same error reply as in-process, and the worker lives on."""
    cfg = RunConfig(hidden="32,32", cache_dir=cache, local_steps=3)
    bad = train_message(cfg)
    del bad.content[CONFIG_KEY]["lr"]
    ctx = context(cfg, **{"client-worker": True})
    reply, _ = thin(tmp_path, bad, ctx, "bad")
    assert reply.has_error() and "lacks 'lr'" in reply.error.reason
    assert len(worker.workers_of(node.pid)) == 1


def test_bad_worker_settings_are_one_line(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="client-worker must be true or false, got 'maybe'"):
        worker.worker_enabled({"client-worker": "maybe"})
    assert worker.worker_enabled({}) is False
    from fedsparse.commands.cli import check_node_config

    with pytest.raises(ValueError, match="client-worker must be true or false, got 'maybe'"):
        check_node_config(RunConfig(), "partition-id=0 num-partitions=2 client-worker='maybe'")
    with pytest.raises(ValueError, match="client-worker-idle must be a number of seconds > 0"):
        worker.idle_seconds({"client-worker-idle": 0})
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    monkeypatch.setenv(worker.DIR_VAR, str(open_dir))
    with pytest.raises(ValueError, match="must be a folder of this user with mode 0700"):
        worker.socket_dir()


def test_fedsparse_devices_counts_a_devices_worker_in_its_node_peak(tmp_path):
    """A worker is detached from its SuperNode's process tree; the node's sampled peak
    (``node_peak_rss_mib``) still counts it, found by the SuperNode pid it watches."""
    from fedsparse.commands.devices import Device, MemorySampler
    from fedsparse.profiles import PROFILES

    sleeper = subprocess.Popen(["sleep", "600"])
    # a stand-in worker holding 200 MiB, started after the sampler (as a real one is, by a ClientApp)
    code = "import time\nb = bytearray(200 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\ntime.sleep(60)"
    device = Device(0, PROFILES["tiny"], tmp_path, proc=sleeper)
    sampler = MemorySampler([device], interval=0.1)
    sampler.start()
    fake = subprocess.Popen([sys.executable, "-c", code, worker.MODULE, "--watch", f"{sleeper.pid}:0"])
    try:
        assert wait_until(lambda: device.sampled_peak_bytes > 200 * 2**20, 20), device.sampled_peak_bytes / 2**20
    finally:
        sampler.done.set()
        sampler.join()
        for proc in (fake, sleeper):
            proc.kill()
            proc.wait()
