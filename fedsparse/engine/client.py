"""The client's side of a round, free of Flower: what a ClientApp and the plain loop run.

A client gets arrays and per-round settings (``ClientTask.config``: ``server-round``,
``local-steps``, ``lr``, ``batch-size``, and whatever its algorithm adds) and answers with
arrays, its number of examples and its metrics. Everything about the data (data set,
encoder, mask) comes from the run's ``RunConfig``; everything about the round comes from
the task, and nothing else.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from fedsparse import protocol as p
from fedsparse.accounting.costs import head_train_tensor_bytes
from fedsparse.algorithms.base import (CLASS_COUNTS, FROZEN_KEY, LABEL_AWARE_KEY, NUM_CLASSES_KEY, STATS, STATS_KEY,
                                       STATS_PREFIX, TRAIN, WITH_STATS_KEY, State)
from fedsparse.config import RunConfig
from fedsparse.engine.nodes import naming_the_node, worker_identity
from fedsparse.model.closed_form import stats_for
from fedsparse.model.head import MLPHead, state_dims
from fedsparse.model.residual import skip_input
from fedsparse.processes import peak_rss_bytes, reset_peak_rss
from fedsparse.inputs.features import encoder_batch
from fedsparse.profiles import Profile, fit_profile
from fedsparse.task import client_features, train_slice

@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (a simulated client gets ``client-cpus``)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def client_threads(cfg: RunConfig) -> int:
    """Math threads of one client: its ``client-cpus`` share (at least one)."""
    return max(1, int(cfg.client_cpus))


def round_setting(config: Mapping[str, Any], key: str) -> Any:
    """An algorithm's setting from the task, or a one-line error naming the missing key
    (the settings every task carries: ``fedsparse.protocol.RoundSettings``)."""
    try:
        return config[key]
    except KeyError:
        raise ValueError(f"the server's message lacks {key!r} (per-round settings come only from the message)") from None


def run_task(cfg: RunConfig, partition_id: int | None, num_partitions: int, arrays: State,
             config: Mapping[str, Any], data_dir: str = "",
             profile: Profile | None = None) -> tuple[State, int, dict[str, float]]:
    """Do what the task says on this client's data: ``(arrays, num_examples, metrics)``.

    ``profile``: this device's profile (``fedsparse.profiles``; None = the run's own settings).
    Before anything else the client predicts its peak memory and fits its encoder batch to the
    profile's budget, or refuses the task with a one-line ``MemoryBudgetError``
    (``fit_profile``); it then extracts at the profile's mask ratio and encoder dtype and
    trains with the profile's threads. Local steps and batch size still come from the task
    (the server sets them from the same profile).

    ``data_dir``: the node's own images (``<class>/<image>``) instead of a partition; its
    ``partition_id`` is then the node's ``client-id``, or None, and its batches are seeded by
    its data instead (``batch_seed_id``)."""
    reset_peak_rss()  # the peak this task reports is its own (a simulated actor runs many clients)
    kind = str(config.get(p.CLIENT_TASK_KEY, TRAIN))
    if kind == STATS:
        return run_stats_task(cfg, partition_id, num_partitions, arrays, config, data_dir, profile)
    if kind != TRAIN:
        raise ValueError(f"unknown client task {kind!r}; this client knows: {TRAIN}, {STATS}")
    settings = p.RoundSettings.from_config(config)
    server_round, steps, lr, batch_size = settings.server_round, settings.local_steps, settings.lr, settings.batch_size
    label_aware = bool(int(config.get(LABEL_AWARE_KEY, 0)))
    with naming_the_node():
        cfg, fit, feats = fitted_features(cfg, profile, state_dims(arrays), int(batch_size), partition_id, num_partitions,
                                          server_round, data_dir)
    features_ready = time.time()
    t0 = time.perf_counter()
    with torch_threads(fit.threads if fit is not None else client_threads(cfg)):
        trained, loss = train_slice(cfg, arrays, feats, server_round, batch_seed_id(cfg, partition_id, data_dir),
                                    steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                                    label_aware=label_aware, frozen=str(config.get(FROZEN_KEY, "")))
    if WITH_STATS_KEY in config:  # the first time it is sampled: its statistics too (IST from the closed form)
        with torch.no_grad():  # of what the skip reads: the features, and their random features if any
            stats = stats_for(str(config[WITH_STATS_KEY]), skip_input(arrays, feats.x), feats.y,
                              int(round_setting(config, NUM_CLASSES_KEY)))
        trained.update({STATS_PREFIX + k: v for k, v in stats.items()})
    if label_aware:  # which output rows it trained, and with how many examples each
        num_classes = int(round_setting(config, NUM_CLASSES_KEY))
        trained[CLASS_COUNTS] = torch.bincount(feats.y.long(), minlength=num_classes)[:num_classes].to(torch.float32)
    metrics = {
        p.TRAIN_LOSS_KEY: loss,
        p.TRAIN_SECONDS_KEY: time.perf_counter() - t0,
        p.EXTRACT_SECONDS_KEY: feats.seconds,
        p.CACHE_HIT_KEY: int(feats.cache_hit),
        p.PEAK_RSS_KEY: peak_rss_bytes(),
        p.TENSOR_BYTES_KEY: head_train_tensor_bytes(state_dims(arrays), int(batch_size)),
        p.FEATURES_READY_KEY: features_ready, p.TRAINED_KEY: time.time(),
        **(fit.metrics() if fit is not None else {}),
        **worker_identity(),  # the Ray node and process it ran in, if any
    }
    return trained, len(feats.y), metrics


def fitted_features(cfg: RunConfig, profile: Profile | None, head_dims: tuple[int, ...], batch_size: int,
                    partition_id: int | None, num_partitions: int, server_round: int,
                    data_dir: str) -> tuple[RunConfig, Any, Any]:
    """(config, profile fit, features) of a task: the features from the cache where they are
    there (no encoder built, no timm imported), else extracted at the encoder batch that fits
    the profile's budget. The budget is predicted for what the task does (``fit_profile``:
    training only when the features are cached)."""
    run = cfg if profile is None else cfg.replace(mask_ratio=profile.mask_ratio, encoder_dtype=profile.encoder_dtype)
    feats = client_features(run, partition_id or 0, num_partitions, server_round, data_dir=data_dir, cache_only=True)
    fit = (fit_profile(cfg, profile, head_dims, batch_size, cached=feats is not None)
           if profile is not None else None)
    if fit is not None:
        cfg = fit.cfg
    if feats is None:
        with encoder_batch(fit.encoder_batch if fit is not None else None):
            feats = client_features(cfg, partition_id or 0, num_partitions, server_round, data_dir=data_dir)
    return cfg, fit, feats


def batch_seed_id(cfg: RunConfig, partition_id: int | None, data_dir: str) -> int | str:
    """What a client's batches are seeded by (with the run's seed and the round): its partition
    or client id; a node with its own data and no ``client-id``, its data's fingerprint."""
    if partition_id is not None:
        return partition_id
    from fedsparse.task import client_images

    return f"data-{client_images(cfg, 0, 1, data_dir).fingerprint}"


