"""From a RunConfig to tensors: a client's features, the server's test features, the head.

The pieces both sides of a run need, free of Flower: ClientApp and ServerApp are thin
wrappers around these functions, and so are the tests and benchmarks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fedsparse.caches import ProcessCache
from fedsparse.config import RunConfig
from fedsparse.data.datasets import (ImageSet, client_folders, default_cache_dir, folder_test_set, load_splits,
                                     own_images, parse_classes, with_classes)
from fedsparse.data.partition import client_split, folder_client, partition_sizes
from fedsparse.inputs.features import FeatureCache, Features, cached_features, encoder_ref, extract, feature_key
from fedsparse.seeds import derive_seed
from fedsparse.model.head import MLPHead, batch_order, train_steps

log = logging.getLogger("fedsparse")


def features(cfg: RunConfig, images: ImageSet, group: str, server_round: int | None = None,
             cache_only: bool = False) -> Features | None:
    """Masked CLS features of ``images`` with ``cfg``'s encoder, mask, preprocessing and dtype.

    Fixed masks (``per-image``, ``shared``) are served from the feature cache. With
    ``mask-mode = random`` and a ``server_round``, the masks are drawn anew for that round
    (seed derived from ``mask-seed`` and the round) and the features are extracted, uncached;
    without a round (the server's test set) random mode uses the fixed per-image masks.
    ``cache_only``: None instead of extracting (a miss, or fresh random masks).
    """
    encoder = encoder_ref(cfg.encoder, cfg.image_size)  # built only when extracting (a cache miss)
    mode, seed = cfg.mask_mode, cfg.mask_seed
    if mode == "random":
        if server_round is None:
            mode = "per-image"
        else:
            seed = derive_seed("mask", cfg.mask_seed, server_round)
            if cache_only:
                return None
            built = encoder.build()
            t0 = time.perf_counter()
            x, y, skipped = extract(built, images, mask_ratio=cfg.mask_ratio, mask_seed=seed, mask_mode="per-image",
                                    group=group, preprocessing=cfg.preprocessing, dtype=cfg.encoder_dtype)
            return Features(x, y, time.perf_counter() - t0, False, skipped)
    return cached_features(
        encoder,
        images,
        FeatureCache(default_cache_dir(cfg.cache_dir)),
        mask_ratio=cfg.mask_ratio,
        mask_seed=seed,
        mask_mode=mode,
        group=group,
        preprocessing=cfg.preprocessing,
        dtype=cfg.encoder_dtype,
        cache_only=cache_only,
    )


def distinct_partitions(cfg: RunConfig) -> int:
    """How many different client data sets there are: 1 with ``partitioner = "full"`` (every
    client reads the whole training set), else one per client."""
    return 1 if cfg.partitioner == "full" else cfg.num_clients


def run_classes(cfg: RunConfig) -> tuple[str, ...]:
    """The run's class list (a label is a position in it), the same on every device: the
    run-config key ``classes`` when set, else the classes of the server's test set (with
    ``partitioner = "folders"``: ``data-dir/test/``; otherwise the data set's)."""
    return parse_classes(cfg.classes) or _server_test_set(cfg).classes


def _server_test_set(cfg: RunConfig) -> ImageSet:
    if cfg.partitioner == "folders":
        return folder_test_set(client_folders(cfg.data_dir, cfg.cache_dir)[1])
    return load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)[1]


def test_images(cfg: RunConfig) -> ImageSet:
    """The server's test set, labelled by the run's class list."""
    return with_classes(_server_test_set(cfg), run_classes(cfg), "the server's test set")


def training_set(cfg: RunConfig) -> ImageSet:
    """The training split that partitions cut (not ``folders``), labelled by the run's classes."""
    train, _ = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    return with_classes(train, run_classes(cfg), "the training set") if cfg.classes else train


def client_images(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str = "") -> ImageSet:
    """One client's images, labelled by the run's class list: a node's own ``data_dir``
    (``<class>/<image>``, any subset of the classes), else its sub-folder of ``data-dir``
    (``partitioner = "folders"``), else its partition of the training set. A class folder that
    is not in the run's list is a one-line ``ValueError``."""
    if data_dir:
        return own_images(data_dir, run_classes(cfg), "node config data-dir")
    if cfg.partitioner == "folders":
        names, root = client_folders(cfg.data_dir, cfg.cache_dir)
        name = folder_client(names, partition_id, num_partitions)
        return own_images(root / name, run_classes(cfg), f"client folder {name!r} of data-dir")
    return client_split(training_set(cfg), partition_id, num_partitions, cfg.partitioner, cfg.seed,
                        cfg.dirichlet_alpha)


