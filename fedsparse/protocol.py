"""What server and clients say to each other: record keys, arrays, and the size of what they send.

Keys are defined once here and used by the strategies, the ClientApp and the tests.
``wire_bytes``, ``array_record`` and ``torch_state`` are the only Flower-aware functions in
the library (Flower imported lazily), shared by both sides: "bytes down" on the server and
"bytes received" on a client are the same measure, and both encode and decode tensors the
same fast way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

from fedsparse.caches import ProcessCache

ARRAYS_KEY = "arrays"  # ArrayRecord: the (sub-)model
CONFIG_KEY = "config"  # ConfigRecord: round, local-steps, lr, batch-size, subnet
METRICS_KEY = "metrics"  # MetricRecord in replies
NUM_EXAMPLES_KEY = "num-examples"
TRAIN_LOSS_KEY = "train-loss"
BYTES_RECEIVED_KEY = "bytes-received"
BYTES_SENT_KEY = "bytes-sent"
PEAK_RSS_KEY = "peak-rss-bytes"
TENSOR_BYTES_KEY = "train-tensor-bytes"
EXTRACT_SECONDS_KEY = "extract-seconds"
CACHE_HIT_KEY = "feature-cache-hit"
TRAIN_SECONDS_KEY = "train-seconds"
RAY_NODE_KEY = "ray-node"  # a client in a Ray worker: its node (fedsparse.engine.nodes.node_key)
WORKER_PID_KEY = "worker-pid"  # and its process
# a reply's timeline (fedsparse.accounting.timeline): wall-clock stamps, seconds since the epoch
PROCESS_START_KEY = "t-process-start"
IMPORTS_DONE_KEY = "t-imports-done"
FEATURES_READY_KEY = "t-features-ready"
TRAINED_KEY = "t-trained"
REPLY_BUILT_KEY = "t-reply-built"
CLIENT_TASK_KEY = "client-task"  # what a client does with a task (fedsparse.algorithms.base)
CLIENT_ID_KEY = "partition-id"  # a query reply: who the node is
NUM_PARTITIONS_KEY = "num-partitions"
OWN_DATA_KEY = "own-data"  # a query reply: 1 for a node that trains on its own images (node config data-dir)


@dataclass(frozen=True)
class RoundSettings:
    """What every task of a round tells its client besides its algorithm's own settings (the
    server sets them; a client never takes them from its run config). In the message they are
    ``CONFIG_KEY`` entries under ``KEYS``' names; ``to_config`` and ``from_config`` convert at
    that boundary, and everything on either side uses the fields. An algorithm's own settings
    (``subnet``, ``num-subnets``, ``label-aware``, ...) stay string-keyed: each algorithm
    defines its own."""

    server_round: int
    local_steps: int
    lr: float
    batch_size: int

    KEYS: ClassVar[dict[str, str]] = {"server_round": "server-round", "local_steps": "local-steps", "lr": "lr",
                                      "batch_size": "batch-size"}

    def to_config(self) -> dict[str, Any]:
        return {key: getattr(self, name) for name, key in self.KEYS.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RoundSettings":
        """The settings of a task's config, or a one-line error naming the first missing key."""
        missing = [key for key in cls.KEYS.values() if key not in config]
        if missing:
            raise ValueError(f"the server's message lacks {missing[0]!r} (per-round settings come only from the message)")
        c = config
        return cls(int(c["server-round"]), int(c["local-steps"]), float(c["lr"]), int(c["batch-size"]))


def array_record(state: Mapping[str, Any]) -> Any:
    """``flwr.app.ArrayRecord(state)`` for a dict of tensors (or NumPy arrays), byte for byte the
    record Flower builds, in one copy of the data instead of Flower's three (``np.save``
    into a buffer): 0.2 ms instead of 1.5 ms for a 1.5 MB slice, once per message on the
    server and once per reply on a client. What this cannot encode itself (a header that
    needs ``.npy`` version 2, a dtype NumPy lacks) goes through Flower's own ``Array``."""
    from flwr.app import ArrayRecord

    return ArrayRecord({key: _array(value) for key, value in state.items()})


