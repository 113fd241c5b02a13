"""Flower's Arrays between the Simulation Engine's processes through shared-memory files.

Flower's Ray backend hands every message to a client actor as a Ray task argument and gets
the reply back as the task's result. Ray puts anything over 100 kB (a slice of the head is
1.5 MB) in its object store, and on this project's 2-core machines that costs a fixed 4-5 ms
per object and direction on top of the copy (``benchmarks/ray_transport.py``): about 10 ms of
every client's round trip, more than all the server's own work in a round.

``install`` registers a Ray serializer for ``flwr.app.Array`` (``ray.util.register_serializer``,
public API): an Array of at least ``MIN_BYTES`` is written to a file in a shared-memory
directory and only its name travels through Ray; the receiving process reads it back into an
identical Array (same dtype, shape, stype and bytes, so the same wire size and object id)
and deletes the file. Smaller Arrays travel through Ray as before. The receiving side needs
nothing registered: the reader is a function of this module that Ray unpickles by reference,
and the first time it runs in an actor it registers the serializer there too, so the
actor's replies take the same path.

Where a file cannot be written (a full or small ``/dev/shm``: containers often give it 64 MB)
the Array goes through Ray as before (counted as ``inline``). Each file is read once: Flower's backend deserializes a task's arguments once in the actor
and a result once in ``ray.get``. ``fedsparse run`` gives every run its own directory and
removes it when the run ends, with whatever a killed actor left in it; directories of
killed runs (their process gone) are removed by the next run (``sweep_stale``).
``FEDSPARSE_RAY_ARRAYS=off`` keeps Ray's own path (for comparison).

On a Ray cluster a file in one machine's ``/dev/shm`` cannot be read on another, so the files
are used only between processes on the same Ray node: every sender knows its own node, and
where its Arrays go (``sending_to``: the driver, per client actor, ``strategies.simulation``
sets it; an actor replies to the process that sent it the task, whose node came with the
task's Arrays). An Array for another node, or for a node nobody named, travels through Ray
(its object store, for big ones) and is counted in ``CROSS_NODE``. The members of an IST
group are sent the same slice (the same Array objects): before a message leaves for another
node, ``share`` puts each of its big Arrays in the object store once (``CROSS_NODE["put"]``)
and the message carries only the reference, so a round puts each slice once rather than once
per client, and Ray's object manager moves it to each node once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from flwr.app import Array

from fedsparse import processes

MIN_BYTES = 64 * 1024  # smaller Arrays stay in the pickle (Ray sends those inline, cheaply)
MIN_BYTES_VAR = "FEDSPARSE_RAY_ARRAYS_MIN_BYTES"  # another threshold (tests send every Array through a file)
PREFIX = "fedsparse-arrays-"  # + "<pid of the run>-<random>"

_dir: str | None = None  # this process's directory for the Arrays it sends
_node: str | None = None  # this process's Ray node id
_peer: str | None = None  # an actor: the node of the process that sends it tasks (the driver)
_destination = threading.local()  # .node: the node the Arrays this thread serializes go to
# Arrays this process sent and received through files, and big ones it sent through Ray (no file)
COUNTS = {"sent": 0, "received": 0, "inline": 0}
# big Arrays sent through Ray because the receiver is on another node (or on none named), and
# big ones received that way from another node
# ("by_ref": of those sent, the ones that carried a reference put once by ``share``; "put": the puts)
CROSS_NODE = {"sent": 0, "received": 0, "put": 0, "by_ref": 0}
# big Arrays put in the object store once for receivers on other nodes: id(Array) -> (Array, ObjectRef)
# (the Array is kept so that its id is not reused); the last SHARED_KEEP, a few rounds' slices
_shared: dict[int, tuple[Array, Any]] = {}
SHARED_KEEP = 64


def shm_root() -> Path:
    """Where the files go: ``/dev/shm`` (memory, not disk) where it exists, else the temp dir."""
    return Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


def enabled() -> bool:
    return os.environ.get("FEDSPARSE_RAY_ARRAYS", "on").lower() not in ("off", "0", "false", "no")


def make_run_dir() -> Path:
    """A fresh directory for one run's files (``<root>/fedsparse-arrays-<pid>-<random>``)."""
    path = shm_root() / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    return path


