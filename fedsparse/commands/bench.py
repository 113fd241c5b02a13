"""``fedsparse bench CONFIG``: what a client pays, measured on this machine.

Per mask ratio (and encoder dtype):

- encoder work: MACs per image, analytic (``fedsparse.accounting.costs``) and counted by
  ``torch.utils.flop_counter`` on the real forward (attention through the math kernel, so
  the counter sees it); images per second, and the speed-up over r = 0 in fp32 measured in
  the same run; for bf16, the mean cosine of its CLS vectors with fp32's;
- client peak memory during feature extraction, in a **fresh process** per ratio (process
  RSS and anonymous RSS measured; tensor memory analytic);
- storage on the device: the masked images (analytic: 8-bit visible patches) and the CLS
  cache (measured: the cache file on disk).

Per strategy (IST with K clients per round, FedAvg with the full head), through the real
Strategy adapter and ClientApp in this process (``strategies.in_process.one_round``):

- bytes down and up per client per round, measured on the serialized Flower messages, and
  their ratio to FedAvg's;
- client peak memory during local training, in a fresh process per strategy.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to the output folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fedsparse.accounting.costs import (
    ViTShape,
    cls_cache_bytes,
    encoder_macs,
    extraction_tensor_bytes,
    head_train_tensor_bytes,
    masked_images_bytes,
)
from fedsparse.config import RunConfig
from fedsparse.data.datasets import ImageSet, default_cache_dir, load_splits
from fedsparse.inputs.encoder import Encoder, encode, load_image, normalize
from fedsparse.inputs.features import (
    DECODE_CHUNK,
    FeatureCache,
    extract,
    feature_key,
    get_encoder,
)
from fedsparse.model.head import state_dims
from fedsparse.inputs.masking import masks_for
from fedsparse.accounting.memory import PeakAnonSampler
from fedsparse.processes import peak_rss_bytes, rss_anon

DTYPES = ("fp32", "bf16")


def bench_images(cfg: RunConfig, n: int) -> ImageSet:
    """The first ``n`` training images of ``cfg``'s data set (its order is seeded and fixed)."""
    train, _ = load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    if n > len(train):
        raise ValueError(f"--extraction-images {n} exceeds the {len(train)} training images of {cfg.dataset}")
    return train.subset(range(n))


def decode(images: ImageSet, image_size: int, preprocessing: str) -> torch.Tensor:
    pix = [load_image(images.root / p, image_size) for p in images.paths]
    return normalize(torch.stack([p for p in pix if p is not None]), preprocessing)