def partition_sizes_of(cfg: RunConfig) -> list[int]:
    """How many training images each of the ``num-clients`` simulated clients holds."""
    if cfg.partitioner == "folders":
        names, _ = client_folders(cfg.data_dir, cfg.cache_dir)
        return [len(client_images(cfg, i, len(names))) for i in range(len(names))]
    return partition_sizes(training_set(cfg), cfg.num_clients, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha)


def client_features(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int | None = None,
                    data_dir: str = "", cache_only: bool = False) -> Features | None:
    """The masked CLS features of one client's partition (extracted once and cached, except
    with ``mask-mode = random``, where ``server_round`` seeds fresh masks). Where the whole
    training split's features are cached (``whole_split_features``), the client's rows are
    taken from them instead of extracting its images again.

    A client with its own images (a node's ``data_dir``, or ``partitioner = "folders"``) has
    a cache entry keyed by those images and the run's class list, not by a partition id.
    ``cache_only``: None where the features would have to be extracted."""
    if data_dir or cfg.partitioner == "folders":
        mine = client_images(cfg, partition_id, num_partitions, data_dir)
        return features(cfg, mine, group=f"own-{mine.fingerprint}", server_round=server_round, cache_only=cache_only)
    train = training_set(cfg)
    mine = client_split(train, partition_id, num_partitions, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha)
    rows = rows_of_whole_split(cfg, train, mine)
    if rows is not None:
        return rows
    return features(cfg, mine, group=f"client-{partition_id}-of-{num_partitions}", server_round=server_round,
                    cache_only=cache_only)


def whole_split_features(cfg: RunConfig) -> Features:
    """The features of the whole training split, extracted once into the cache.

    With fixed per-image masks an image's features depend only on the image (its mask is
    drawn from its id, ``fedsparse.inputs.masking``), not on which client holds it, so every
    partitioning of the split (any ``partitioner``, ``dirichlet-alpha``, ``num-clients`` or
    ``seed``) can read its clients' rows from this one entry (``rows_of_whole_split``):
    ``fedsparse sweep`` over partitionings extracts each image once instead of once per
    partitioning."""
    return features(cfg.replace(mask_mode="per-image"), training_set(cfg), group="train")


# 50,000 x 192 floats is 38 MB: one whole split per process, and its cache key per setting
_WHOLE: ProcessCache[tuple[torch.Tensor, torch.Tensor, dict[str, int]]] = ProcessCache("whole split", 1)
_WHOLE_KEYS: ProcessCache[dict] = ProcessCache("whole split keys", 64)


def rows_of_whole_split(cfg: RunConfig, train: ImageSet, mine: ImageSet) -> Features | None:
    """``mine``'s rows of the whole split's cached features (a cache hit, 0 s of extraction), or
    None where that entry is absent, holds skipped images (rows would not line up), or the
    masks are not fixed per image."""
    if cfg.mask_mode != "per-image" or len(mine) == len(train):
        return None
    cache = FeatureCache(default_cache_dir(cfg.cache_dir))
    setting = (cfg.encoder, cfg.image_size, cfg.mask_ratio, cfg.mask_seed, cfg.preprocessing, cfg.encoder_dtype,
               train.fingerprint, len(train), str(cache.root))
    key = _WHOLE_KEYS.get_or_make(setting, lambda: feature_key(  # hashing 50,000 image ids costs ~2 ms
        encoder_ref(cfg.encoder, cfg.image_size), train, cfg.mask_ratio, cfg.mask_seed, "per-image", "train",
        cfg.preprocessing, cfg.encoder_dtype))
    path = str(cache.path(key))
    whole = _WHOLE.get(path)
    if whole is None:
        if not Path(path).is_file():
            return None
        entry = cache.load(key)
        if entry is None or entry[2] != 0:
            return None
        whole = _WHOLE.put(path, (entry[0], entry[1], {rel: i for i, rel in enumerate(train.paths)}))
    x, y, row = whole
    try:
        index = torch.tensor([row[rel] for rel in mine.paths], dtype=torch.long)
    except KeyError:  # not a subset of this split
        return None
    return Features(x.index_select(0, index), y.index_select(0, index), 0.0, True, 0)  # x[index] is 1000x slower here


def test_features(cfg: RunConfig) -> tuple[Features, int]:
    """(features of the held-out split, number of classes), for server-side evaluation; its
    masks are fixed in every mode."""
    test = test_images(cfg)
    return features(cfg, test, group="test"), len(test.classes)


