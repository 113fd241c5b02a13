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

``partitions`` adds a heterogeneity axis: each entry is ``iid`` or a Dirichlet concentration
(``0.1``: strong label skew), and every (mode, ratio) runs once per partitioning. The
strategies then compare on data of growing skew: ``ist`` (the config's IST, by default the
label-skew variant), ``ist-authors`` (the paper's IST on the same data), ``fedavg`` on the full
head, the closed-form heads ``fed3r`` and ``fedncm``, and ``centralized``. With fixed masks the
whole training split is extracted once (``fedsparse.task.whole_split_features``) and every
partitioning reads its clients' rows from it. A strategy may carry settings of its own:
``fedavg(local-steps=5)`` runs FedAvg with 5 local steps beside IST's 20.

The ceilings (``fedsparse.commands.ceilings``) run as strategies too, once per (mode, ratio)
like ``centralized``: ``ceiling-mlp`` (the MLP head trained to convergence, early-stopped on a
validation split), ``ceiling-ridge`` (the ridge head of all training features) and
``ceiling-residual`` (ridge + residual MLP, early-stopped).

Outputs in the sweep folder: ``sweep.csv`` (one row per run), ``sweep.md`` (the table),
``sweep.png`` (best and final accuracy, and storage, against the mask ratio), and
``sweep-bytes.png`` (accuracy against the cumulative megabytes the clients received and sent,
one curve per strategy, one panel per partitioning and ratio). The bytes columns: per client
and round (down, up), and ``mb_to_90pct_fedavg``, the megabytes sent both ways by all clients
until the first evaluated round at 90% of FedAvg's final accuracy on the same data (plain
``fedavg`` where it ran, else the first ``fedavg(...)``; empty where the run never got there,
or where no FedAvg ran).
"""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Any, Callable

from fedsparse.accounting.costs import (
    ViTShape,
    cls_cache_bytes,
    encoder_macs,
    masked_images_bytes,
)
from fedsparse.config import RunConfig, same_run
from fedsparse.data.datasets import load_splits
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.inputs.features import get_encoder
from fedsparse.task import distinct_partitions, whole_split_features

# strategy name -> the config changes that make it (centralized trains the config's head in one process)
STRATEGIES: dict[str, dict[str, Any]] = {
    "ist": {"strategy": "ist"},
    "ist-authors": {"strategy": "ist", "ist_variant": "authors"},
    "fedavg": {"strategy": "fedavg"},
    "fedopt": {"strategy": "fedopt"},
    "fed3r": {"strategy": "fed3r"},
    "fedncm": {"strategy": "fedncm"},
    "centralized": {"strategy": "ist"},
    # the centralized ceilings (fedsparse.commands.ceilings): early-stopped MLP, ridge, ridge + residual MLP
    "ceiling-mlp": {"strategy": "ist"},
    "ceiling-ridge": {"strategy": "ist"},
    "ceiling-residual": {"strategy": "ist"},
}
CENTRAL = ("centralized", "ceiling-mlp", "ceiling-ridge", "ceiling-residual")  # one process, all the data, no bytes
MODES = ("per-image", "shared", "random")
COLUMNS = (
    "dataset", "mask_ratio", "mask_mode", "partition", "strategy", "train_images", "masked_images_bytes", "cls_bytes",
    "best_accuracy", "final_accuracy", "rounds", "client_encoder_gmacs", "client_extract_seconds",
    "client_train_seconds", "bytes_down_per_client", "bytes_up_per_client", "total_mb", "mb_to_90pct_fedavg",
    "wall_seconds", "run_dir",
)


def _tag(r: float) -> str:
    return f"r{r:g}"


def run_dir(out: Path, mode: str, r: float, strategy: str, partition: str = "") -> Path:
    return out / (f"{mode}-{_tag(r)}-{partition}-{strategy}" if partition else f"{mode}-{_tag(r)}-{strategy}")


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``fedavg`` or ``fedavg(local-steps=5 batch-size=32)`` -> (name, run-config overrides):
    a strategy with settings of its own (e.g. fewer local steps for the full head's clients)."""
    from fedsparse.config import parse_overrides

    spec = spec.strip()
    name, _, rest = spec.partition("(")
    name = name.strip()
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if not rest:
        return name, {}
    if not rest.endswith(")"):
        raise ValueError(f"strategy {spec!r}: settings go in parentheses, e.g. fedavg(local-steps=5)")
    return name, parse_overrides(rest[:-1])


