"""Centralized probes: how good are an encoder's CLS features (or raw pixels) for the head?

``probe`` trains the default MLP head on all training features in one process (Adam, the
run's batch size and learning rate, a given number of steps) and reports test accuracy.
It is the quality bar for encoders and the centralized baseline next to IST and FedAvg.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedsparse.config import RunConfig
from fedsparse.data.datasets import ImageSet, load_splits
from fedsparse.inputs.encoder import load_image, normalize
from fedsparse.model.head import MLPHead, batch_order, evaluate, train_steps
from fedsparse.seeds import derive_seed
from fedsparse.task import features

PIXELS = "pixels"  # pseudo-encoder: the normalised image itself, flattened


def pixel_features(images: ImageSet, image_size: int, preprocessing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw-pixel baseline features: [N, 3*S*S] normalised pixels (unreadable images skipped)."""
    xs, ys = [], []
    for rel, label in zip(images.paths, images.labels):
        img = load_image(images.root / rel, image_size)
        if img is not None:
            xs.append(img)
            ys.append(int(label))
    x = normalize(torch.stack(xs), preprocessing).flatten(1)
    return x, torch.tensor(ys, dtype=torch.int64)


def features_for(cfg: RunConfig, encoder: str, split: ImageSet, group: str) -> tuple[torch.Tensor, torch.Tensor]:
    if encoder == PIXELS:
        return pixel_features(split, cfg.image_size, cfg.preprocessing)
    feats = features(cfg.replace(encoder=encoder), split, group)
    return feats.x, feats.y


def fit_head(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    cfg: RunConfig,
    steps: int,
    evals: int = 10,
) -> dict[str, Any]:
    """Train a fresh head centrally for ``steps`` Adam steps; test accuracy at ``evals`` points."""
    x, y = train
    n_classes = int(max(y.max(), test[1].max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("head", cfg.seed))
        model = MLPHead(x.shape[1], cfg.hidden_sizes, n_classes)
    gen = torch.Generator().manual_seed(derive_seed("probe", cfg.seed))
    batches = batch_order(len(y), steps, cfg.batch_size, gen)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    curve = []
    chunk = max(1, steps // evals)
    for start in range(0, steps, chunk):
        train_steps(model, x, y, batches[start : start + chunk], optimizer=opt)
        acc, loss = evaluate(model, *test)
        curve.append({"steps": min(start + chunk, steps), "accuracy": acc, "loss": loss})
    return {"accuracy": curve[-1]["accuracy"], "best_accuracy": max(c["accuracy"] for c in curve), "curve": curve}


def probe(cfg: RunConfig, encoders: list[str], steps: int) -> list[dict[str, Any]]:
    """One centralized head per encoder (or ``pixels``) on ``cfg``'s data, mask ratio and head."""
    train, test = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    rows = []
    for enc in encoders:
        t0 = time.perf_counter()
        tr = features_for(cfg, enc, train, "train")
        te = features_for(cfg, enc, test, "test")
        t1 = time.perf_counter()
        result = fit_head(tr, te, cfg, steps)
        rows.append({"encoder": enc, "feature_dim": int(tr[0].shape[1]), "train_examples": len(tr[1]),
                     "test_examples": len(te[1]), "steps": steps, "feature_seconds": t1 - t0,
                     "train_seconds": time.perf_counter() - t1, **result})
    return rows