def counted_macs(encoder: Encoder, mask_ratio: float) -> int:
    """MACs of one image's visible-patch forward as ``torch.utils.flop_counter`` counts them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fedsparse.inputs.encoder import visible_cls

    x = torch.zeros(1, 3, encoder.image_size, encoder.image_size)
    keep = masks_for(["count"], encoder.num_patches, mask_ratio, 0)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        visible_cls(encoder.model, x, keep)
    return counter.get_total_flops() // 2


def time_encode(encoder: Encoder, x: torch.Tensor, keep: torch.Tensor, dtype: str, repeats: int, batch_size: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` images per second of ``encode`` (after a warm-up), and its output."""
    encode(encoder, x[:2], keep[:2], dtype)
    best, out = float("inf"), torch.empty(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = encode(encoder, x, keep, dtype, batch_size=batch_size)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best, out


def encoder_rows(
    cfg: RunConfig, ratios: list[float], dtypes: list[str], n_images: int, repeats: int = 2,
    batch_size: int = 32, report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Speed, MACs and bf16 agreement of ``cfg``'s encoder at each mask ratio."""
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    shape = ViTShape.of(encoder.model, cfg.image_size)
    images = bench_images(cfg, n_images)
    x = decode(images, cfg.image_size, cfg.preprocessing)
    rows, base_rate = [], None
    for r in sorted(ratios):
        keep = masks_for(list(images.paths), encoder.num_patches, r, cfg.mask_seed, cfg.mask_mode)
        ref = None
        for dtype in dtypes:
            rate, out = time_encode(encoder, x, keep, dtype, repeats, batch_size)
            if dtype == "fp32":
                ref = out
                if base_rate is None and r == 0:
                    base_rate = rate
            row = {
                "mask_ratio": r, "dtype": dtype, "images": len(x), "images_per_second": rate,
                "macs_analytic": encoder_macs(shape, r), "macs_counted": counted_macs(encoder, r),
                "tokens": int(keep.shape[1]) + shape.prefix_tokens,
                "cosine_vs_fp32": None if ref is None or dtype == "fp32"
                else torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item(),
            }
            rows.append(row)
            report(f"encoder r={r} {dtype}: {rate:.1f} img/s, {row['macs_analytic'] / 1e9:.3f} GMACs/img"
                   + ("" if row["cosine_vs_fp32"] is None else f", cosine vs fp32 {row['cosine_vs_fp32']:.5f}"))
    for row in rows:
        row["speedup_vs_r0_fp32"] = row["images_per_second"] / base_rate if base_rate else None
    return rows


# --- fresh-process measurements ---------------------------------------------------------


def _worker(kind: str, payload: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m fedsparse.commands.bench <kind> <payload>`` in a fresh process; its JSON answer."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    proc = subprocess.run(
        [sys.executable, "-m", "fedsparse.commands.bench", kind, json.dumps(payload)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"bench worker {kind} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extraction_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load the encoder and extract ``images`` features at one ratio, uncached."""
    cfg = RunConfig.from_run_config(payload["config"])
    baseline, anon_baseline = peak_rss_bytes(), rss_anon()
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    images = bench_images(cfg, payload["images"])
    loaded, anon_loaded = peak_rss_bytes(), rss_anon()
    t0 = time.perf_counter()
    with PeakAnonSampler() as anon:
        x, y, skipped = extract(encoder, images, mask_ratio=cfg.mask_ratio, mask_seed=cfg.mask_seed,
                                mask_mode=cfg.mask_mode, preprocessing=cfg.preprocessing, dtype=cfg.encoder_dtype)
    seconds = time.perf_counter() - t0
    # what the device keeps: the cache entry, written as a run writes it
    cache = FeatureCache(default_cache_dir(cfg.cache_dir))
    key = feature_key(encoder, images, cfg.mask_ratio, cfg.mask_seed, cfg.mask_mode, "bench", cfg.preprocessing,
                      cfg.encoder_dtype)
    entry = cache.store(key, x, y, skipped)
    return {"cache_file_bytes": entry.stat().st_size, "rss_after_imports": baseline, "rss_after_encoder": loaded, "peak_rss": peak_rss_bytes(),
            "anon_after_imports": anon_baseline, "anon_after_encoder": anon_loaded, "peak_anon": anon.peak,
            "seconds": seconds, "features": list(x.shape)}


def training_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the first client of a real round 1 answers its training message."""
    from strategies.in_process import one_round

    cfg = RunConfig.from_run_config(payload["config"])
    baseline, anon_baseline = peak_rss_bytes(), rss_anon()
    t0 = time.perf_counter()
    with PeakAnonSampler() as anon:
        trip = one_round(cfg, answer=1)
    if len(trip.sent) != cfg.clients_per_round or len(trip.replies) != 1:
        raise RuntimeError(f"expected {cfg.clients_per_round} messages and 1 reply, "
                           f"got {len(trip.sent)} and {len(trip.replies)}")
    return {"rss_after_imports": baseline, "peak_rss": peak_rss_bytes(), "anon_after_imports": anon_baseline,
            "peak_anon": anon.peak, "seconds": time.perf_counter() - t0,
            "bytes_down": trip.bytes_down[0], "bytes_up": trip.bytes_up[0]}


def memory_rows(cfg: RunConfig, ratios: list[float], n_images: int, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Peak RSS of extraction at each ratio, each in a fresh process, plus storage."""
    encoder = get_encoder(cfg.encoder, cfg.image_size)
    shape = ViTShape.of(encoder.model, cfg.image_size)
    rows = []
    for r in sorted(ratios):
        c = cfg.replace(mask_ratio=r)
        m = _worker("extract", {"config": c.to_run_config(), "images": n_images})
        row = {
            "mask_ratio": r, "images": n_images,
            "extract_peak_rss": m["peak_rss"], "rss_after_encoder": m["rss_after_encoder"],
            "rss_after_imports": m["rss_after_imports"], "extract_seconds": m["seconds"],
            "extract_peak_anon": m["peak_anon"], "anon_after_encoder": m["anon_after_encoder"],
            "anon_after_imports": m["anon_after_imports"],
            "extract_tensor_bytes_analytic": extraction_tensor_bytes(shape, r, 256, min(DECODE_CHUNK, n_images)),
            "masked_images_bytes_analytic": masked_images_bytes(n_images, shape, r),
            "full_images_bytes_analytic": masked_images_bytes(n_images, shape, 0.0),
            "cls_cache_file_bytes": m["cache_file_bytes"],
            "cls_tensor_bytes_analytic": cls_cache_bytes(n_images, shape.dim),
        }
        rows.append(row)
        report(f"extraction r={r}: peak anonymous RSS {row['extract_peak_anon'] / 2**20:.0f} MiB "
               f"(with encoder loaded {row['anon_after_encoder'] / 2**20:.0f}), peak RSS {row['extract_peak_rss'] / 2**20:.0f} MiB "
               f"(after imports {row['rss_after_imports'] / 2**20:.0f}, with encoder {row['rss_after_encoder'] / 2**20:.0f}), "
               f"{row['extract_seconds']:.1f}s; masked images {row['masked_images_bytes_analytic'] / 1e6:.2f} MB, "
               f"CLS cache {row['cls_cache_file_bytes'] / 1e6:.3f} MB")
    return rows


def strategy_rows(cfg: RunConfig, report: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Bytes per client per round (all K clients, in process) and a client's training memory (fresh process)."""
    from fedsparse.engine.rounds import sample_clients
    from fedsparse.protocol import ARRAYS_KEY
    from fedsparse.task import client_features, test_features
    from strategies.in_process import one_round

    test_features(cfg)
    # round 1's clients (the same for every strategy): their features cached before the fresh
    # training process runs, so that it measures training, not extraction
    if cfg.mask_mode != "random":  # random masks are never cached
        for pid in sample_clients(cfg.seed, 1, range(cfg.num_clients), cfg.clients_per_round):
            client_features(cfg, pid, cfg.num_clients)
    rows = []
    for strategy in ("ist", "fedavg"):
        # IST's slice round: with the default closed-form start round 1 only collects statistics,
        # and later rounds send the slice plus the ridge head (in x classes floats) both ways
        c = cfg.replace(strategy=strategy, ist_start="random")
        trip = one_round(c)
        fresh = _worker("train", {"config": c.to_run_config()})
        sliced = trip.sent[0].content[ARRAYS_KEY].to_torch_state_dict()
        dims = list(state_dims(sliced))
        rows.append({
            "strategy": strategy, "clients_per_round": cfg.clients_per_round,
            "bytes_down_per_client": sum(trip.bytes_down) / len(trip.bytes_down),
            "bytes_up_per_client": sum(trip.bytes_up) / len(trip.bytes_up),
            "train_peak_rss": fresh["peak_rss"], "rss_after_imports": fresh["rss_after_imports"],
            "train_peak_anon": fresh["peak_anon"], "anon_after_imports": fresh["anon_after_imports"],
            "train_tensor_bytes_analytic": head_train_tensor_bytes(dims, cfg.batch_size),
            "client_model_dims": dims,
        })
    fed = next(r for r in rows if r["strategy"] == "fedavg")
    for row in rows:
        row["bytes_down_vs_fedavg"] = row["bytes_down_per_client"] / fed["bytes_down_per_client"]
        row["bytes_up_vs_fedavg"] = row["bytes_up_per_client"] / fed["bytes_up_per_client"]
        report(f"{row['strategy']} (K={cfg.clients_per_round}): {row['bytes_down_per_client'] / 1e3:.1f} kB down, "
               f"{row['bytes_up_per_client'] / 1e3:.1f} kB up per client per round "
               f"({row['bytes_down_vs_fedavg']:.3f} x FedAvg); training peak RSS {row['train_peak_rss'] / 2**20:.0f} MiB, "
               f"anonymous {row['train_peak_anon'] / 2**20:.0f} MiB")
    return rows


# --- the command --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def bench(
    cfg: RunConfig, out_dir: str | Path, ratios: list[float], dtypes: list[str], images: int, speed_images: int,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every measurement; write bench.json, bench.md and bench.png; return the JSON content."""
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"Unknown dtype {d!r}; valid: {', '.join(DTYPES)}")
    if 0.0 not in ratios:
        ratios = [0.0, *ratios]  # speed-ups are relative to r = 0, measured in the same run
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {
        "machine": machine(),
        "config": cfg.to_run_config(),
        "encoder": encoder_rows(cfg, ratios, dtypes, speed_images, report=report),
        "memory": memory_rows(cfg, ratios, images, report=report),
        "strategies": strategy_rows(cfg, report=report),
    }
    result["seconds"] = time.perf_counter() - t0
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    (out / "bench.md").write_text(markdown(result))
    plot(result, out / "bench.png")
    return result


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}"


def markdown(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [
        f"# fedsparse bench: {cfg['encoder']} at {cfg['image-size']}px on {cfg['dataset']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}.",
        "Every figure is measured in this run except the columns marked *analytic*.",
        "",
        "## Encoder work per image",
        "",
        "| mask ratio | dtype | tokens | GMACs (analytic) | GMACs (counted) | img/s | speed-up vs r=0 fp32 | cosine vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["encoder"]:
        cos = "" if r["cosine_vs_fp32"] is None else f"{r['cosine_vs_fp32']:.5f}"
        lines.append(f"| {r['mask_ratio']} | {r['dtype']} | {r['tokens']} | {r['macs_analytic'] / 1e9:.3f} | "
                     f"{r['macs_counted'] / 1e9:.3f} | {r['images_per_second']:.1f} | {r['speedup_vs_r0_fp32']:.2f}x | {cos} |")
    lines += [
        "",
        f"## Client memory and storage for feature extraction ({result['memory'][0]['images']} images, fresh process per ratio)",
        "",
        "Anonymous RSS (`RssAnon`: heap and tensors, sampled every 2 ms) is what the work needs; RSS adds the",
        "file-backed pages of the mapped libraries (about 0.8-1 GB for this CUDA build of torch, shared and evictable).",
        "",
        "| mask ratio | peak anonymous MiB | anonymous with encoder loaded MiB | peak RSS MiB | RSS with encoder loaded MiB | tensor MiB (analytic) | seconds | masked images MB (analytic) | CLS cache file MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["memory"]:
        lines.append(f"| {r['mask_ratio']} | {r['extract_peak_anon'] / 2**20:.0f} | {r['anon_after_encoder'] / 2**20:.0f} | "
                     f"{r['extract_peak_rss'] / 2**20:.0f} | {r['rss_after_encoder'] / 2**20:.0f} | "
                     f"{r['extract_tensor_bytes_analytic'] / 2**20:.0f} | {r['extract_seconds']:.1f} | "
                     f"{_mb(r['masked_images_bytes_analytic'])} | {_mb(r['cls_cache_file_bytes'])} |")
    lines += [
        "",
        f"## Per client per round, by strategy ({cfg['clients-per-round']} clients per round, head {cfg['hidden']})",
        "",
        "| strategy | client model | kB down | kB up | down vs FedAvg | training peak RSS MiB (fresh process) | peak anonymous MiB | training tensor MiB (analytic) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["strategies"]:
        lines.append(f"| {r['strategy']} | {'-'.join(map(str, r['client_model_dims']))} | {r['bytes_down_per_client'] / 1e3:.1f} | "
                     f"{r['bytes_up_per_client'] / 1e3:.1f} | {r['bytes_down_vs_fedavg']:.3f} | "
                     f"{r['train_peak_rss'] / 2**20:.0f} | {r['train_peak_anon'] / 2**20:.0f} | {r['train_tensor_bytes_analytic'] / 2**20:.2f} |")
    lines += ["", f"Total bench time: {result['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Three panels against the mask ratio: img/s (per dtype), GMACs, extraction peak RSS and storage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for dtype in sorted({r["dtype"] for r in result["encoder"]}):
        rows = [r for r in result["encoder"] if r["dtype"] == dtype]
        axes[0].plot([r["mask_ratio"] for r in rows], [r["images_per_second"] for r in rows], marker="o", label=dtype)
    axes[0].set(xlabel="mask ratio", ylabel="images / s", title="encoder throughput")
    axes[0].legend()
    fp32 = [r for r in result["encoder"] if r["dtype"] == result["encoder"][0]["dtype"]]
    axes[1].plot([r["mask_ratio"] for r in fp32], [r["macs_analytic"] / 1e9 for r in fp32], marker="o", label="analytic")
    axes[1].plot([r["mask_ratio"] for r in fp32], [r["macs_counted"] / 1e9 for r in fp32], ls="--", marker="x", label="counted")
    axes[1].set(xlabel="mask ratio", ylabel="GMACs / image", title="encoder work")
    axes[1].legend()
    mem = result["memory"]
    xs = [r["mask_ratio"] for r in mem]
    axes[2].plot(xs, [r["extract_peak_anon"] / 2**20 for r in mem], marker="o", label="extraction peak anonymous RSS (MiB)")
    axes[2].plot(xs, [r["extract_peak_rss"] / 2**20 for r in mem], marker="x", ls=":", label="extraction peak RSS (MiB)")
    axes[2].plot(xs, [r["masked_images_bytes_analytic"] / 2**20 for r in mem], marker="s", label="masked images (MiB)")
    axes[2].set(xlabel="mask ratio", ylabel="MiB", title="client memory and storage")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _main(argv: list[str]) -> int:
    """Entry point of the fresh worker processes: ``python -m fedsparse.commands.bench extract|train JSON``."""
    import warnings

    warnings.simplefilter("ignore")
    kind, payload = argv[0], json.loads(argv[1])
    result = {"extract": extraction_worker, "train": training_worker}[kind](payload)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
