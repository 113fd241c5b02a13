"""Heterogeneous federation benchmark: device profiles against a uniform federation.

Runs, on the plain engine and the bundled ``cifar10-sample`` (the quickstart's settings: 20
clients, 4 a round, 30 rounds), for each seed:

- ``hetero``:  ``device-profiles = "tiny:0.5,small:0.3,large:0.2"``;
- ``large``:   every client at ``large`` (``device-profiles = "large:1"``);
- ``mixed``:   every client ``large`` except the mask ratio: half at 0.75, half at 0.5;
- ``uniform``: every client ``large`` at one mask ratio, 0.625, whose encoder MACs per image
  equal the mean of ``mixed``'s (and of ``hetero``'s: 68.0 vs 68.2 M).

The server evaluates every run on its test features at the run's ``mask-ratio`` (0.5); the
final heads are also evaluated at 0.625 and 0.75. Then, per profile, one client's round in a
fresh process with a cold feature cache measures its peak RSS (``VmHWM``) against its budget.

Writes ``OUT/bench_profiles.json`` and prints the Markdown tables of BENCHMARKS.md::

    .venv/bin/python tools/bench_profiles.py --out runs/bench-profiles [--seeds 0 1 2 3 4] [--rounds 30] [--scaling width]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsparse.config import RunConfig, resolve  # noqa: E402
from fedsparse.profiles import PROFILES  # noqa: E402

# benchmark-only profiles: "large" with another mask ratio (registered in this process only)
EXTRA = {"large-r75": dataclasses.replace(PROFILES["large"], name="large-r75", mask_ratio=0.75),
         "large-r625": dataclasses.replace(PROFILES["large"], name="large-r625", mask_ratio=0.625)}
RUNS = {
    "hetero": "tiny:0.5,small:0.3,large:0.2",
    "large": "large:1",
    "mixed": "large-r75:0.5,large:0.5",
    "uniform": "large-r625:1",
}
EVAL_RATIOS = (0.5, 0.625, 0.75)


def run_one(name: str, spec: str, seed: int, rounds: int, out: Path, scaling: str = "width") -> dict:
    from fedsparse.engine.plain import PlainTransport
    from fedsparse.engine.rounds import RoundEngine
    from fedsparse.model.head import evaluate
    from fedsparse.model.residual import build_head
    from fedsparse.task import test_features

    cfg = resolve(ROOT / "configs" / "quickstart.toml", {"device-profiles": spec, "seed": seed, "num-rounds": rounds,
                                                          "ist-scaling": scaling, "out-dir": str(out / f"{name}-seed{seed}")})
    t0 = time.perf_counter()
    engine = RoundEngine(cfg, report=lambda s: None)
    metrics = engine.run(PlainTransport(cfg))
    head = build_head(engine.state)  # the default's residual head (ridge + MLP), or a plain MLP
    at = {}
    for r in EVAL_RATIOS:
        feats, _ = test_features(cfg.replace(mask_ratio=r))
        at[str(r)] = evaluate(head, feats.x, feats.y)[0]
    if abs(at[str(cfg.mask_ratio)] - metrics.final_accuracy) > 1e-9:  # the head evaluated as the server does
        raise RuntimeError(f"{name} seed {seed}: final head at r={cfg.mask_ratio} scores {at[str(cfg.mask_ratio)]}, "
                           f"the run reported {metrics.final_accuracy}")
    per_profile: dict[str, dict[str, list[float]]] = {}
    for rnd in metrics.rounds:
        for rec in rnd.per_client:
            if rec.status != "ok" or not rec.slice_dims:  # failed, or statistics only (the closed-form start)
                continue
            p = per_profile.setdefault(rec.profile, {k: [] for k in ("bytes_down", "bytes_up", "gmacs", "share",
                                                                         "predicted_mib", "hidden")})
            p["bytes_down"].append(rec.bytes_down)
            p["bytes_up"].append(rec.bytes_up)
            p["gmacs"].append(rec.encoder_macs_per_image * rec.examples / 1e9)
            p["share"].append(rec.slice_share)
            p["predicted_mib"].append(rec.predicted_peak_bytes / 2**20)
            p["hidden"].append(rec.slice_dims[1])
    summary = {prof: {k: statistics.fmean(v) for k, v in vals.items()} | {"samples": len(vals["bytes_down"])}
               for prof, vals in per_profile.items()}
    return {"run": name, "spec": spec, "seed": seed, "final_accuracy": metrics.final_accuracy,
            "best_accuracy": metrics.best_accuracy, "accuracy_at_ratio": at, "per_profile": summary,
            "failures": sum(r.failures for r in metrics.rounds), "seconds": time.perf_counter() - t0}


CHILD = r"""
import json, sys, dataclasses, warnings
import flwr.clientapp  # a ClientApp process imports Flower too
import fedsparse.engine.client as client
from fedsparse.processes import peak_rss_bytes
from fedsparse.config import RunConfig
from fedsparse.model.head import MLPHead
from fedsparse.profiles import PROFILES, profile_assignment
name, width, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = RunConfig(cache_dir=cache, device_profiles="tiny:0.5,small:0.3,large:0.2")
pid = profile_assignment(cfg.device_profiles, cfg.num_clients, cfg.seed).index(name)
prof = PROFILES[name]
arrays = MLPHead(192, (width, width), 10).state_dict()
task = {"server-round": 1, "local-steps": prof.local_steps, "batch-size": prof.batch_size, "lr": 1e-3}
_, n, m = client.run_task(cfg, pid, cfg.num_clients, arrays, task, profile=prof)
print(json.dumps({"profile": name, "peak_rss_mib": peak_rss_bytes() / 2**20, "predicted_mib": m["predicted-peak-bytes"] / 2**20,
                  "budget_mib": prof.memory_mib, "encoder_batch": m["encoder-batch"], "extract_seconds": m["extract-seconds"],
                  "cache_hit": m["feature-cache-hit"], "examples": n}))
