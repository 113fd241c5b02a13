"""The long-lived local client worker: one process per SuperNode and run that keeps torch, the
model code and the run's config loaded, so that the ``flwr-clientapp`` process Flower starts
for every message stays thin (no torch: it forwards the message here and returns the reply).

Turned on by the SuperNode's node config ``client-worker = true`` (``fedsparse devices
--client-worker``); off, nothing here runs. docs/deployment.md ("A long-lived client worker")
says what it costs and buys. The design:

- **Who starts it.** The first thin ClientApp of a run on a node (``forward``) finds no worker
  at the socket ``<dir>/<node id>-<run id>.sock`` and starts one, detached (a session of its
  own), with its own environment (so it stays in the SuperNode's cgroup and carries whatever
  the SuperNode's environment carries); later messages of the run connect to it. ``<dir>`` is
  private: created with mode 0700, refused when it is not the user's own with that mode.
  A lock file serialises the start, so two messages never start two workers. A worker that
  extracted features (a cold cache: the encoder loaded, the extraction's memory held)
  exits after that reply, so that the rounds after it run in a worker that only trains; a new
  worker waits until the previous one is gone (a lock it holds for life), so their memory
  never adds up.
- **How it ends.** It watches the SuperNode (the ``flower-supernode`` the thin app descends from;
  its pid and start time, so a reused pid does not keep it alive) and exits within a second of
  its exit; it exits after ``client-worker-idle`` seconds without a message (default
  ``IDLE_SECONDS``); on SIGTERM or SIGINT. It removes its socket on the way out.
- **If it dies mid-message** (a crash, an OOM kill, a SIGKILL), the thin app handles that message
  in its own process, as it would without a worker (importing torch then), and logs one line;
  the next message starts a fresh worker. An exception in the ClientApp is not a crash: the
  worker answers with the error reply Flower builds for a raising ClientApp.
- **The wire.** Length-prefixed frames on a Unix socket: Flower's own protobuf encoding of the
  ``Message`` and ``Context`` (``flwr.common.serde``), no pickle. The reply comes back the same
  way, with the context (its ``state``) the ClientApp left.
- **The timeline.** The reply keeps the worker's stamps (features ready, trained, reply built);
  the thin app puts its own process start and imports-done stamps in, so "imports" is the
  thin process's, and "features" starts with the hand-off to the worker.

Nothing at module level imports torch or fedsparse's heavy modules: the thin app imports this.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsparse import processes

ENABLE_KEY = "client-worker"  # node config: true to forward messages to a long-lived worker
IDLE_KEY = "client-worker-idle"  # node config: seconds without a message before the worker exits
IDLE_SECONDS = 300.0
DIR_VAR = "FEDSPARSE_CLIENT_WORKER_DIR"  # where the sockets go (default: a private folder in /tmp)
WATCH_VAR = "FEDSPARSE_CLIENT_WORKER_WATCH"  # pid to watch instead of the SuperNode (tests)
START_TIMEOUT = 600.0  # seconds the first message waits for a worker to listen
WATCH_INTERVAL = 1.0
MODULE = "clients.worker"
FEATURES_MODULE = "fedsparse.inputs.features"  # its encoder_loaded(): a message extracted features


class WorkerLost(RuntimeError):
    """The worker ended before it answered (crash, kill): the thin app handles the message itself."""


# --- node config ----------------------------------------------------------------------------------


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"node config {key} must be true or false, got {value!r}")


def worker_enabled(node_config: Any) -> bool:
    """Whether this node forwards its messages to a worker (node config ``client-worker``)."""
    return _flag(node_config.get(ENABLE_KEY, False), ENABLE_KEY)


def idle_seconds(node_config: Any) -> float:
    value = node_config.get(IDLE_KEY, IDLE_SECONDS)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"node config {IDLE_KEY} must be a number of seconds > 0, got {value!r}")
    return seconds


# --- processes (fedsparse.processes) ----------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start) of ``pid``, or None when it is gone (or a zombie)."""
    return processes.parent_and_start(pid)


