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
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from flwr.app import Array

MIN_BYTES = 64 * 1024  # smaller Arrays stay in the pickle (Ray sends those inline, cheaply)
MIN_BYTES_VAR = "FEDSPARSE_RAY_ARRAYS_MIN_BYTES"  # another threshold (tests send every Array through a file)
PREFIX = "fedsparse-arrays-"  # + "<pid of the run>-<random>"

_dir: str | None = None  # this process's directory for the Arrays it sends
# Arrays this process sent and received through files, and big ones it sent through Ray (no file)
COUNTS = {"sent": 0, "received": 0, "inline": 0}


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
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pack(array: Array) -> tuple[Any, ...]:
    """``array`` as Ray will pickle it: its fields, with big data swapped for a file name."""
    data = array.data
    if _dir is None or len(data) < int(os.environ.get(MIN_BYTES_VAR, MIN_BYTES)):
        return (array.dtype, array.shape, array.stype, data, None, None)
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
        return (array.dtype, array.shape, array.stype, data, None, None)
    COUNTS["sent"] += 1
    return (array.dtype, array.shape, array.stype, None, path, len(data))


def _unpack(fields: tuple[Any, ...]) -> Array:
    """The Array ``_pack`` described (reading and deleting its file); registers the serializer
    in this process first, so that what it sends back takes the same path."""
    dtype, shape, stype, data, path, size = fields
    if path is not None:
        if _dir is None:
            install(os.path.dirname(path))
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


def install(directory: str | Path) -> None:
    """Send this process's big Arrays through files in ``directory`` (Ray must be running)."""
    import ray

    global _dir
    _dir = str(directory)
    COUNTS.update(sent=0, received=0, inline=0)
    ray.util.register_serializer(Array, serializer=_pack, deserializer=_unpack)


def uninstall() -> None:
    """Back to Ray's own serialization of Arrays in this process."""
    import ray

    global _dir
    _dir = None
    try:
        ray.util.deregister_serializer(Array)
    except Exception:  # noqa: BLE001 - Ray already shut down: nothing registered any more
        pass