def _array(value: Any) -> Any:
    import io

    import numpy as np
    from flwr.app import Array
    from flwr.common.constant import SType

    try:
        a = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if a.dtype.hasobject:
            raise TypeError("object arrays are not encoded here")
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(a))
    except (TypeError, ValueError, RuntimeError):
        return Array(value)  # Flower's way (and its error, if it has one)
    # the bytes np.save writes after the header: memory order for a C- or Fortran-contiguous
    # array (the header says which), else a C-order copy
    body = a if a.flags.c_contiguous else a.T if a.flags.f_contiguous else a.tobytes()
    data = b"".join((head.getvalue(), body.reshape(-1).view(np.uint8) if isinstance(body, np.ndarray) else body))
    return Array(dtype=str(a.dtype), shape=tuple(int(d) for d in a.shape), stype=SType.NUMPY, data=data)


def torch_state(record: Any) -> dict[str, Any]:
    """``record.to_torch_state_dict()`` for a Flower ``ArrayRecord``: the same tensors (one copy
    of each array's data, writable), without parsing the same ``.npy`` headers every round
    (NumPy parses each with ``ast.literal_eval``): 0.3 ms instead of 1.2 ms for a 1.5 MB
    slice on a loaded machine. Headers are parsed and checked by NumPy's own reader the first
    time they are seen; malformed data raises ``ValueError`` as ``np.load`` would; what this
    does not handle (another stype, ``.npy`` version 3) goes through Flower's own path."""
    import torch

    return {key: torch.from_numpy(_ndarray(array)) for key, array in record.items()}


_HEADERS: ProcessCache[tuple] = ProcessCache("npy headers", 4096)  # header bytes -> (shape, fortran order, dtype)
NPY_MAGIC = b"\x93NUMPY"


def _ndarray(array: Any) -> Any:
    import io

    import numpy as np
    from flwr.common.constant import SType

    data = array.data
    version = data[6:8] if array.stype == SType.NUMPY and data[:6] == NPY_MAGIC else b""
    if version == b"\x01\x00" and len(data) >= 10:
        offset = 10 + int.from_bytes(data[8:10], "little")
    elif version == b"\x02\x00" and len(data) >= 12:
        offset = 12 + int.from_bytes(data[8:12], "little")
    else:
        return array.numpy()  # Flower's reader (and its error)
    head = bytes(data[:offset])
    parsed = _HEADERS.get(head)
    if parsed is None:
        fp = io.BytesIO(head)
        major, _ = np.lib.format.read_magic(fp)
        reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(fp)
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        parsed = _HEADERS.put(head, (tuple(shape), bool(fortran), dtype))
    shape, fortran, dtype = parsed
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"EOF: reading array data, expected {count * dtype.itemsize} bytes got {len(data) - offset}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def wire_bytes(obj: Any) -> int:
    """Serialized size of a Flower ``Message``, ``RecordDict`` or record.

    The sum of the deflated inflatable objects that Flower's transport pushes and pulls
    (array chunks with their ``.npy`` headers, record and message headers), each distinct
    object once, without HTTP or TLS framing: exactly ``wire_bytes_flower``, computed from
    the objects' sizes instead of deflating and hashing all of them. Flower names every
    object by the SHA-256 of its deflated bytes; a name is always 64 characters, so the
    sizes do not depend on the names, and only array chunks of equal length are hashed, to
    find the identical ones that the transport sends once. (``wire_bytes_flower`` costs
    3 ms for a 1.5 MB message, twice per message and side; this costs what hashing the
    rare same-length chunks costs.) Objects of other kinds are sized by Flower itself.
    """
    lengths = Counter(len(c) for c in _chunks_of(obj))
    sizes: dict[tuple, int] = {}
    _size_of(obj, sizes, {n for n, count in lengths.items() if count > 1})
    return sum(sizes.values())