def sweep_stale(root: Path | None = None, prefix: str = PREFIX) -> list[Path]:
    """Remove the directories ``<prefix><pid>-...`` in ``root`` (default: this module's, in
    shared memory) of runs whose process is gone (a killed run's leftovers)."""
    removed = []
    root = root or shm_root()
    for path in root.glob(f"{prefix}*"):
        try:
            pid = int(path.name[len(prefix):].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not processes.exists(pid) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def sending_to(node: str | None) -> Iterator[None]:
    """Arrays serialized by this thread inside the block go to Ray node ``node`` (None: unknown,
    so through Ray)."""
    before = getattr(_destination, "node", None)
    _destination.node = node
    try:
        yield
    finally:
        _destination.node = before


def _min_bytes() -> int:
    return int(os.environ.get(MIN_BYTES_VAR, MIN_BYTES))


def share(arrays: Iterable[Array], put: Callable[[bytes], Any] | None = None) -> None:
    """Put each big Array of ``arrays`` (a message for another node) in Ray's object store,
    once per Array object (``put``: ``ray.put``); ``_pack`` then sends the reference."""
    if _dir is None:
        return
    if put is None:
        import ray

        put = ray.put
    for array in arrays:
        hit = _shared.get(id(array))
        if (hit is not None and hit[0] is array) or len(array.data) < _min_bytes():
            continue
        _shared[id(array)] = (array, put(array.data))
        CROSS_NODE["put"] += 1
        while len(_shared) > SHARED_KEEP:
            _shared.pop(next(iter(_shared)))


def _fetch(ref: Any) -> bytes:
    """The bytes ``share`` put in Ray's object store (from this node's copy once fetched)."""
    import ray

    return ray.get(ref)


def _pack(array: Array) -> tuple[Any, ...]:
    """``array`` as Ray will pickle it: its fields, with big data swapped for a file name when
    the receiver is on this node; and where it came from (this run's directory, this node)."""
    data = array.data
    origin = (_dir, _node) if _dir is not None else None
    if _dir is None or len(data) < _min_bytes():
        return (array.dtype, array.shape, array.stype, data, None, None, origin)
    destination = getattr(_destination, "node", None) or _peer
    if destination is None or destination != _node:  # another machine cannot open this node's file
        CROSS_NODE["sent"] += 1
        hit = _shared.get(id(array))
        if hit is not None and hit[0] is array:  # put once (``share``): only the reference travels
            CROSS_NODE["by_ref"] += 1
            return (array.dtype, array.shape, array.stype, None, None, len(data), origin, hit[1])
        return (array.dtype, array.shape, array.stype, data, None, None, origin)
    path = os.path.join(_dir, uuid.uuid4().hex)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError:  # a full or small /dev/shm (containers often give it 64 MB), a removed directory: Ray's path
        try:
            os.unlink(path)
        except OSError:
            pass
        COUNTS["inline"] += 1
        return (array.dtype, array.shape, array.stype, data, None, None, origin)
    COUNTS["sent"] += 1
    return (array.dtype, array.shape, array.stype, None, path, len(data), origin)


def _unpack(fields: tuple[Any, ...]) -> Array:
    """The Array ``_pack`` described (reading and deleting its file); registers the serializer
    in this process first, so that what it sends back takes the same path (or Ray's, when the
    sender is on another node)."""
    dtype, shape, stype, data, path, size, origin, *ref = fields
    if origin is not None and _dir is None:
        install(origin[0], peer=origin[1])
    if ref:  # put once by the sender (``share``)
        data = _fetch(ref[0])
        if len(data) != size:
            raise RuntimeError(f"an array shared through Ray's object store holds {len(data)} bytes, expected {size}")
    if path is None and origin is not None and origin[1] != _node and len(data) >= _min_bytes():
        CROSS_NODE["received"] += 1
    if path is not None:
        if origin is not None and origin[1] != _node:
            raise RuntimeError(f"shared-memory array {path} was written on Ray node {origin[1]} and cannot be read "
                               f"on node {_node}")
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            os.unlink(path)
        except FileNotFoundError:
            raise RuntimeError(f"shared-memory array {path} is gone (its run ended, or it was read twice)") from None
        if len(data) != size:
            raise RuntimeError(f"shared-memory array {path} holds {len(data)} bytes, expected {size}")
        COUNTS["received"] += 1
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def this_node() -> str | None:
    """This process's Ray node id, once ``install`` ran (else None)."""
    return _node


def node_id(_: Any = None) -> str:
    """This process's Ray node id (the argument: an actor, when Ray calls it as the actor's
    ``__ray_call__``)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def install(directory: str | Path, peer: str | None = None) -> None:
    """Send this process's big Arrays through files in ``directory`` (Ray must be running) to
    receivers on this Ray node; ``peer``: the node it answers (an actor: the driver's)."""
    import ray

    global _dir, _node, _peer
    _dir = str(directory)
    _node = node_id()
    _peer = peer
    COUNTS.update(sent=0, received=0, inline=0)
    CROSS_NODE.update(sent=0, received=0, put=0, by_ref=0)
    _shared.clear()
    ray.util.register_serializer(Array, serializer=_pack, deserializer=_unpack)


def uninstall() -> None:
    """Back to Ray's own serialization of Arrays in this process."""
    import ray

    global _dir, _node, _peer
    _dir = _node = _peer = None
    _shared.clear()
    try:
        ray.util.deregister_serializer(Array)
    except Exception:  # noqa: BLE001 - Ray already shut down: nothing registered any more
        pass
