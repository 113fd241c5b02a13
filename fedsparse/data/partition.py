"""Who holds which training examples: seeded partitioners (iid, Dirichlet label skew, shards,
full), one client per sub-folder (folders), and a client's share of a training set; the bundled
sample split into one folder per emulated device (``split_sample``)."""

from __future__ import annotations

import numbers
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fedsparse.caches import ProcessCache
from fedsparse.data.datasets import ImageSet, load_splits

PARTITIONERS = ("iid", "dirichlet", "shards", "full", "folders")  # folders: fedsparse.task.client_images

def partition_indices(
    labels: np.ndarray, num_partitions: int, partitioner: str = "iid", seed: int = 0, alpha: float = 0.5
) -> list[np.ndarray]:
    """Split example indices among ``num_partitions`` clients, reproducibly from ``seed``.

    - ``iid``: a seeded permutation cut into near-equal parts.
    - ``dirichlet``: per class, shares drawn from Dirichlet(alpha) (label skew); redrawn
      until every client holds at least one example (after 100 draws, the last one's empty
      clients get one example each from the largest clients).
    - ``shards``: examples sorted by label, cut into ``2 * num_partitions`` shards, two per client.

    Returns:
        one sorted ``int64`` index array per partition; together they cover every example once.
    """
    n = len(labels)
    if num_partitions < 1 or num_partitions > n:
        raise ValueError(f"cannot split {n} examples into {num_partitions} partitions "
                         f"(num-clients, or a SuperNode's num-partitions, must be in [1, {n}])")
    rng = np.random.default_rng(seed)
    if partitioner == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif partitioner == "dirichlet":
        parts = _dirichlet(labels, num_partitions, rng, alpha)
    elif partitioner == "shards":
        if 2 * num_partitions > n:
            raise ValueError(f"partitioner shards needs 2 examples per partition: {n} examples cannot make "
                             f"{2 * num_partitions} shards for {num_partitions} partitions")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, 2 * num_partitions)
        pick = rng.permutation(2 * num_partitions)
        parts = [np.concatenate([shards[pick[2 * i]], shards[pick[2 * i + 1]]]) for i in range(num_partitions)]
    else:
        raise ValueError(f"Unknown partitioner {partitioner!r}; valid: iid, dirichlet, shards")
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(labels: np.ndarray, k: int, rng: np.random.Generator, alpha: float, tries: int = 100) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for b, chunk in zip(buckets, np.split(idx, cuts)):
                b.append(chunk)
        parts = [np.concatenate(b) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
    # Small alpha and many clients (alpha 0.1 for 1,000 clients of CIFAR-10 leaves ~30 empty in
    # every draw): keep the last draw and give each empty client one example of the largest client.
    for i in [i for i, p in enumerate(parts) if len(p) == 0]:
        big = max(range(k), key=lambda j: len(parts[j]))
        parts[i], parts[big] = parts[big][-1:], parts[big][:-1]
    return parts


def check_partition_id(partition_id: object, num_partitions: object) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` as ints, or a one-line ``ValueError`` that says what a
    SuperNode's ``--node-config`` must hold."""
    usage = "start the SuperNode with --node-config 'partition-id=<i> num-partitions=<n>', 0 <= i < n"
    values = []
    for key, value in (("partition-id", partition_id), ("num-partitions", num_partitions)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise ValueError(f"node config {key} must be an integer, got {value!r}; {usage}")
        try:
            number = int(value) if isinstance(value, (numbers.Integral, str)) or float(value).is_integer() else None
        except ValueError:
            number = None
        if number is None:
            raise ValueError(f"node config {key} must be an integer, got {value!r}; {usage}")
        values.append(number)
    pid, n = values
    if n < 1:
        raise ValueError(f"node config num-partitions must be >= 1, got {n}; {usage}")
    if not 0 <= pid < n:
        raise ValueError(f"node config partition-id {pid} is out of range for num-partitions {n} "
                         f"(valid: 0..{n - 1}); {usage}")
    return pid, n


def client_split(
    train: ImageSet, partition_id: int, num_partitions: int, partitioner: str, seed: int, alpha: float
) -> ImageSet:
    """The training images of client ``partition_id``.

    ``partitioner = "full"`` is the authors' setting: every client (IST worker) reads the whole
    training set, and IST is pure model parallelism. Their features share one cache entry.
    """
    check_partition_id(partition_id, num_partitions)
    if partitioner == "full":
        return train
    if partitioner == "folders":
        raise ValueError("partitioner folders takes each client's images from its own sub-folder of data-dir, "
                         "not from a split of one training set (fedsparse.task.client_images)")
    parts = _cached_partition(train, num_partitions, partitioner, seed, alpha)
    return train.subset(parts[partition_id])


_PARTITIONS: ProcessCache[list[np.ndarray]] = ProcessCache("partitions", 4)


def _cached_partition(train: ImageSet, num_partitions: int, partitioner: str, seed: int, alpha: float) -> list[np.ndarray]:
    """``partition_indices`` once per process and setting: a simulation worker serves many
    clients, and a Dirichlet split of 50,000 labels among 1,000 clients takes ~0.1 s."""
    key = (train.fingerprint, len(train), num_partitions, partitioner, seed, alpha)
    return _PARTITIONS.get_or_make(key, lambda: partition_indices(train.labels, num_partitions, partitioner, seed, alpha))


def partition_sizes(train: ImageSet, num_partitions: int, partitioner: str, seed: int, alpha: float) -> list[int]:
    """How many training images each partition holds (the most examples its client can have)."""
    if partitioner == "full":
        return [len(train)] * num_partitions
    return [len(p) for p in _cached_partition(train, num_partitions, partitioner, seed, alpha)]


def folder_client(names: tuple[str, ...], partition_id: int, num_partitions: int) -> str:
    """``partitioner = "folders"``: the sub-folder of client ``partition_id`` (the folders
    sorted by name), after checking that there is exactly one folder per client."""
    check_partition_id(partition_id, num_partitions)
    if num_partitions != len(names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(f"partitioner folders: num-clients (or a SuperNode's num-partitions) is {num_partitions}, "
                         f"but data-dir holds {len(names)} client folders ({shown}); they must be equal")
    return names[partition_id]


NODE_DATA_KEY = "data-dir"  # node config: the node's own images, <class>/<image>
NODE_CLIENT_KEY = "client-id"  # node config: the id of a node with its own data (optional)


@dataclass(frozen=True)
class NodeData:
    """What a SuperNode's node config says about its data: a partition of the run's data set
    (``client_id`` = partition id, ``data_dir`` empty) or its own images (``data_dir``, with
    ``client_id`` from ``client-id`` or None)."""

    client_id: int | None
    num_partitions: int
    data_dir: str = ""


def node_data(node_config: Mapping[str, Any]) -> NodeData:
    """A node config's data keys, checked: ``data-dir`` (an existing folder) with an optional
    ``client-id >= 0``, or ``partition-id`` and ``num-partitions``; a one-line ``ValueError``
    saying what to write otherwise."""
    usage = ("start the SuperNode with --node-config \"data-dir='/path/to/class-folders'\" (optionally client-id=<i>) "
             "or --node-config 'partition-id=<i> num-partitions=<n>'")
    if NODE_DATA_KEY not in node_config:
        missing = [k for k in ("partition-id", "num-partitions") if k not in node_config]
        if missing:
            raise ValueError(f"node config lacks {missing[0]!r}; {usage}")
        pid, n = check_partition_id(node_config["partition-id"], node_config["num-partitions"])
        return NodeData(pid, n)
    data_dir = node_config[NODE_DATA_KEY]
    if not isinstance(data_dir, str) or not data_dir.strip():
        raise ValueError(f"node config data-dir must be a folder path (a TOML string: data-dir='/path'), "
                         f"got {data_dir!r}")
    both = [k for k in ("partition-id", "num-partitions") if k in node_config]
    if both:
        raise ValueError(f"node config has both data-dir and {both[0]}; a node trains on its own data or on a "
                         "partition of the run's data set, not both")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"node config data-dir {folder} is {'not a folder' if folder.exists() else 'not found'}; "
                         "it must hold the node's images as <class>/<image>")
    cid = node_config.get(NODE_CLIENT_KEY)
    if cid is not None:
        ok = isinstance(cid, numbers.Integral) and not isinstance(cid, bool) and 0 <= cid < 2**63
        if not ok:
            raise ValueError(f"node config client-id must be an integer >= 0 (client-id=3), got {cid!r}")
        cid = int(cid)
    return NodeData(cid, 1, str(folder))


def split_sample(dest: Path, devices: int, images: int, test_images: int, seed: int, cache_dir: str = "") -> Path:
    """The bundled sample as one folder per device (``images`` each, spread over every class, no
    image in two folders) plus ``test/`` (``test_images``, spread over every class): the layout
    of ``partitioner = "folders"`` (``fedsparse devices`` without ``--data-dir``)."""
    train, test = load_splits("cifar10-sample", "", cache_dir)
    if devices * images > len(train):
        raise ValueError(f"--images-per-device {images} x {devices} devices exceeds the sample's {len(train)} training images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    # round-robin over classes so that every device holds every class
    by_class = [order[train.labels[order] == c] for c in range(len(train.classes))]
    picks = [idx for row in zip(*by_class) for idx in row]
    for d in range(devices):
        for i in picks[d * images:(d + 1) * images]:
            _copy(train.root / train.paths[i], dest / f"device-{d}" / Path(train.paths[i]).relative_to("train"))
    order = rng.permutation(len(test))
    by_class = [order[test.labels[order] == c] for c in range(len(test.classes))]
    for i in [idx for row in zip(*by_class) for idx in row][:test_images]:
        _copy(test.root / test.paths[i], dest / "test" / Path(test.paths[i]).relative_to("test"))
    return dest


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
