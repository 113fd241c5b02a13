"""The heterogeneity table of docs/benchmarks/heterogeneity.md from a sweep folder.

Reads the runs of ``fedsparse sweep configs/scale.toml --partitions 0.1,0.5,1,iid --strategies
"ist,...,ceiling-ridge,ceiling-residual,ceiling-mlp" --out DIR`` (each run's ``metrics.json``),
adds, for each IST run from the closed form, the accuracy of its ridge head alone (``skip``,
the MLP left out: ``fed3r`` on exactly the clients counted so far) from its ``model.pt``, and
rows of an earlier sweep (a CSV of ``fedsparse sweep``, ``--baselines``) for the strategies
this sweep did not rerun. Writes ``heterogeneity.csv``, ``heterogeneity.md`` (the table and
the goals) and ``heterogeneity.png`` (accuracy by round, one panel per partition).

    .venv/bin/python tools/heterogeneity_table.py DIR --baselines docs/benchmarks/heterogeneity.csv \
        --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("dir0.1", "dir0.5", "dir1", "iid")
CEILINGS = ("ceiling-ridge", "ceiling-residual", "ceiling-mlp")


def ridge_alone(run: Path) -> float | None:
    """Test accuracy of the ridge head that an IST run from the closed form last solved (the
    algorithm's state in ``checkpoint.pt``: ``fed3r`` on exactly the clients counted so far,
    without what training added); None for a run without one."""
    import torch

    from fedsparse.config import RunConfig
    from fedsparse.engine.checkpoint import Checkpoint
    from fedsparse.model.head import MLPHead, evaluate
    from fedsparse.model.residual import rf_part, skip_input
    from fedsparse.task import test_features

    try:
        ckpt = Checkpoint.load(run)
    except (OSError, ValueError):
        return None
    w, b = ckpt.algorithm.get("ridge.skip.weight"), ckpt.algorithm.get("ridge.skip.bias")
    if w is None:
        return None
    cfg = RunConfig.from_run_config(ckpt.config)
    test, _ = test_features(cfg)
    head = MLPHead(w.shape[1], [], w.shape[0])
    head.load_state_dict({"layers.0.weight": torch.as_tensor(w), "layers.0.bias": torch.as_tensor(b)})
    with torch.no_grad():  # what the skip reads: the features, and their random features if the run has them
        x = skip_input({**rf_part(ckpt.state), "skip.weight": torch.as_tensor(w)}, test.x)
    return evaluate(head, x, test.y)[0]


def main() -> None:
    from fedsparse.engine.metrics import RunMetrics

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--baselines", type=Path, help="CSV of an earlier sweep: rows of strategies not rerun here")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    rows, curves = [], {}
    for run in sorted(args.sweep.glob("per-image-r0.5-*")):
        try:
            m = RunMetrics.load(run)
        except (OSError, ValueError):
            continue
        name = run.name.removeprefix("per-image-r0.5-")
        part = next((p for p in PARTS if name.startswith(p + "-")), "")
        strategy = name[len(part) + 1:] if part else name
        accs = [r.accuracy for r in m.rounds if r.accuracy is not None]
        if not accs:
            continue
        fed = m.engine not in ("ceiling", "centralized")
        n = len(m.rounds)
        row = {"partition": part or "all", "strategy": strategy, "source": "this sweep",
               "rounds": n if fed else "", "final_accuracy": accs[-1], "best_accuracy": max(accs),
               "bytes_down_per_client": sum(r.bytes_down_per_client for r in m.rounds) / n if fed else "",
               "bytes_up_per_client": sum(r.bytes_up_per_client for r in m.rounds) / n if fed else "",
               "max_bytes_per_client_round": max(r.bytes_down_per_client + r.bytes_up_per_client for r in m.rounds)
               if fed else "",
               "ridge_alone": ridge_alone(run) if fed else ""}
        rows.append(row)
        if fed:
            curves[(row["partition"], strategy)] = [(r.round, r.accuracy) for r in m.rounds if r.accuracy is not None]
    if args.baselines:
        have = {(r["partition"], r["strategy"]) for r in rows}
        with open(args.baselines) as fh:
            for b in csv.DictReader(fh):
                # a fedsparse sweep CSV from before IST started from the closed form: its "ist" was the
                # random start; this tool's own CSV (it has a "source" column) names rows as they are
                strategy = b["strategy"]
                if "source" not in b and strategy == "ist":
                    strategy = "ist (random start)"
                if (b["partition"], strategy) in have or b["strategy"].startswith("centralized"):
                    continue
                rows.append(baseline_row(b, strategy))
    args.out.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with open(args.out / "heterogeneity.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    (args.out / "heterogeneity-table.md").write_text(table(rows))
    plot(rows, curves, args.out / "heterogeneity.png")
    print(table(rows))
    print(goals(rows))


def baseline_row(b: dict, strategy: str) -> dict:
    """A row of ``--baselines``: a ``fedsparse sweep`` CSV, or this tool's own CSV (whose rows
    keep their ``source``, rounds and busiest-round bytes; a ceiling has no rounds or bytes)."""
    def num(key: str):
        v = b.get(key, "")
        return float(v) if v not in ("", None) else ""

    down, up = num("bytes_down_per_client"), num("bytes_up_per_client")
    busiest = num("max_bytes_per_client_round")
    if busiest == "" and down != "":
        busiest = down + (up or 0.0)
    rounds = num("rounds")
    ridge = num("ridge_alone")
    return {"partition": b["partition"], "strategy": strategy,
            "source": b.get("source") if b.get("source") not in ("", None, "this sweep") else "earlier sweep",
            "rounds": int(rounds) if rounds != "" else "", "final_accuracy": float(b["final_accuracy"]),
            "best_accuracy": float(b["best_accuracy"]), "bytes_down_per_client": down,
            "bytes_up_per_client": up, "max_bytes_per_client_round": busiest, "ridge_alone": ridge}


def _mb(v) -> str:
    return "" if v in ("", None) else f"{float(v) / 1e6:.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| partition | strategy | rounds | final acc | best acc | its ridge head alone (fed3r on the same clients) | "
             "MB down / client / round | MB up / client / round | MB both ways, busiest round | measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {p: i for i, p in enumerate(("all", *PARTS))}
    for r in sorted(rows, key=lambda r: (order.get(r["partition"], 9), r["source"] != "this sweep", r["strategy"])):
        ridge = f"{r['ridge_alone']:.4f}" if isinstance(r["ridge_alone"], float) else ""
        lines.append(f"| {r['partition']} | {r['strategy']} | {r['rounds']} | {r['final_accuracy']:.4f} | "
                     f"{r['best_accuracy']:.4f} | {ridge} | {_mb(r['bytes_down_per_client'])} | "
                     f"{_mb(r['bytes_up_per_client'])} | {_mb(r['max_bytes_per_client_round'])} | {r['source']} |")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> str:
    def get(part, strategy):
        return next((r for r in rows if r["partition"] == part and r["strategy"] == strategy), None)

    ceil = [r for r in rows if r["strategy"].split("(")[0] in CEILINGS]  # e.g. ceiling-ridge(ridge-features=0) too
    best_ceiling = max(ceil, key=lambda r: r["final_accuracy"]) if ceil else None
    out = ["| partition | IST (default) | max(fed3r, FedAvg) | IST - max | best ceiling | IST - ceiling | "
           "bytes per client, busiest round / FedAvg's |", "|---|---|---|---|---|---|---|"]
    for p in PARTS:
        ist, f3, fa = get(p, "ist"), get(p, "fed3r"), get(p, "fedavg")
        if ist is None:
            continue
        base = max([r["final_accuracy"] for r in (f3, fa) if r])
        ratio = ""
        if fa:  # the busiest round (the statistics of new clients included) against FedAvg's every round
            ratio = f"{ist['max_bytes_per_client_round'] / fa['max_bytes_per_client_round']:.3f}"
        c = best_ceiling["final_accuracy"] if best_ceiling else float("nan")
        out.append(f"| {p} | {ist['final_accuracy']:.4f} | {base:.4f} | {100 * (ist['final_accuracy'] - base):+.1f} | "
                   f"{c:.4f} ({best_ceiling['strategy'] if best_ceiling else ''}) | "
                   f"{100 * (ist['final_accuracy'] - c):+.1f} | {ratio} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARTS), figsize=(4.2 * len(PARTS), 3.6), sharey=True)
    for ax, p in zip(axes, PARTS):
        for (part, strategy), pts in sorted(curves.items()):
            if part == p:
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=strategy)
        for r in rows:
            if r["partition"] == "all":
                ax.axhline(r["final_accuracy"], ls=":", color={"ceiling-ridge": "tab:brown", "ceiling-mlp": "black",
                                                                "ceiling-residual": "tab:purple"}.get(r["strategy"], "grey"),
                           label=r["strategy"])
            elif r["partition"] == p and r["source"] != "this sweep" and r["strategy"] in ("fedavg", "fed3r",
                                                                                          "ist (random start)"):
                ax.axhline(r["final_accuracy"], ls="--", lw=0.8, color={"fedavg": "tab:red", "fed3r": "tab:green"}.get(
                    r["strategy"], "tab:gray"), label=f"{r['strategy']} (final, earlier sweep)")
        ax.set(title=p, xlabel="round", ylim=(0.3, 0.62))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
