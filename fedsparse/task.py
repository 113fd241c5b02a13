"""From a RunConfig to tensors: a client's features, the server's test features, the head.

The pieces both sides of a run need, free of Flower: ClientApp and ServerApp are thin
wrappers around these functions, and so are the tests and benchmarks.
"""

from __future__ import annotations

import logging
import time

import torch

from fedsparse.config import RunConfig
from fedsparse.data.datasets import ImageSet, default_cache_dir, load_splits
from fedsparse.data.partition import client_split
from fedsparse.inputs.features import FeatureCache, Features, cached_features, extract, get_encoder
from fedsparse.seeds import derive_seed
from fedsparse.model.head import MLPHead, batch_order, train_steps

log = logging.getLogger("fedsparse")


def features(cfg: RunConfig, images: ImageSet, group: str, server_round: int | None = None) -> Features:
    """Masked CLS features of ``images`` with ``cfg``'s encoder, mask, preprocessing and dtype.

    Fixed masks (``per-image``, ``shared``) are served from the feature cache. With
    ``mask-mode = random`` and a ``server_round``, the masks are drawn anew for that round
    (seed derived from ``mask-seed`` and the round) and the features are extracted, uncached;
    without a round (the server's test set) random mode uses the fixed per-image masks.
    """
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    mode, seed = cfg.mask_mode, cfg.mask_seed
    if mode == "random":
        if server_round is None:
            mode = "per-image"
        else:
            seed = derive_seed("mask", cfg.mask_seed, server_round)
            t0 = time.perf_counter()
            x, y, skipped = extract(encoder, images, mask_ratio=cfg.mask_ratio, mask_seed=seed, mask_mode="per-image",
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
    )


def distinct_partitions(cfg: RunConfig) -> int:
    """How many different client data sets there are: 1 with ``partitioner = "full"`` (every
    client reads the whole training set), else one per client."""
    return 1 if cfg.partitioner == "full" else cfg.num_clients


def client_features(cfg: RunConfig, partition_id: int, num_partitions: int, server_round: int | None = None) -> Features:
    """The masked CLS features of one client's partition (extracted once and cached, except
    with ``mask-mode = random``, where ``server_round`` seeds fresh masks)."""
    train, _ = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    mine = client_split(train, partition_id, num_partitions, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha)
    return features(cfg, mine, group=f"client-{partition_id}-of-{num_partitions}", server_round=server_round)


def test_features(cfg: RunConfig) -> tuple[Features, int]:
    """(features of the held-out split, number of classes), for server-side evaluation; its
    masks are fixed in every mode."""
    _, test = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
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
) -> tuple[dict[str, torch.Tensor], float]:
    """A client's local training: Adam on ``feats`` for ``steps`` steps of the (sub-)head in
    ``state``, on batches seeded by (seed, round, partition). Returns (trained state, mean loss).
    ``label_aware``: the softmax covers only the classes this client holds (``train_steps``)."""
    model = MLPHead.from_state_dict(state)
    steps = cfg.local_steps if steps is None else steps
    batch_size = cfg.batch_size if batch_size is None else batch_size
    gen = torch.Generator().manual_seed(derive_seed("batches", cfg.seed, server_round, partition_id))
    classes = torch.unique(feats.y) if label_aware else None
    loss = train_steps(model, feats.x, feats.y, batch_order(len(feats.y), steps, batch_size, gen),
                       cfg.lr if lr is None else lr, classes=classes)
    return model.state_dict(), loss


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
    train, test = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    check_decodable(train, "training")
    check_decodable(test, "test")
    if partitions:
        if cfg.num_clients > len(train):
            raise ValueError(f"num-clients ({cfg.num_clients}) exceeds the {len(train)} training images")
        client_split(train, 0, cfg.num_clients, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha)  # every partition
    if cfg.strategy == "ist" and min(cfg.hidden_sizes) < cfg.num_subnets:
        raise ValueError(
            f"hidden layers {cfg.hidden} are too narrow to split into {cfg.num_subnets} subnets per round"
        )
    check_output(get_encoder(cfg.encoder, cfg.image_size))
