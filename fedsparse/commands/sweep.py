"""``fedsparse sweep CONFIG``: the paper's table, accuracy and storage against the mask ratio.

For every mask ratio (and mask mode, and strategy) the experiment runs once:

- ``ist`` and ``fedavg`` run the full federated experiment, each into its own folder, on
  the Flower Simulation Engine (``strategies.simulation.simulate``; ``engine`` picks the
  in-process or plain driver instead, which give the same model);
- ``centralized`` trains the same head on all training features in one process with the
  same optimizer, batch size and number of steps as one IST worker (rounds x local steps).

Features for each ratio are extracted once and reused through the feature cache (every
strategy at that ratio, and a re-run of the sweep). ``mask-mode = random`` (masks drawn
anew every round, the talk's ablation) cannot be cached: its clients re-extract every
round, which the client-compute columns show. A finished run whose ``metrics.json``
matches its config is reused, and an interrupted federated run is resumed from its
``checkpoint.pt``, so an interrupted sweep continues where it stopped. Every run's
``metrics.json`` is a ``RunMetrics`` (the centralized head's too, with engine
``centralized``).

Outputs in the sweep folder: ``sweep.csv`` (one row per run), ``sweep.md`` (the table),
``sweep.png`` (best and final accuracy, and storage, against the mask ratio).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

from fedsparse.accounting.costs import (
    ViTShape,
    cls_cache_bytes,
    encoder_macs,
    masked_images_bytes,
)
from fedsparse.config import RunConfig
from fedsparse.data.datasets import load_splits
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.inputs.features import get_encoder
from fedsparse.task import distinct_partitions

STRATEGIES = ("ist", "fedavg", "centralized")
MODES = ("per-image", "shared", "random")
COLUMNS = (
    "dataset", "mask_ratio", "mask_mode", "strategy", "train_images", "masked_images_bytes", "cls_bytes",
    "best_accuracy", "final_accuracy", "rounds", "client_encoder_gmacs", "client_extract_seconds",
    "client_train_seconds", "bytes_down_per_client", "wall_seconds", "run_dir",
)


def _tag(r: float) -> str:
    return f"r{r:g}"


def run_dir(out: Path, mode: str, r: float, strategy: str) -> Path:
    return out / f"{mode}-{_tag(r)}-{strategy}"


def _same_run(saved: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a saved run config is ``cfg`` (``resume`` aside: a resumed run is the same run)."""
    current = cfg.to_run_config()
    return {k: v for k, v in saved.items() if k != "resume"} == {k: v for k, v in current.items() if k != "resume"}