def _dir_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


def parse_partition(spec: str) -> tuple[str, dict[str, Any]]:
    """``iid`` or a Dirichlet concentration (``0.5``) -> (its tag, its config changes)."""
    spec = spec.strip()
    if spec == "iid":
        return "iid", {"partitioner": "iid"}
    try:
        alpha = float(spec)
    except ValueError:
        raise ValueError(f"Unknown partition {spec!r}; valid: iid or a Dirichlet concentration > 0 (e.g. 0.5)") from None
    if not (alpha > 0 and alpha < float("inf")):
        raise ValueError(f"Dirichlet concentration must be finite and > 0, got {spec!r}")
    return f"dir{alpha:g}", {"partitioner": "dirichlet", "dirichlet_alpha": alpha}


def partition_label(cfg: RunConfig) -> str:
    """How ``cfg`` splits the training data, for the table: iid, dir0.5, shards, full."""
    return f"dir{cfg.dirichlet_alpha:g}" if cfg.partitioner == "dirichlet" else cfg.partitioner


def _finished(path: Path, cfg: RunConfig) -> RunMetrics | None:
    """The metrics of a finished earlier run of exactly ``cfg`` in ``path``, else None."""
    try:
        m = RunMetrics.load(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # absent, unreadable or of another schema
        return None
    if not m.finished or not same_run(m.config, cfg) or len(m.rounds) < cfg.num_rounds:
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
    from fedsparse.commands.drivers import run_with_engine
    from fedsparse.task import preflight

    out = Path(cfg.out_dir)
    done = _finished(out, cfg)
    if done is not None:
        return done
    preflight(cfg)  # a bad setting is one line here, not a failure in every client
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


def cumulative_mb(metrics: RunMetrics) -> list[tuple[float, float]]:
    """(megabytes received and sent by all clients so far, accuracy) at every evaluated round."""
    total, points = 0, []
    for r in metrics.rounds:
        total += r.bytes_down_total + r.bytes_up_total
        if r.accuracy is not None:
            points.append((total / 1e6, r.accuracy))
    return points


def mb_to_reach(metrics: RunMetrics, target: float) -> float | None:
    """Megabytes both ways, all clients, until the first evaluated round at ``target`` accuracy."""
    return next((mb for mb, acc in cumulative_mb(metrics) if acc >= target), None)


def row_for(cfg: RunConfig, strategy: str, metrics: RunMetrics, shape: ViTShape, n_train: int) -> dict[str, Any]:
    rounds = metrics.rounds
    fed = strategy.partition("(")[0] not in CENTRAL
    # Encoder work of one client: once per partition with fixed masks, every round with random ones.
    per_client = n_train / distinct_partitions(cfg)
    extractions = cfg.num_rounds if cfg.mask_mode == "random" else 1
    nan = float("nan")
    return {
        "dataset": cfg.dataset,
        "mask_ratio": cfg.mask_ratio,
        "mask_mode": cfg.mask_mode,
        "partition": partition_label(cfg),
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
        "bytes_up_per_client": (sum(r.bytes_up_per_client for r in rounds) / len(rounds)) if fed and rounds else None,
        "total_mb": sum(r.bytes_down_total + r.bytes_up_total for r in rounds) / 1e6 if fed else None,
        "mb_to_90pct_fedavg": None,  # filled in by with_targets once FedAvg's run on the same data is known
        "wall_seconds": metrics.wall_seconds,
        "run_dir": str(Path(cfg.out_dir)),
    }


def _same_data(row: dict[str, Any]) -> tuple:
    return row["mask_mode"], row["mask_ratio"], row["partition"]


def _name(row: dict[str, Any]) -> str:
    return row["strategy"].partition("(")[0]


def with_targets(rows: list[dict[str, Any]], runs: list[RunMetrics]) -> None:
    """Fill ``mb_to_90pct_fedavg`` for every federated row whose data has a FedAvg row."""
    for row, metrics in zip(rows, runs):
        fedavg = sorted((r for r in rows if _name(r) == "fedavg" and _same_data(r) == _same_data(row)),
                        key=lambda r: r["strategy"] != "fedavg")  # plain fedavg first, then fedavg(...)
        if _name(row) not in CENTRAL and fedavg and fedavg[0]["final_accuracy"] == fedavg[0]["final_accuracy"]:
            row["mb_to_90pct_fedavg"] = mb_to_reach(metrics, 0.9 * fedavg[0]["final_accuracy"])


def sweep(
    cfg: RunConfig,
    out_dir: str | Path,
    ratios: list[float],
    strategies: list[str],
    modes: list[str],
    report: Callable[[str], None] = print,
    engine: str = "simulation",
    partitions: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every (mode, ratio, partition, strategy); write sweep.csv, sweep.md, sweep.png and
    sweep-bytes.png; return the rows.

    ``engine`` runs the federated strategies: ``simulation`` (the Flower Simulation Engine),
    ``in-process`` (Flower messages, no Ray) or ``plain`` (PyTorch only); the same config
    gives the same model on each, so a finished run is reused whichever engine ran it.
    ``partitions``: ``iid`` and Dirichlet concentrations (``parse_partition``); None runs the
    config's own partitioning (and keeps the run folders' names without a partition tag).
    """
    from fedsparse.commands.drivers import check_driver

    check_driver(engine)
    specs = {s: parse_strategy(s) for s in strategies}
    for name, own in specs.values():  # a bad setting is an error before the first run
        RunConfig.from_run_config({**cfg.to_run_config(), **own})
    for m in modes:
        if m not in MODES:
            raise ValueError(f"Unknown mask mode {m!r}; valid: {', '.join(MODES)}")
    parts = [parse_partition(p) for p in partitions] if partitions else [("", {})]
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, _ = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    shape = ViTShape.of(encoder.model, cfg.image_size)
    rows: list[dict[str, Any]] = []
    runs: list[RunMetrics] = []
    plan = [(m, r, p, s) for m in modes for r in ratios for p in parts for s in strategies]
    t0 = time.perf_counter()
    for i, (mode, r, (tag, changes), strategy) in enumerate(plan, 1):
        name, own = specs[strategy]
        c = cfg.replace(mask_ratio=r, mask_mode=mode, **changes, **STRATEGIES[name],
                        out_dir=str(run_dir(out, mode, r, _dir_name(strategy), tag)))
        if own:
            c = RunConfig.from_run_config({**c.to_run_config(), **own})
        label = partition_label(c)
        if name in CENTRAL and tag:  # all training data whatever the split: one run per (mode, ratio)
            c = c.replace(partitioner=cfg.partitioner, dirichlet_alpha=cfg.dirichlet_alpha,
                          out_dir=str(run_dir(out, mode, r, _dir_name(strategy))))
        report(f"[{i}/{len(plan)}] {mode} masks, r={r:g}, {label}, {strategy} "
               f"({time.perf_counter() - t0:.0f}s so far)")
        if len(parts) > 1 and mode != "random":  # every partitioning reads its clients' rows from one extraction
            whole_split_features(c.replace(mask_mode=mode))
        if name.startswith("ceiling-"):
            from fedsparse.commands.ceilings import ceiling

            metrics = ceiling(c, name[len("ceiling-"):])
        else:
            metrics = centralized(c) if name == "centralized" else federated(c, engine)
        row = {**row_for(c, strategy, metrics, shape, len(train)), "partition": label}
        rows.append(row)
        runs.append(metrics)
        with_targets(rows, runs)
        report(f"    best {row['best_accuracy']:.4f}, final {row['final_accuracy']:.4f}")
        write(rows, out)
    plot(rows, out / "sweep.png")
    plot_bytes(rows, runs, out / "sweep-bytes.png")
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
        "| data set | mask ratio | masks | partition | strategy | masked images MB | CLS tokens MB | best acc | "
        "final acc | MB down / client / round | MB up / client / round | MB to 90% of FedAvg | "
        "client encoder GMACs | client extract s | client train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['mask_ratio']:g} | {r['mask_mode']} | {r['partition']} | {r['strategy']} | "
            f"{_fmt(r['masked_images_bytes'], 1e6)} | {_fmt(r['cls_bytes'], 1e6)} | {r['best_accuracy']:.4f} | "
            f"{r['final_accuracy']:.4f} | {_fmt(r['bytes_down_per_client'], 1e6, 3)} | "
            f"{_fmt(r['bytes_up_per_client'], 1e6, 3)} | {_fmt(r['mb_to_90pct_fedavg'], 1, 0)} | "
            f"{_fmt(r['client_encoder_gmacs'], 1, 1)} | "
            f"{_fmt(r['client_extract_seconds'], 1, 1)} | {_fmt(r['client_train_seconds'], 1, 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy (best solid, final dashed) per strategy and mode, and storage, against the mask ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    several = len({r["partition"] for r in rows}) > 1
    for key in sorted({(r["strategy"], r["mask_mode"], r["partition"]) for r in rows}):
        sel = sorted((r for r in rows if (r["strategy"], r["mask_mode"], r["partition"]) == key),
                     key=lambda r: r["mask_ratio"])
        xs = [r["mask_ratio"] for r in sel]
        label = f"{key[0]}, {key[1]} masks" + (f", {key[2]}" if several else "") + " (best)"
        line, = ax.plot(xs, [r["best_accuracy"] for r in sel], marker="o", label=label)
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


def plot_bytes(rows: list[dict[str, Any]], runs: list[RunMetrics], path: Path) -> Path | None:
    """Accuracy against the cumulative megabytes the clients received and sent (log scale), one
    curve per federated strategy, one panel per (mode, ratio, partition); the centralized head
    (no bytes) as a dotted line. None when no federated run sent anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({_same_data(r) for r in rows}, key=lambda k: (k[0], k[1], _partition_order(k[2])))
    if not any(r["total_mb"] for r in rows):
        return None
    cols = min(len(panels), 4)
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for row, metrics in zip(rows, runs):
            if _same_data(row) != key:
                continue
            if _name(row) in CENTRAL:
                ax.axhline(row["final_accuracy"], ls=":", color=CEILING_COLORS.get(_name(row), "grey"),
                           label=f"{row['strategy']} (final)")
                continue
            pts = [(mb, acc) for mb, acc in cumulative_mb(metrics) if mb > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 3 else None,
                        label=row["strategy"])
        mode, ratio, part = key
        ax.set(xscale="log", xlabel="MB sent, all clients, both ways (cumulative)", ylabel="test accuracy",
               title=f"{part}, r={ratio:g}" + ("" if mode == "per-image" else f", {mode} masks"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CEILING_COLORS = {"centralized": "grey", "ceiling-mlp": "black", "ceiling-ridge": "tab:brown",
                  "ceiling-residual": "tab:purple"}


def _partition_order(tag: str) -> tuple[int, float]:
    """dir0.1 < dir0.5 < dir1 < iid (growing homogeneity), then the rest."""
    if tag.startswith("dir"):
        return 0, float(tag[3:])
    return (1, 0.0) if tag == "iid" else (2, 0.0)
