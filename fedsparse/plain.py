"""IST rounds as a plain PyTorch loop in one process: the reference for Flower's overhead.

``plain_rounds`` runs what a simulated IST round runs (with ``subnets-per-round`` groups
when set): the same seeded partitions, the same
clients' cached features, the same local steps on the same batches, the same stitching and
the same test evaluation, with no Flower, no Ray and no messages. ``fedsparse overhead``
times it against the Simulation Engine on the same config.

Clients are drawn from the partition ids with the strategy's seeded sampler: in process
(``strategies.measure.local_rounds``, node i + 1 = partition i) that picks the same clients,
and the result is the same model; the Simulation Engine draws from its own node ids, so the
*which* differs there while the work per round is the same.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

from fedsparse.config import RunConfig
from fedsparse.head import MLPHead, evaluate
from fedsparse.ist import (
    SliceUpdate,
    client_groups,
    hidden_sizes,
    merge_by_subnet,
    partition,
    slice_state,
    stitch,
    worker_indices,
)
from fedsparse.task import client_features, derive_seed, initial_head, test_features, train_slice


def plain_rounds(cfg: RunConfig, report: Callable[[str], None] = print) -> dict[str, Any]:
    """``cfg.num_rounds`` IST rounds in this process; per-round seconds and accuracy."""
    test, n_classes = test_features(cfg)
    state = initial_head(cfg, test.x.shape[1], n_classes).state_dict()
    rng = random.Random(derive_seed("sampling", cfg.seed))
    rounds = []
    t_start = time.perf_counter()
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        clients = rng.sample(range(cfg.num_clients), cfg.clients_per_round)
        g = cfg.num_subnets
        parts = partition(hidden_sizes(state), g, derive_seed("partition", cfg.seed, rnd))
        updates = []
        for pid, subnet in zip(clients, client_groups(len(clients), g)):
            feats = client_features(cfg, pid, cfg.num_clients, rnd)
            index = worker_indices(parts, subnet)
            trained, _ = train_slice(cfg, slice_state(state, index, cfg.ist_scaling), feats, rnd, pid)
            updates.append(SliceUpdate(index, trained, len(feats.y), subnet))
        state = stitch(state, merge_by_subnet(updates), cfg.ist_scaling)
        accuracy, loss = evaluate(MLPHead.from_state_dict(state), test.x, test.y)
        rounds.append({"round": rnd, "accuracy": accuracy, "loss": loss, "seconds": time.perf_counter() - t0})
        report(f"plain round {rnd}/{cfg.num_rounds}: accuracy {accuracy:.4f}, {rounds[-1]['seconds']:.2f}s")
    return {"rounds": rounds, "wall_seconds": time.perf_counter() - t_start, "state": state}
