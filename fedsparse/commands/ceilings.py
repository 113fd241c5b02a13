"""The centralized ceilings of a config's features: what "beating every baseline" can mean.

Three heads, each on all the training features of the config's data and mask ratio, in one
process (no federation, no bytes):

- ``mlp``: the config's MLP head, Adam with the config's batch size and learning rate, trained
  to convergence: evaluated on a held-out validation split (``VAL_FRACTION`` of the training
  features, seeded) every ``EVAL_STEPS`` steps, stopped after ``PATIENCE`` evaluations without
  a better validation accuracy (or ``MAX_EPOCHS``), and the best validation checkpoint is the
  result (its test accuracy is the "final" one);
- ``ridge``: the closed-form ridge head (``ridge-lambda``) of the training features (Fed3R's
  head with every client counted; no validation needed, nothing is tuned); with
  ``ridge-features`` > 0, of the features and their random ReLU features
  (``fedsparse.model.residual``), standardised by all the training features and drawn from the
  seed IST draws them from: IST's closed form with every client counted;
- ``residual``: the residual head (``fedsparse.model.residual``): the ridge head of the training
  part as ``skip`` (``residual-temperature``, ``residual-normalize``; fixed or trained by
  ``residual-skip``) plus the MLP with its last layer at zero, trained and stopped as ``mlp``.

``fedsparse sweep`` runs them as the strategies ``ceiling-mlp``, ``ceiling-ridge`` and
``ceiling-residual`` (one run per mask mode and ratio, whatever the partitioning); each writes
a ``metrics.json`` (``RunMetrics``, engine ``ceiling``) with one "round" per evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.model.closed_form import add_stats, ridge_head, standardizer, stats_for
from fedsparse.model.head import batch_order, count_params, evaluate, train_steps
from fedsparse.model.residual import ResidualHead, rf_state, skip_from_linear, skip_input, zero_last_layer
from fedsparse.seeds import derive_seed

KINDS = ("mlp", "ridge", "residual")
VAL_FRACTION = 0.1
EVAL_STEPS = 1000
PATIENCE = 5
MAX_EPOCHS = 40


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, validation rows) of ``n`` examples: a seeded ``fraction`` held out (at least one)."""
    if n < 2:
        raise ValueError(f"need at least 2 examples for a validation split, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("validation", seed)))
    k = min(n - 1, max(1, int(round(fraction * n))))
    return perm[k:].sort().values, perm[:k].sort().values


def chunked_stats(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """The ridge statistics of ``(x, y)``, the same float32 ones a client sends, summed over
    chunks of 10,000 (the sum of the chunks' statistics is the statistics of the whole)."""
    total = None
    for start in range(0, len(y), 10_000):
        total = add_stats(total, stats_for("ridge", x[start:start + 10_000], y[start:start + 10_000], num_classes))
    return total


def ridge_of(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float) -> dict[str, torch.Tensor]:
    """The ridge head of ``(x, y)`` from its ``chunked_stats``."""
    return ridge_head(chunked_stats(x, y, num_classes), lam, int(x.shape[1]))


def central_map(x: torch.Tensor, num_classes: int, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The ``rf.*`` state of ``cfg``'s random features standardised by all of ``x`` (IST
    standardises by its first round's clients and draws from the same seed)."""
    total = chunked_stats(x, torch.zeros(len(x), dtype=torch.long), num_classes)
    return rf_state(*standardizer(total, int(x.shape[1])), derive_seed("ridge-features", cfg.seed))


def train_early_stopped(model: torch.nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                        val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                        cfg: RunConfig, eval_steps: int = EVAL_STEPS, patience: int = PATIENCE,
                        max_epochs: int = MAX_EPOCHS) -> dict[str, Any]:
    """Adam (``cfg.lr``, ``cfg.batch_size``) on ``train`` until the validation accuracy has not
    improved for ``patience`` evaluations; ``model`` ends at its best validation checkpoint.
    Returns the curve (steps, validation and test accuracy and loss at each evaluation) and the
    best evaluation's index."""
    x, y = train
    max_steps = max(eval_steps, max_epochs * -(-len(y) // cfg.batch_size))
    gen = torch.Generator().manual_seed(derive_seed("ceiling-batches", cfg.seed))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    curve: list[dict[str, float]] = []
    best, best_state, steps, since = -1.0, None, 0, 0
    while steps < max_steps and since < patience:
        batches = batch_order(len(y), min(eval_steps, max_steps - steps), cfg.batch_size, gen)
        train_steps(model, x, y, batches, optimizer=opt)
        steps += len(batches)
        val_acc, val_loss = evaluate(model, *val)
        acc, loss = evaluate(model, *test)
        curve.append({"steps": steps, "val_accuracy": val_acc, "val_loss": val_loss, "accuracy": acc, "loss": loss})
        if val_acc > best:
            best, since = val_acc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
    if best_state is not None:
        model.load_state_dict(best_state)
    best_at = max(range(len(curve)), key=lambda i: (curve[i]["val_accuracy"], -i))
    return {"curve": curve, "best_at": best_at}


def ceiling(cfg: RunConfig, kind: str) -> RunMetrics:
    """Train (or solve) the ``kind`` ceiling on ``cfg``'s features; write and return its metrics.
    A finished run of the same config in ``cfg.out_dir`` is reused."""
    from fedsparse.config import same_run
    from fedsparse.task import initial_head, test_features, whole_split_features

    if kind not in KINDS:
        raise ValueError(f"unknown ceiling {kind!r}; valid: {', '.join(KINDS)}")
    try:
        done = RunMetrics.load(Path(cfg.out_dir))
        if done.finished and same_run(done.config, cfg):
            return done
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # absent, unreadable or of another schema
        pass
    t0 = time.perf_counter()
    fcfg = cfg.replace(mask_mode="per-image") if cfg.mask_mode == "random" else cfg
    whole = whole_split_features(fcfg)
    te, num_classes = test_features(fcfg)
    x, y = whole.x, whole.y
    tr_rows, val_rows = validation_split(len(y), VAL_FRACTION, cfg.seed)
    train = (x.index_select(0, tr_rows), y.index_select(0, tr_rows))
    val = (x.index_select(0, val_rows), y.index_select(0, val_rows))
    test = (te.x, te.y)
    dims = [int(x.shape[1]), *cfg.hidden_sizes, num_classes]
    extra: dict[str, Any] = {"validation_examples": len(val_rows), "train_examples": len(tr_rows)}
    width = cfg.ridge_features
    rf = central_map(x, num_classes, cfg) if width and kind != "mlp" else {}
    phi = (lambda z: skip_input({**rf, "skip.weight": torch.zeros(num_classes, dims[0] + width)}, z)) if rf else (lambda z: z)
    on = f"{width} random ReLU features of " if rf else ""
    if kind == "ridge":  # nothing is tuned: all training features, as fed3r with every client counted
        with torch.no_grad():
            linear = ridge_of(phi(x), y, num_classes, cfg.ridge_lambda)
        head = ResidualHead(dims[0], [1], num_classes, width if rf else 0)  # the skip alone: its MLP adds zero
        head.load_state_dict({**zero_last_layer(head.state_dict()), **rf, **skip_from_linear(linear)}, strict=True)
        acc, loss = evaluate(head, *test)
        curve = [{"steps": 0, "accuracy": acc, "loss": loss}]
        best_at, params = 0, count_params([dims[0] + (width if rf else 0), num_classes])
        text = f"ceiling: ridge head (lambda {cfg.ridge_lambda:g}) on {on}all {len(y)} training features"
    else:
        mlp = initial_head(cfg, dims[0], num_classes)
        if kind == "mlp":
            model: torch.nn.Module = mlp
            params = count_params(dims)
            text = f"ceiling: the MLP head, Adam, early-stopped on {len(val_rows)} validation features"
        else:
            model = ResidualHead(dims[0], cfg.hidden_sizes, num_classes, width if rf else 0)
            with torch.no_grad():
                linear = ridge_of(phi(train[0]), train[1], num_classes, cfg.ridge_lambda)
            skip = skip_from_linear(linear, cfg.residual_temperature, cfg.residual_normalize)
            model.load_state_dict({**zero_last_layer(mlp.state_dict()), **skip, **rf})
            if cfg.residual_skip == "fixed":
                for p in model.skip.parameters():
                    p.requires_grad_(False)
            start_acc, _ = evaluate(model, *test)
            extra["start_accuracy"] = start_acc
            params = count_params(dims) + count_params([dims[0] + (width if rf else 0), num_classes])
            text = (f"ceiling: ridge on {on}the features (T {cfg.residual_temperature:g}, normalized {cfg.residual_normalize}, "
                    f"{cfg.residual_skip}) + residual MLP, Adam, early-stopped on {len(val_rows)} validation features")
        fit = train_early_stopped(model, train, val, test, cfg)
        curve, best_at = fit["curve"], fit["best_at"]
    seconds = time.perf_counter() - t0
    rounds = [
        RoundMetrics(round=i + 1, accuracy=c["accuracy"], loss=c["loss"], clients=1, examples=len(y), sampled=1,
                     subnets=1, failures=0, failed_error=0, failed_invalid=0, failed_lost=0,
                     bytes_down_per_client=0.0, bytes_up_per_client=0.0, bytes_down_total=0, bytes_up_total=0,
                     seconds=seconds / len(curve), elapsed=seconds * (i + 1) / len(curve))
        for i, c in enumerate(curve)
    ]
    # the result is the best validation checkpoint: repeat it as the last "round" so that final = selected
    chosen = curve[best_at]
    rounds.append(dataclasses.replace(rounds[best_at], round=len(rounds) + 1))
    extra.update({"kind": kind, "selected_steps": chosen["steps"], "selected_accuracy": chosen["accuracy"],
                  "curve": curve})
    metrics = RunMetrics(config=cfg.to_run_config(), engine="ceiling", model_params=params, model_bytes=4 * params,
                         num_classes=num_classes, test_examples=len(te.y), head_dims=dims, algorithm=text,
                         rounds=rounds, finished=True, wall_seconds=seconds, extra=extra)
    metrics.write(cfg.out_dir)
    return metrics