def _cmdline(pid: int) -> list[str]:
    return processes.command_line(pid)


def node_process() -> int:
    """The pid the worker lives as long as: ``$FEDSPARSE_CLIENT_WORKER_WATCH``, else the nearest
    ancestor that runs ``flower-supernode``, else this process's parent (Flower's SuperExec)."""
    if os.environ.get(WATCH_VAR):
        return int(os.environ[WATCH_VAR])
    pid = os.getppid()
    while pid > 1:
        if any(Path(a).name == "flower-supernode" for a in _cmdline(pid)[:2]):
            return pid
        st = _stat(pid)
        if st is None:
            break
        pid = st[0]
    return os.getppid()


def workers_of(node_pid: int) -> list[int]:
    """The live worker processes that watch ``node_pid`` (a detached worker is no longer in its
    SuperNode's process tree)."""
    return [p.pid for p in processes.watching(node_pid) if MODULE in " ".join(processes.command_line(p.pid))]


# --- where the socket is -----------------------------------------------------------------------------


def socket_dir() -> Path:
    """A folder only this user can enter (0700), for the workers' sockets; one line when the
    folder exists but is someone else's or open to others."""
    base = os.environ.get(DIR_VAR) or os.path.join(tempfile.gettempdir(), f"fedsparse-workers-{os.getuid()}")
    path = Path(base)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as err:
        raise ValueError(f"client worker: cannot use {path}: {err.strerror}") from None
    if not path.is_dir() or path.is_symlink() or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"client worker: {path} must be a folder of this user with mode 0700 "
                         f"(it is mode {st.st_mode & 0o777:o}, uid {st.st_uid}); remove it or set {DIR_VAR}")
    return path


def socket_path(node_id: int, run_id: int) -> Path:
    return socket_dir() / f"{node_id}-{run_id}.sock"