"""


def measure_memory(widths: dict[str, int]) -> list[dict]:
    """Per profile, one client's first round in a fresh process with a cold feature cache."""
    from fedsparse.data.datasets import default_cache_dir

    out = []
    for name, width in widths.items():
        with tempfile.TemporaryDirectory(prefix="fs-bench-mem-") as cache:
            os.symlink(default_cache_dir() / "extracted", Path(cache) / "extracted")  # the decoded sample, no features
            proc = subprocess.run([sys.executable, "-c", CHILD, name, str(width), cache], capture_output=True, text=True,
                                  cwd=ROOT, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe for {name} failed: {proc.stderr.strip().splitlines()[-1]}")
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def tables(results: list[dict], memory: list[dict]) -> str:
    lines = ["| run | device profiles | final accuracy (seeds) | mean | at r=0.625 | at r=0.75 |", "|---|---|---|---|---|---|"]
    for name, spec in RUNS.items():
        rs = [r for r in results if r["run"] == name]
        accs = [r["final_accuracy"] for r in rs]
        lines.append(f"| `{name}` | `{spec}` | {' / '.join(f'{a:.4f}' for a in accs)} | {statistics.fmean(accs):.4f} | "
                     f"{statistics.fmean(r['accuracy_at_ratio']['0.625'] for r in rs):.4f} | "
                     f"{statistics.fmean(r['accuracy_at_ratio']['0.75'] for r in rs):.4f} |")
    lines += ["", "| run | profile | replies | hidden slice | share of head bytes | kB down / up per round | "
              "encoder GMACs per client |", "|---|---|---|---|---|---|---|"]
    for name in ("hetero", "large"):
        rs = [r for r in results if r["run"] == name]
        for prof in ("tiny", "small", "large"):
            vals = [r["per_profile"][prof] for r in rs if prof in r["per_profile"]]
            if not vals:
                continue
            f = lambda k: statistics.fmean(v[k] for v in vals)  # noqa: E731
            lines.append(f"| `{name}` | {prof} | {sum(v['samples'] for v in vals)} | {f('hidden'):.0f} | {f('share'):.3f} | "
                         f"{f('bytes_down') / 1e3:.1f} / {f('bytes_up') / 1e3:.1f} | {f('gmacs'):.1f} |")
    lines += ["", "| profile | budget | measured peak RSS (fresh process, cold cache) | predicted | encoder batch |",
              "|---|---|---|---|---|"]
    for m in memory:
        lines.append(f"| {m['profile']} | {m['budget_mib']} MiB | {m['peak_rss_mib']:.0f} MiB | {m['predicted_mib']:.0f} MiB | "
                     f"{m['encoder_batch']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-profiles")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--scaling", choices=("none", "width"), default="width",
                    help="ist-scaling of every run (configs/profiles.toml ships width)")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    PROFILES.update(EXTRA)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from fedsparse.task import whole_split_features

    base = resolve(ROOT / "configs" / "quickstart.toml")
    for ratio, dtype in sorted({(p.mask_ratio, p.encoder_dtype) for p in PROFILES.values()}):
        whole_split_features(base.replace(mask_ratio=ratio, encoder_dtype=dtype))  # each image once, for every seed
    results = []
    for seed in args.seeds:
        for name, spec in RUNS.items():
            res = run_one(name, spec, seed, args.rounds, out, args.scaling)
            print(f"{name} seed {seed}: final {res['final_accuracy']:.4f} ({res['seconds']:.0f}s)", flush=True)
            results.append(res)
    widths = {}
    for prof in ("tiny", "small", "large"):
        hs = [r["per_profile"][prof]["hidden"] for r in results if r["run"] == "hetero" and prof in r["per_profile"]]
        widths[prof] = round(statistics.fmean(hs)) if hs else 256
    memory = [] if args.skip_memory else measure_memory(widths)
    (out / "bench_profiles.json").write_text(json.dumps({"scaling": args.scaling, "results": results, "memory": memory},
                                                        indent=2))
    print(tables(results, memory))


if __name__ == "__main__":
    main()