def _finished(path: Path, cfg: RunConfig) -> RunMetrics | None:
    """The metrics of a finished earlier run of exactly ``cfg`` in ``path``, else None."""
    try:
        m = RunMetrics.load(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # absent, unreadable or of another schema
        return None
    if not m.finished or not _same_run(m.config, cfg) or len(m.rounds) < cfg.num_rounds:
        return None
    return m


def _resumable(path: Path, cfg: RunConfig) -> bool:
    """Whether ``path`` holds an interrupted run of ``cfg`` that a resume can continue."""
    from fedsparse.engine.checkpoint import CHECKPOINT, Checkpoint, config_differences

    if not (path / CHECKPOINT).is_file():
        return False
    try:
        ckpt = Checkpoint.load(path)
    except (OSError, ValueError):
        return False
    # the engine's own rule (fedsparse.engine.checkpoint): keys that change what a round computes must match
    return not config_differences(ckpt.config, cfg.to_run_config()) and ckpt.round <= cfg.num_rounds


def federated(cfg: RunConfig, engine: str = "simulation") -> RunMetrics:
    """The metrics of ``cfg``'s federated run on ``engine`` (``simulation``, ``in-process`` or
    ``plain``: the same config gives the same model on each). A finished run of ``cfg`` in
    its folder is reused, an interrupted one resumed after its last finished round."""
    from fedsparse.commands.cli import run_with_engine

    out = Path(cfg.out_dir)
    done = _finished(out, cfg)
    if done is not None:
        return done
    return run_with_engine(cfg.replace(resume=_resumable(out, cfg)), engine)


def centralized(cfg: RunConfig) -> RunMetrics:
    """The centralized head on all training features at ``cfg``'s ratio, written as metrics.json.

    One ``RoundMetrics`` per ``local-steps`` Adam steps (the work of one IST round of one
    client), so its rounds line up with the federated runs'; ``seconds`` is the mean per round.
    """
    import torch

    from fedsparse.commands.probe import fit_head
    from fedsparse.model.head import count_params
    from fedsparse.task import client_features, test_features

    done = _finished(Path(cfg.out_dir), cfg)
    if done is not None:
        return done
    t0 = time.perf_counter()
    fcfg = cfg.replace(mask_mode="per-image") if cfg.mask_mode == "random" else cfg
    # All the clients' data, from the same cache entries the federated runs use.
    parts = distinct_partitions(cfg)
    tr = [client_features(fcfg, i, cfg.num_clients) for i in range(parts)]
    te, num_classes = test_features(fcfg)
    x, y = torch.cat([f.x for f in tr]), torch.cat([f.y for f in tr])
    t1 = time.perf_counter()
    fit = fit_head((x, y), (te.x, te.y), cfg, cfg.num_rounds * cfg.local_steps, evals=cfg.num_rounds)
    train_seconds = time.perf_counter() - t1
    per_round = train_seconds / max(1, len(fit["curve"]))
    rounds = [
        RoundMetrics(round=i + 1, accuracy=c["accuracy"], loss=c["loss"], clients=1, examples=len(y), sampled=1, subnets=1,
                     failures=0, failed_error=0, failed_invalid=0, failed_lost=0,
                     bytes_down_per_client=0.0, bytes_up_per_client=0.0, bytes_down_total=0, bytes_up_total=0,
                     seconds=per_round, elapsed=(t1 - t0) + (i + 1) * per_round)
        for i, c in enumerate(fit["curve"])
    ]
    dims = [int(x.shape[1]), *cfg.hidden_sizes, int(max(y.max(), te.y.max())) + 1]  # as fit_head builds it
    metrics = RunMetrics(
        config=cfg.to_run_config(), engine="centralized", model_params=count_params(dims),
        model_bytes=4 * count_params(dims), num_classes=num_classes, test_examples=len(te.y), head_dims=dims,
        algorithm=f"centralized: Adam on all {len(y)} training features, {cfg.local_steps} steps per round",
        rounds=rounds, finished=True, wall_seconds=time.perf_counter() - t0,
        extra={"train_seconds": train_seconds, "steps": [c["steps"] for c in fit["curve"]]},
    )
    metrics.write(cfg.out_dir)
    return metrics


def _sum(values: list[float | None]) -> float:
    return float(sum(v or 0.0 for v in values))


def row_for(cfg: RunConfig, strategy: str, metrics: RunMetrics, shape: ViTShape, n_train: int) -> dict[str, Any]:
    rounds = metrics.rounds
    fed = strategy != "centralized"
    # Encoder work of one client: once per partition with fixed masks, every round with random ones.
    per_client = n_train / distinct_partitions(cfg)
    extractions = cfg.num_rounds if cfg.mask_mode == "random" else 1
    nan = float("nan")
    return {
        "dataset": cfg.dataset,
        "mask_ratio": cfg.mask_ratio,
        "mask_mode": cfg.mask_mode,
        "strategy": strategy,
        "train_images": n_train,
        "masked_images_bytes": masked_images_bytes(n_train, shape, cfg.mask_ratio),
        "cls_bytes": cls_cache_bytes(n_train, shape.dim),
        "best_accuracy": nan if metrics.best_accuracy is None else metrics.best_accuracy,
        "final_accuracy": nan if metrics.final_accuracy is None else metrics.final_accuracy,
        "rounds": len(rounds),
        "client_encoder_gmacs": per_client * extractions * encoder_macs(shape, cfg.mask_ratio) / 1e9 if fed else None,
        "client_extract_seconds": _sum([r.client_extract_seconds_max for r in rounds]) if fed else None,
        "client_train_seconds": _sum([r.client_train_seconds_max for r in rounds]) if fed else None,
        "bytes_down_per_client": (sum(r.bytes_down_per_client for r in rounds) / len(rounds)) if fed and rounds else None,
        "wall_seconds": metrics.wall_seconds,
        "run_dir": str(Path(cfg.out_dir)),
    }


def sweep(
    cfg: RunConfig,
    out_dir: str | Path,
    ratios: list[float],
    strategies: list[str],
    modes: list[str],
    report: Callable[[str], None] = print,
    engine: str = "simulation",
) -> list[dict[str, Any]]:
    """Run every (mode, ratio, strategy); write sweep.csv, sweep.md and sweep.png; return the rows.

    ``engine`` runs the federated strategies: ``simulation`` (the Flower Simulation Engine),
    ``in-process`` (Flower messages, no Ray) or ``plain`` (PyTorch only); the same config
    gives the same model on each, so a finished run is reused whichever engine ran it.
    """
    from fedsparse.commands.cli import ENGINES

    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"Unknown strategy {s!r}; valid: {', '.join(STRATEGIES)}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"Unknown mask mode {m!r}; valid: {', '.join(MODES)}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, _ = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    shape = ViTShape.of(encoder.model, cfg.image_size)
    rows: list[dict[str, Any]] = []
    plan = [(m, r, s) for m in modes for r in ratios for s in strategies]
    t0 = time.perf_counter()
    for i, (mode, r, strategy) in enumerate(plan, 1):
        # centralized keeps the run config of IST (head, optimizer, steps) and trains in one process
        c = cfg.replace(mask_ratio=r, mask_mode=mode, strategy="ist" if strategy == "centralized" else strategy,
                        out_dir=str(run_dir(out, mode, r, strategy)))
        report(f"[{i}/{len(plan)}] {mode} masks, r={r:g}, {strategy} ({time.perf_counter() - t0:.0f}s so far)")
        metrics = centralized(c) if strategy == "centralized" else federated(c, engine)
        row = row_for(c, strategy, metrics, shape, len(train))
        rows.append(row)
        report(f"    best {row['best_accuracy']:.4f}, final {row['final_accuracy']:.4f}")
        write(rows, out)
    plot(rows, out / "sweep.png")
    return rows


def write(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.md").write_text(markdown(rows))


def _fmt(v: Any, scale: float = 1.0, digits: int = 2) -> str:
    return "" if v is None else f"{v / scale:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| data set | mask ratio | masks | strategy | masked images MB | CLS tokens MB | best acc | final acc | "
        "client encoder GMACs | client extract s | client train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['mask_ratio']:g} | {r['mask_mode']} | {r['strategy']} | "
            f"{_fmt(r['masked_images_bytes'], 1e6)} | {_fmt(r['cls_bytes'], 1e6)} | {r['best_accuracy']:.4f} | "
            f"{r['final_accuracy']:.4f} | {_fmt(r['client_encoder_gmacs'], 1, 1)} | "
            f"{_fmt(r['client_extract_seconds'], 1, 1)} | {_fmt(r['client_train_seconds'], 1, 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy (best solid, final dashed) per strategy and mode, and storage, against the mask ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({(r["strategy"], r["mask_mode"]) for r in rows}):
        sel = sorted((r for r in rows if (r["strategy"], r["mask_mode"]) == key), key=lambda r: r["mask_ratio"])
        xs = [r["mask_ratio"] for r in sel]
        line, = ax.plot(xs, [r["best_accuracy"] for r in sel], marker="o", label=f"{key[0]}, {key[1]} masks (best)")
        ax.plot(xs, [r["final_accuracy"] for r in sel], ls="--", color=line.get_color(), label="final")
    ax.set(xlabel="mask ratio", ylabel="test accuracy", title=f"accuracy vs mask ratio ({rows[0]['dataset']})")
    ax.legend(fontsize=7)
    first = sorted({r["mask_ratio"]: r for r in rows}.values(), key=lambda r: r["mask_ratio"])
    xs = [r["mask_ratio"] for r in first]
    ax2.plot(xs, [r["masked_images_bytes"] / 1e6 for r in first], marker="s", label="masked images")
    ax2.plot(xs, [r["cls_bytes"] / 1e6 for r in first], marker="^", label="CLS tokens")
    ax2.set(xlabel="mask ratio", ylabel="MB on the devices (all training images)", title="storage")
    ax2.legend(fontsize=8)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
