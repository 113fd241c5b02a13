"""The ``fedsparse`` command.

    fedsparse run [CONFIG] [--run-config "k=v ..."] [--out DIR] [--resume DIR] [--engine simulation]
    fedsparse pretrain DATA --out DIR [--epochs N] [--device auto] [--dtype fp32] [--resume] [--max-minutes M]
    fedsparse probe [CONFIG] [--encoders builtin,builtin-random,pixels]
    fedsparse bench [CONFIG] [--mask-ratios 0,0.5,0.75,0.9] [--dtypes fp32,bf16] [--out DIR]
    fedsparse sweep [CONFIG] [--mask-ratios 0,0.1,...,0.9] [--strategies ist,fedavg,centralized] [--out DIR]
    fedsparse overhead [CONFIG] [--clients-per-round 10,100,1000] [--rounds 3] [--out DIR]
    fedsparse keys

Errors in user input (a missing file, an unknown key or value) end the command with one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from fedsparse.config import RunConfig, config_keys, load_toml, parse_overrides, resolve

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"


def _default_config() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


ENGINES = ("simulation", "in-process", "plain")


def run_config_for(args: argparse.Namespace) -> RunConfig:
    """The run's config: defaults, CONFIG (or the resumed run's config), then overrides."""
    overrides = parse_overrides(args.run_config or "")
    if args.out:
        overrides["out-dir"] = str(Path(args.out).resolve())
    if args.resume:
        from fedsparse.engine.checkpoint import Checkpoint

        resume_dir = Path(args.resume).resolve()
        saved = Checkpoint.load(resume_dir).config
        base = dict(saved) if args.config is None else load_toml(args.config)
        cfg = RunConfig.from_run_config({**base, **overrides, "out-dir": str(resume_dir), "resume": True})
    else:
        cfg = resolve(args.config or _default_config(), overrides)
    if not Path(cfg.out_dir).is_absolute():
        cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).resolve()))
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from fedsparse.engine.checkpoint import Checkpoint, check_resumable
    from fedsparse.task import preflight

    cfg = run_config_for(args)
    if cfg.resume:
        ckpt = Checkpoint.load(cfg.out_dir)
        check_resumable(ckpt, cfg.to_run_config())
        if ckpt.round >= cfg.num_rounds:
            print(f"fedsparse run: {cfg.out_dir} already finished its {ckpt.round} rounds; nothing to resume")
            return 0
    source = args.resume or args.config or _default_config() or "defaults"
    print(f"fedsparse run ({args.engine}): {source} -> {cfg.out_dir}", flush=True)
    preflight(cfg)
    metrics = run_with_engine(cfg, args.engine)
    print(f"done: {metrics.summary()}")
    mem = metrics.memory
    if mem.get("available"):
        print(f"memory: peak summed RSS {mem['peak_summed_rss_bytes'] / 2**30:.2f} GiB "
              f"(PSS {mem['peak_summed_pss_bytes'] / 2**30:.2f} GiB) over up to {mem['peak_processes']} processes")
    print(f"results: {cfg.out_dir}/metrics.json, model.pt, checkpoint.pt, accuracy.png")
    return 0


def run_with_engine(cfg: RunConfig, engine: str):
    """Run ``cfg`` on one of ``ENGINES``; returns its ``RunMetrics``."""
    if engine == "simulation":
        from strategies.simulation import simulate

        return simulate(cfg)
    if engine == "in-process":
        from strategies.in_process import in_process_run

        return in_process_run(cfg)
    if engine == "plain":
        from fedsparse.engine.plain import PlainTransport
        from fedsparse.engine.rounds import RoundEngine

        return RoundEngine(cfg).run(PlainTransport(cfg))
    raise ValueError(f"Unknown engine {engine!r}; valid choices: {', '.join(ENGINES)}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedsparse.data.datasets import load_splits
    from fedsparse.inputs.pretrain import PretrainConfig, load_images, pretrain, resolve_device

    cfg = PretrainConfig(image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_epochs=args.warmup_epochs, mask_ratio=args.mask_ratio, seed=args.seed,
                         device=resolve_device(args.device), dtype=args.dtype)
    train, _ = load_splits("imagefolder", args.data, args.cache_dir)
    print(f"fedsparse pretrain: {len(train)} training images under {train.root}, on {cfg.device} ({cfg.dtype})", flush=True)
    images = load_images([train.root / p for p in train.paths], cfg.image_size,
                         progress=lambda i, n: print(f"decoded {i}/{n} images", flush=True))
    budget = args.max_minutes * 60 if args.max_minutes else None
    pretrain(images, args.out, cfg, resume=args.resume, max_seconds=budget, report=lambda s: print(s, flush=True))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from fedsparse.commands.probe import probe

    overrides = parse_overrides(args.run_config or "")
    cfg = resolve(args.config or _default_config(), overrides)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    rows = probe(cfg, encoders, args.steps)
    for r in rows:
        print(f"{r['encoder']}: test accuracy {r['accuracy']:.4f} (best {r['best_accuracy']:.4f}), "
              f"{r['train_examples']} train / {r['test_examples']} test, dim {r['feature_dim']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": cfg.to_run_config(), "probes": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _ratios(text: str) -> list[float]:
    from fedsparse.inputs.masking import check_mask_ratio

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--mask-ratios must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError("--mask-ratios is empty")
    return [check_mask_ratio(v) for v in values]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    from fedsparse.commands.bench import bench

    cfg = resolve(args.config or _default_config(), parse_overrides(args.run_config or ""))
    out = Path(args.out)
    print(f"fedsparse bench: {args.config or 'defaults'} ({cfg.encoder}, {cfg.image_size}px) -> {out}", flush=True)
    bench(cfg, out, _ratios(args.mask_ratios), _names(args.dtypes), args.images, args.speed_images,
          report=lambda s: print(s, flush=True))
    print(f"results: {out}/bench.json, bench.md, bench.png")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsparse.commands.sweep import sweep

    cfg = resolve(args.config or _default_config(), parse_overrides(args.run_config or ""))
    out = Path(args.out)
    print(f"fedsparse sweep: {args.config or 'defaults'} -> {out}", flush=True)
    rows = sweep(cfg, out, _ratios(args.mask_ratios), _names(args.strategies), _names(args.mask_modes),
                 report=lambda s: print(s, flush=True))
    print(f"{len(rows)} runs; results: {out}/sweep.csv, sweep.md, sweep.png")
    return 0


def cmd_overhead(args: argparse.Namespace) -> int:
    from fedsparse.commands.overhead import overhead

    cfg = resolve(args.config or _default_config(), parse_overrides(args.run_config or ""))
    try:
        ks = [int(v) for v in _names(args.clients_per_round)]
    except ValueError:
        raise ValueError(f"--clients-per-round must be comma-separated integers, got {args.clients_per_round!r}") from None
    out = Path(args.out)
    print(f"fedsparse overhead: {args.config or 'defaults'}, K in {ks}, {args.rounds} rounds -> {out}", flush=True)
    overhead(cfg, out, ks, args.rounds, tuple(_names(args.engines)), report=lambda s: print(s, flush=True))
    print(f"results: {out}/overhead.json, overhead.md")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    for key, value in RunConfig().to_run_config().items():
        print(f"{key} = {value!r}")
    return 0


def _setup_logging() -> None:
    """fedsparse's own log lines to stderr; Flower's logger has its own console handler."""
    logger = logging.getLogger("fedsparse")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedsparse: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsparse", description="Federated IST on sparse (masked) MAE features, on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment on the Flower Simulation Engine")
    run.add_argument("config", nargs="?", help="TOML run config (default: configs/quickstart.toml)")
    run.add_argument("--run-config", default="", help="overrides, e.g. \"mask-ratio=0.75 num-rounds=3\"")
    run.add_argument("--out", default="", help="output directory (sets out-dir)")
    run.add_argument("--resume", default="", metavar="DIR",
                     help="continue the run in DIR after its last finished round (same config; num-rounds may grow)")
    run.add_argument("--engine", default="simulation", choices=ENGINES,
                     help="simulation: Flower's Simulation Engine (Ray); in-process: Flower messages, no Ray; "
                          "plain: PyTorch only. The same config gives the same model on each")
    run.set_defaults(func=cmd_run)
    pre = sub.add_parser("pretrain", help="pretrain a small ViT as a masked autoencoder on an image folder")
    pre.add_argument("data", help="class-folder tree or .tar.gz (its train/ split when it has one)")
    pre.add_argument("--out", required=True, help="folder for checkpoint.pt, history.json and encoder.pth")
    pre.add_argument("--epochs", type=int, default=10)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW)")
    pre.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, then cosine decay to the last epoch")
    pre.add_argument("--mask-ratio", type=float, default=0.75)
    pre.add_argument("--image-size", type=int, default=32)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--cache-dir", default="", help="where archives are extracted")
    pre.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    pre.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: train under autocast")
    pre.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    pre.add_argument("--max-minutes", type=float, default=0, help="stop after the epoch that passes this budget")
    pre.set_defaults(func=cmd_pretrain)
    prb = sub.add_parser("probe", help="train the head centrally on each encoder's features (or 'pixels')")
    prb.add_argument("config", nargs="?", help="TOML run config for data, mask and head (default: quickstart)")
    prb.add_argument("--encoders", default="builtin,builtin-random,pixels", help="comma-separated encoder specs; 'pixels' = raw pixels")
    prb.add_argument("--steps", type=int, default=3000, help="Adam steps")
    prb.add_argument("--run-config", default="", help="overrides, e.g. \"mask-ratio=0\"")
    prb.add_argument("--out", default="", help="write the results as JSON here")
    prb.set_defaults(func=cmd_probe)
    ben = sub.add_parser("bench", help="measure what a client pays: encoder work, memory, storage, bytes")
    ben.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    ben.add_argument("--mask-ratios", default="0,0.5,0.75,0.9", help="comma-separated; r = 0 is always added")
    ben.add_argument("--dtypes", default="fp32,bf16", help="encoder dtypes to time (bf16 under CPU autocast)")
    ben.add_argument("--images", type=int, default=256, help="images per fresh extraction process (memory, storage)")
    ben.add_argument("--speed-images", type=int, default=64, help="images per throughput measurement")
    ben.add_argument("--run-config", default="", help="overrides, e.g. \"clients-per-round=2\"")
    ben.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, bench.png")
    ben.set_defaults(func=cmd_bench)
    swp = sub.add_parser("sweep", help="run the experiment at each mask ratio: the paper's accuracy/storage table")
    swp.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    swp.add_argument("--mask-ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated")
    swp.add_argument("--strategies", default="ist", help="any of ist, fedavg, centralized (comma-separated)")
    swp.add_argument("--mask-modes", default="per-image",
                     help="per-image (fixed masks), shared, random (drawn anew every round: the ablation)")
    swp.add_argument("--run-config", default="", help="overrides, e.g. \"num-rounds=10\"")
    swp.add_argument("--out", default="runs/sweep", help="folder for sweep.csv, sweep.md, sweep.png and the runs")
    swp.set_defaults(func=cmd_sweep)
    ovh = sub.add_parser("overhead", help="time the same IST rounds as a plain loop, in-process Flower, and the Simulation Engine")
    ovh.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    ovh.add_argument("--clients-per-round", default="10,100,1000", help="comma-separated K values")
    ovh.add_argument("--rounds", type=int, default=3, help="rounds per engine (the first is reported apart)")
    ovh.add_argument("--engines", default="plain,in-process,simulation", help="any of plain, in-process, simulation")
    ovh.add_argument("--run-config", default="", help="overrides, e.g. \"num-clients=1000\"")
    ovh.add_argument("--out", default="runs/overhead", help="folder for overhead.json and overhead.md")
    ovh.set_defaults(func=cmd_overhead)
    keys = sub.add_parser("keys", help=f"list the {len(config_keys())} run-config keys and their defaults")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"fedsparse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
