"""The ``fedsparse`` command.

    fedsparse run [CONFIG] [--run-config "k=v ..."] [--out DIR]
    fedsparse pretrain DATA --out DIR [--epochs N] [--resume] [--max-minutes M]
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

from fedsparse.config import RunConfig, config_keys, parse_overrides, resolve

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"


def _default_config() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def cmd_run(args: argparse.Namespace) -> int:
    config_path = args.config or _default_config()
    overrides = parse_overrides(args.run_config or "")
    if args.out:
        overrides["out-dir"] = str(Path(args.out).resolve())
    cfg = resolve(config_path, overrides)
    if not Path(cfg.out_dir).is_absolute():
        cfg = cfg.replace(out_dir=str(Path(cfg.out_dir).resolve()))
    print(f"fedsparse run: {config_path or 'defaults'} -> {cfg.out_dir}", flush=True)
    from fedsparse.task import preflight
    from strategies.simulation import simulate

    preflight(cfg)

    t0 = time.perf_counter()
    metrics = simulate(cfg)
    rounds = metrics["rounds"]
    if rounds:
        last = rounds[-1]
        ratio = sum(r["bytes_down_per_client"] for r in rounds) / len(rounds) / metrics["model_bytes"]
        print(
            f"done in {time.perf_counter() - t0:.0f}s: final accuracy {last['accuracy']:.4f} "
            f"(initial {metrics['initial'].get('accuracy', float('nan')):.4f}, best {max(r['accuracy'] for r in rounds):.4f}); "
            f"bytes down per client = {ratio:.3f} x full model ({cfg.strategy}, {cfg.clients_per_round} clients per round)"
        )
    print(f"results: {cfg.out_dir}/metrics.json, model.pt, accuracy.png")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedsparse.data import load_splits
    from fedsparse.pretrain import PretrainConfig, load_images, pretrain

    cfg = PretrainConfig(image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         mask_ratio=args.mask_ratio, seed=args.seed)
    train, _ = load_splits("imagefolder", args.data, args.cache_dir)
    print(f"fedsparse pretrain: {len(train)} training images under {train.root}", flush=True)
    images = load_images([train.root / p for p in train.paths], cfg.image_size,
                         progress=lambda i, n: print(f"decoded {i}/{n} images", flush=True))
    budget = args.max_minutes * 60 if args.max_minutes else None
    pretrain(images, args.out, cfg, resume=args.resume, max_seconds=budget, report=lambda s: print(s, flush=True))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    import json

    from fedsparse.probe import probe

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
    run.set_defaults(func=cmd_run)
    pre = sub.add_parser("pretrain", help="pretrain a small ViT as a masked autoencoder on an image folder")
    pre.add_argument("data", help="class-folder tree or .tar.gz (its train/ split when it has one)")
    pre.add_argument("--out", required=True, help="folder for checkpoint.pt, history.json and encoder.pth")
    pre.add_argument("--epochs", type=int, default=10)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--lr", type=float, default=1.5e-3)
    pre.add_argument("--mask-ratio", type=float, default=0.75)
    pre.add_argument("--image-size", type=int, default=32)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--cache-dir", default="", help="where archives are extracted")
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