def wire_bytes_flower(obj: Any) -> int:
    """``wire_bytes`` as Flower computes it: every nested object deflated, named by its hash."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


OBJECT_ID_CHARS = 64  # a SHA-256 hex digest: how Flower names an object inside its parent's header


def _deflated_size(cls_name: str, unique_children: int, body_len: int) -> int:
    """Length of Flower's ``add_header_to_object_body``: ``"<class> <id>,<id>,... <body length>"``,
    a NUL, the body."""
    ids = unique_children * OBJECT_ID_CHARS + max(unique_children - 1, 0)
    return len(cls_name.encode("utf-8")) + 1 + ids + 1 + len(str(body_len)) + 1 + body_len


def _size_of(obj: Any, sizes: dict[tuple, int], shared: set[int]) -> tuple:
    """Add ``obj`` and everything in it to ``sizes`` (key: a structural name that is equal
    exactly when Flower's object ids are); return its key. ``shared``: the chunk lengths that
    occur more than once in the whole object (only those chunks are hashed)."""
    import json

    from flwr.app import Array, ArrayRecord, Message, RecordDict

    placeholder = "0" * OBJECT_ID_CHARS
    if isinstance(obj, Message):
        stub = object.__new__(Message)  # the same metadata and error; the content's id has the same length
        stub.__dict__.update(obj.__dict__)
        child = None
        if obj.has_content():
            child = _size_of(obj.content, sizes, shared)
            stub.__dict__["_content"] = RecordDict()
        head = stub.deflate()
        key = ("Message", head, child)
        sizes.setdefault(key, len(head))
        return key
    if isinstance(obj, (RecordDict, ArrayRecord)):
        names = list(obj.keys())
        children = tuple(_size_of(obj[n], sizes, shared) for n in names)
        body = json.dumps({n: placeholder for n in names}).encode("utf-8")
        key = (type(obj).__qualname__, tuple(zip(names, children)))
        sizes.setdefault(key, _deflated_size(type(obj).__qualname__, len(set(children)), len(body)))
        return key
    if isinstance(obj, Array):
        keys = []
        for chunk in _array_chunks(obj):
            keys.append(_chunk_key(chunk, shared))
            sizes.setdefault(keys[-1], _deflated_size("ArrayChunk", 0, len(chunk)))
        unique = list(dict.fromkeys(keys))
        body = json.dumps({"dtype": obj.dtype, "shape": obj.shape, "stype": obj.stype,
                           "arraychunk_ids": [unique.index(k) for k in keys]}).encode("utf-8")
        key = ("Array", obj.dtype, tuple(obj.shape), obj.stype, tuple(keys))
        sizes.setdefault(key, _deflated_size("Array", len(unique), len(body)))
        return key
    if getattr(obj, "children", None):  # a kind this does not know: Flower sizes it
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        for object_id, o in get_all_nested_objects(obj).items():
            sizes.setdefault(("id", object_id), len(o.deflate()))
        return ("id", obj.object_id)
    content = obj.deflate()  # ConfigRecord, MetricRecord: small, no children
    key = (type(obj).__qualname__, content)
    sizes.setdefault(key, len(content))
    return key


def _chunk_key(view: memoryview, shared: set[int]) -> tuple:
    """Key of one ``ArrayChunk`` (its bytes, as Flower slices them): its length where no other
    chunk of the object has that length, else also its SHA-256 (Flower's object id)."""
    if len(view) not in shared:
        return ("ArrayChunk", len(view))
    import hashlib

    return ("ArrayChunk", len(view), hashlib.sha256(view).hexdigest())


def _chunks_of(obj: Any) -> Iterator[memoryview]:
    """Every array chunk in ``obj``, cut as ``Array.slice_array`` cuts them."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    if isinstance(obj, Message):
        if obj.has_content():
            yield from _chunks_of(obj.content)
    elif isinstance(obj, (RecordDict, ArrayRecord)):
        for value in obj.values():
            yield from _chunks_of(value)
    elif isinstance(obj, Array):
        yield from _array_chunks(obj)


def _array_chunks(array: Any) -> Iterator[memoryview]:
    """An ``Array``'s bytes cut as ``Array.slice_array`` cuts them into ``ArrayChunk``s."""
    from flwr.app.message import array as array_module

    step = array_module.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    view = memoryview(array.data)
    for i in range(0, len(view), step):
        yield view[i:i + step]