# --- frames -------------------------------------------------------------------------------------------


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(struct.pack("!I", len(frames)) + b"".join(struct.pack("!Q", len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise WorkerLost("connection closed")
        buf += chunk
    return bytes(buf)


def recv_frames(sock: socket.socket) -> list[bytes]:
    (count,) = struct.unpack("!I", _recv_exact(sock, 4))
    frames = []
    for _ in range(count):
        (size,) = struct.unpack("!Q", _recv_exact(sock, 8))
        frames.append(_recv_exact(sock, size))
    return frames


# --- the thin side ------------------------------------------------------------------------------------


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _app_dir() -> str:
    """The folder ``clients`` was imported from (the unpacked FAB under a SuperNode)."""
    return str(Path(__file__).resolve().parents[1])


def start_worker(path: Path, idle: float) -> subprocess.Popen:
    """Start a worker listening at ``path``, detached from this process (its own session)."""
    watch = node_process()
    st = _stat(watch)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_app_dir(), env.get("PYTHONPATH", "")) if p)
    env.pop(WATCH_VAR, None)
    log = open(path.with_suffix(".log"), "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", MODULE, "--socket", str(path),
                                 "--watch", f"{watch}:{st[1] if st else 0}", "--idle", str(idle)],
                                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    finally:
        log.close()


def connect_or_start(node_id: int, run_id: int, idle: float) -> socket.socket:
    """A connection to this node's worker for the run, starting it when there is none."""
    path = socket_path(node_id, run_id)
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time; the others then find it listening
        sock = _connect(path)
        if sock is not None:
            return sock
        try:
            path.unlink()  # a dead worker's socket
        except FileNotFoundError:
            pass
        proc = start_worker(path, idle)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                raise WorkerLost(f"it exited with status {proc.returncode} while starting "
                                 f"(log: {path.with_suffix('.log')})")
            time.sleep(0.02)
        raise WorkerLost(f"it did not listen within {START_TIMEOUT:.0f} s")


def exchange(msg: Any, context: Any) -> tuple[Any, Any]:
    """Send ``msg`` and ``context`` to this node's worker; its (reply, context state)."""
    from flwr.common.serde import context_to_proto, message_from_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    sock = connect_or_start(context.node_id, context.run_id, idle_seconds(context.node_config))
    with sock:
        try:
            send_frames(sock, message_to_proto(msg).SerializeToString(), context_to_proto(context).SerializeToString())
            reply_bytes, state_bytes = recv_frames(sock)
        except OSError as err:
            raise WorkerLost(str(err)) from None
    reply = message_from_proto(ProtoMessage.FromString(reply_bytes))
    return reply, recorddict_from_proto(ProtoRecordDict.FromString(state_bytes))


# --- the worker ---------------------------------------------------------------------------------------


def handle(app: Any, msg_bytes: bytes, context_bytes: bytes) -> tuple[bytes, bytes]:
    """One message through the full ClientApp (its mods included): the reply, or the error reply
    Flower builds for a ClientApp that raised; and the context's state afterwards."""
    from flwr.common.serde import context_from_proto, message_from_proto, message_to_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.proto.message_pb2 import Context as ProtoContext

    from clients.mods import _raised

    msg = message_from_proto(ProtoMessage.FromString(msg_bytes))
    context = context_from_proto(ProtoContext.FromString(context_bytes))
    try:
        reply = app(msg, context)
    except Exception as err:  # noqa: BLE001 - Flower's runtime answers any exception this way
        print(f"client worker: the ClientApp raised {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        reply = _raised(msg, err)
    return message_to_proto(reply).SerializeToString(), recorddict_to_proto(context.state).SerializeToString()


def _trim() -> None:
    """Give the heap the message freed back to the system (glibc), so that an idle worker holds
    what it keeps loaded, not its last message's peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Stop(BaseException):  # not an Exception: a signal mid-message must not become an error reply
    pass


def serve(path: Path, watch: tuple[int, int], idle: float) -> str:
    """Listen at ``path`` and answer messages until the watched process ends, ``idle`` seconds
    pass without a message, or a signal comes; returns why it stopped."""
    def stop(signum: int, _frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # held until this process is gone (the kernel drops it): a worker that follows one that ended
    # (after extracting) waits here until its memory is free, so the two never add up
    alive = open(path.with_suffix(".alive"), "w")
    fcntl.flock(alive, fcntl.LOCK_EX)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        server.bind(str(path))  # listening before the imports: the first message waits in the backlog
    finally:
        os.umask(old)
    server.listen(8)
    server.settimeout(WATCH_INTERVAL)
    print(f"client worker {os.getpid()} listening at {path}", file=sys.stderr, flush=True)
    try:
        from clients.client_app import app  # torch, fedsparse: once, for every message of the run

        last = time.monotonic()
        while True:
            st = _stat(watch[0])
            if st is None or (watch[1] and st[1] != watch[1]):
                return f"its SuperNode (pid {watch[0]}) ended"
            if time.monotonic() - last > idle:
                return f"idle for {idle:.0f} s"
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    msg_bytes, context_bytes = recv_frames(conn)
                    send_frames(conn, *handle(app, msg_bytes, context_bytes))
                except (WorkerLost, OSError, ValueError) as err:  # the thin app went away: wait for the next
                    print(f"client worker: a message was dropped: {err}", file=sys.stderr, flush=True)
            features = sys.modules.get(FEATURES_MODULE)  # read, never imported here (the thin app has no torch)
            if features is not None and features.encoder_loaded():  # the encoder and extraction's memory stay
                return "it extracted features (the next message starts a worker without the encoder)"
            _trim()
            last = time.monotonic()
    except _Stop as sig:
        return f"{sig}"
    finally:
        server.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--watch", required=True, help="pid:start-ticks of the process to outlive not")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS)
    args = parser.parse_args(argv)
    pid, _, ticks = args.watch.partition(":")
    why = serve(args.socket, (int(pid), int(ticks or 0)), args.idle)
    print(f"client worker {os.getpid()} stopped: {why}", file=sys.stderr, flush=True)
    os._exit(0)  # now: the interpreter's teardown of torch takes seconds, holding the memory


if __name__ == "__main__":
    sys.exit(main())