def stats_input(arrays: State, x: torch.Tensor) -> torch.Tensor:
    """What a statistics task sums for features ``x``, by what it was sent: the features (nothing
    sent), an MLP trunk's last hidden activations (hidden layers only), or what a residual head's
    skip reads (its skip and random features)."""
    if "layers.0.weight" in arrays:
        return torch.relu(MLPHead.from_state_dict(arrays)(x))
    return skip_input(arrays, x) if arrays else x


def run_stats_task(cfg: RunConfig, partition_id: int | None, num_partitions: int, arrays: State,
                   config: Mapping[str, Any], data_dir: str = "",
                   profile: Profile | None = None) -> tuple[State, int, dict[str, float]]:
    """A ``stats`` task: the sufficient statistics (``config["stats"]``: ridge or ncm, see
    ``fedsparse.model.closed_form``) of this client's features, or, when ``arrays`` holds an
    MLP trunk (hidden layers only), of the trunk's last hidden activations, or, when it holds a
    residual head's ``skip`` and random features, of the features and their random features."""
    server_round = p.RoundSettings.from_config(config).server_round
    kind, num_classes = str(round_setting(config, STATS_KEY)), int(round_setting(config, NUM_CLASSES_KEY))
    trunk = bool(arrays) and "layers.0.weight" in arrays
    with naming_the_node():
        cfg, fit, feats = fitted_features(cfg, profile, state_dims(arrays) if trunk else (), 1, partition_id,
                                          num_partitions, server_round, data_dir)
    features_ready = time.time()
    t0 = time.perf_counter()
    with torch_threads(fit.threads if fit is not None else client_threads(cfg)), torch.no_grad():
        stats = stats_for(kind, stats_input(arrays, feats.x), feats.y, num_classes)
    metrics = {
        p.TRAIN_SECONDS_KEY: time.perf_counter() - t0,
        p.EXTRACT_SECONDS_KEY: feats.seconds,
        p.CACHE_HIT_KEY: int(feats.cache_hit),
        p.PEAK_RSS_KEY: peak_rss_bytes(),
        p.FEATURES_READY_KEY: features_ready, p.TRAINED_KEY: time.time(),
        **(fit.metrics() if fit is not None else {}),
        **worker_identity(),
    }
    return stats, len(feats.y), metrics