def train_slice(
    cfg: RunConfig,
    state: dict[str, torch.Tensor],
    feats: Features,
    server_round: int,
    partition_id: int,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    label_aware: bool = False,
    frozen: str = "",
) -> tuple[dict[str, torch.Tensor], float]:
    """A client's local training: Adam on ``feats`` for ``steps`` steps of the (sub-)head in
    ``state``, on batches seeded by (seed, round, partition). Returns (trained state, mean loss).
    ``label_aware``: the softmax covers only the classes this client holds (``train_steps``).
    ``frozen``: parameters whose names start with it are not trained and not returned (a
    residual head's fixed ``skip.``). A state with ``skip.*`` is a ``ResidualHead``; its random
    features' ``rf.*`` are not returned."""
    from fedsparse.model.residual import RF, build_head

    model = build_head(state)
    if frozen:
        for name, param in model.named_parameters():
            if name.startswith(frozen):
                param.requires_grad_(False)
    steps = cfg.local_steps if steps is None else steps
    batch_size = cfg.batch_size if batch_size is None else batch_size
    gen = torch.Generator().manual_seed(derive_seed("batches", cfg.seed, server_round, partition_id))
    classes = torch.unique(feats.y) if label_aware else None
    loss = train_steps(model, feats.x, feats.y, batch_order(len(feats.y), steps, batch_size, gen),
                       cfg.lr if lr is None else lr, classes=classes)
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith(RF)}  # buffers: never trained
    if frozen:
        trained = {k: v for k, v in trained.items() if not k.startswith(frozen)}
    return trained, loss


def initial_head(cfg: RunConfig, in_dim: int, n_classes: int) -> MLPHead:
    """The head every strategy starts from, initialised from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("head", cfg.seed))
        return MLPHead(in_dim, cfg.hidden_sizes, n_classes)


def preflight(cfg: RunConfig, partitions: bool = True) -> None:
    """Fail fast, in the calling process and with one line, on what would otherwise fail
    inside the run: where files go (out-dir and the cache writable), the algorithm, the data
    (paths, at least 2 classes, decodable images, the partition among the clients), the head
    shape and the encoder (name, file, finite weights, finite features).

    ``partitions=False`` skips what depends on ``num-clients`` (in a deployment the SuperNodes'
    ``num-partitions`` split the data instead)."""
    import os

    from fedsparse.algorithms import make_algorithm
    from fedsparse.data.datasets import check_decodable, check_writable_dir
    from fedsparse.inputs.encoder import check_output

    check_writable_dir(cfg.out_dir, "out-dir")
    cache_key = "cache-dir" if cfg.cache_dir else "$FEDSPARSE_CACHE" if os.environ.get("FEDSPARSE_CACHE") else "the cache"
    check_writable_dir(default_cache_dir(cfg.cache_dir), cache_key)
    make_algorithm(cfg)  # an unknown strategy is a one-line error here
    if cfg.partitioner == "folders":
        names, _ = client_folders(cfg.data_dir, cfg.cache_dir)
        check_decodable(test_images(cfg), "test")
        if partitions:
            folder_client(names, 0, cfg.num_clients)  # one folder per client
            for i, name in enumerate(names):
                check_decodable(client_images(cfg, i, len(names)), f"client folder {name!r}", sample=2)
    else:
        train, test = training_set(cfg), test_images(cfg)
        check_decodable(train, "training")
        check_decodable(test, "test")
    if partitions and cfg.partitioner != "folders":
        if cfg.num_clients > len(train):
            raise ValueError(f"num-clients ({cfg.num_clients}) exceeds the {len(train)} training images")
        client_split(train, 0, cfg.num_clients, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha)  # every partition
    if cfg.strategy == "ist" and min(cfg.hidden_sizes) < cfg.num_subnets:
        raise ValueError(
            f"hidden layers {cfg.hidden} are too narrow to split into {cfg.num_subnets} subnets per round"
        )
    ref = encoder_ref(cfg.encoder, cfg.image_size)  # the file, its weights (finite), its image size
    if not test_features_cached(cfg, ref):  # cached: this encoder passed the check when they were extracted
        check_output(ref.build())


def test_features_cached(cfg: RunConfig, ref=None) -> bool:
    """Whether the server's test features are in the cache (then the server never builds the
    encoder: its preflight and its evaluation read them by the encoder's reference)."""
    ref = ref if ref is not None else encoder_ref(cfg.encoder, cfg.image_size)
    key = feature_key(ref, test_images(cfg), cfg.mask_ratio, cfg.mask_seed,
                      "per-image" if cfg.mask_mode == "random" else cfg.mask_mode, "test", cfg.preprocessing,
                      cfg.encoder_dtype)
    return FeatureCache(default_cache_dir(cfg.cache_dir)).path(key).is_file()
