"""The ``fedsparse`` command.

    fedsparse run [CONFIG] [--run-config "k=v ..."] [--out DIR] [--resume DIR] [--engine simulation]
    fedsparse pretrain DATA --out DIR [--epochs N] [--device auto] [--dtype fp32] [--resume] [--max-minutes M]
    fedsparse probe [CONFIG] [--encoders builtin,builtin-random,pixels]
    fedsparse bench [CONFIG] [--mask-ratios 0,0.5,0.75,0.9] [--dtypes fp32,bf16] [--out DIR]
    fedsparse sweep [CONFIG] [--mask-ratios 0,0.1,...,0.9] [--strategies ist,fedavg,centralized] [--out DIR]
    fedsparse overhead [CONFIG] [--clients-per-round 10,100,1000] [--rounds 3] [--out DIR]
    fedsparse check [CONFIG] [--run-config "k=v ..." | --run-config FILE.toml] [--resume DIR]
    fedsparse devices [CONFIG] [--profiles tiny,small,large] [--rounds 3] [--data-dir DIR] [--out DIR]
    fedsparse keys

Errors in user input (a missing file, an unknown key, a value out of range, a folder that
cannot be written, data or an encoder that cannot be used) end the command with one line on
stderr, ``fedsparse: error: ...``, and exit status 2, before anything heavy (Ray) starts.
``fedsparse check`` runs those checks alone: what ``flwr run`` reports only as
"Invalid run configuration." it names.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from fedsparse.config import RunConfig, config_keys, load_toml, parse_overrides, resolve

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"


def _default_config() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


ENGINES = ("simulation", "in-process", "plain")


def overrides_of(text: str) -> dict:
    """``--run-config`` as ``flwr run`` takes it: ``"k=v ..."`` pairs, or one TOML file."""
    text = (text or "").strip()
    if text.endswith(".toml") and "=" not in text:
        return load_toml(text)
    try:
        return parse_overrides(text)
    except ValueError as err:
        if "quotation" in str(err) or "escaped" in str(err):  # shlex: an unbalanced quote
            raise ValueError(f"--run-config {text!r}: {str(err).lower()}") from None
        raise


def run_config_for(args: argparse.Namespace) -> RunConfig:
    """The run's config: defaults, CONFIG (or the resumed run's config), then overrides."""
    overrides = overrides_of(args.run_config)
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
    if args.engine == "simulation":
        from strategies.simulation import import_ray

        import_ray()  # a client-only install has no Ray: say so before anything else
        check_client_cpus(cfg)
    preflight(cfg)
    from fedsparse.commands.signals import stop_on_signals

    with stop_on_signals(f"fedsparse run --resume {cfg.out_dir}") as interrupt:
        metrics = run_with_engine(cfg, args.engine)
    if interrupt.signum is not None:
        print(f"stopped: {metrics.summary()}; results so far in {cfg.out_dir}")
        return interrupt.exit_code
    print(f"done: {metrics.summary()}")
    mem = metrics.memory
    if mem.get("available"):
        print(f"memory: peak summed RSS {mem['peak_summed_rss_bytes'] / 2**30:.2f} GiB "
              f"(PSS {mem['peak_summed_pss_bytes'] / 2**30:.2f} GiB) over up to {mem['peak_processes']} processes")
    print(f"results: {cfg.out_dir}/metrics.json, model.pt, checkpoint.pt, accuracy.png")
    return 0


def check_client_cpus(cfg: RunConfig) -> None:
    """On the Simulation Engine a client needs ``client-cpus`` of this machine's cores; more
    than there are and Ray could not place a single client."""
    cores = os.cpu_count() or 1
    if cfg.client_cpus > cores:
        raise ValueError(f"client-cpus ({cfg.client_cpus:g}) exceeds the {cores} CPU cores here; "
                         "the Simulation Engine could not place a single client")


def check_node_config(cfg: RunConfig, text: str) -> None:
    """A SuperNode's ``--node-config`` against the run's data: both keys present, integers,
    ``0 <= partition-id < num-partitions``, and a partition that holds examples."""
    from fedsparse.data.partition import check_partition_id

    node = parse_overrides(text)
    if "data-dir" in node:  # a node with its own images: their classes must be the run's
        from fedsparse.data.partition import node_data
        from fedsparse.task import client_images

        mine = client_images(cfg, 0, 1, node_data(node).data_dir)
        print(f"fedsparse check: node data-dir {mine.root}: {len(mine)} images in "
              f"{len(set(mine.labels.tolist()))} of the run's {len(mine.classes)} classes")
        return
    missing = [k for k in ("partition-id", "num-partitions") if k not in node]
    if missing:
        raise ValueError(f"node config {text!r} lacks {', '.join(missing)}; start the SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'")
    pid, n = check_partition_id(node["partition-id"], node["num-partitions"])
    from fedsparse.task import client_images

    mine = client_images(cfg, pid, n)
    if not len(mine):
        raise ValueError(f"node config {text!r}: partition {pid} of {n} holds no training examples")


def cmd_check(args: argparse.Namespace) -> int:
    """Every check ``fedsparse run`` makes before it starts, and nothing else."""
    from fedsparse.engine.checkpoint import Checkpoint, check_resumable
    from fedsparse.task import preflight

    cfg = run_config_for(args)
    if cfg.resume:
        check_resumable(Checkpoint.load(cfg.out_dir), cfg.to_run_config())
    deployment = args.deployment or bool(args.node_config)
    if args.engine == "simulation" and not deployment:
        check_client_cpus(cfg)
    preflight(cfg, partitions=not deployment)
    if args.node_config:
        check_node_config(cfg, args.node_config)
    print(f"fedsparse check: the config is valid ({args.resume or args.config or _default_config() or 'defaults'}"
          f"{' + --run-config' if args.run_config else ''}); data, encoder and {cfg.out_dir} are usable")
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


def _check_pretrain_args(args: argparse.Namespace) -> None:
    for flag, value, ok, rule in (
        ("--epochs", args.epochs, args.epochs >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--image-size", args.image_size, 1 <= args.image_size <= 4096, "in [1, 4096]"),
        ("--seed", args.seed, args.seed >= 0, ">= 0"),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0, "a finite number > 0"),
        ("--warmup-epochs", args.warmup_epochs, math.isfinite(args.warmup_epochs) and args.warmup_epochs >= 0,
         "a finite number >= 0"),
        ("--mask-ratio", args.mask_ratio, 0.0 <= args.mask_ratio < 1.0, "in [0, 1)"),
        ("--max-minutes", args.max_minutes, math.isfinite(args.max_minutes) and args.max_minutes >= 0,
         "a finite number >= 0 (0 = no limit)"),
    ):
        if not ok:
            raise ValueError(f"fedsparse pretrain {flag} must be {rule}, got {value}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedsparse.data.datasets import check_writable_dir, load_splits
    from fedsparse.inputs.pretrain import PretrainConfig, load_images, pretrain, resolve_device

    _check_pretrain_args(args)
    check_writable_dir(args.out, "--out")
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

    cfg = resolve(args.config or _default_config(), overrides_of(args.run_config))
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


def _writable_out(out: str) -> Path:
    from fedsparse.data.datasets import check_writable_dir

    return check_writable_dir(out, "--out")


def cmd_bench(args: argparse.Namespace) -> int:
    from fedsparse.commands.bench import bench

    cfg = resolve(args.config or _default_config(), overrides_of(args.run_config))
    out = _writable_out(args.out)
    ratios, dtypes = _ratios(args.mask_ratios), _names(args.dtypes)
    print(f"fedsparse bench: {args.config or 'defaults'} ({cfg.encoder}, {cfg.image_size}px) -> {out}", flush=True)
    bench(cfg, out, ratios, dtypes, args.images, args.speed_images,
          report=lambda s: print(s, flush=True))
    print(f"results: {out}/bench.json, bench.md, bench.png")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsparse.commands.sweep import sweep

    cfg = resolve(args.config or _default_config(), overrides_of(args.run_config))
    out = _writable_out(args.out)
    ratios = _ratios(args.mask_ratios)
    print(f"fedsparse sweep: {args.config or 'defaults'} -> {out}", flush=True)
    rows = sweep(cfg, out, ratios, _names(args.strategies), _names(args.mask_modes),
                 report=lambda s: print(s, flush=True), engine=args.engine,
                 partitions=_names(args.partitions) if args.partitions else None)
    print(f"{len(rows)} runs; results: {out}/sweep.csv, sweep.md, sweep.png, sweep-bytes.png")
    return 0


def cmd_overhead(args: argparse.Namespace) -> int:
    from fedsparse.commands.overhead import overhead

    cfg = resolve(args.config or _default_config(), overrides_of(args.run_config))
    try:
        ks = [int(v) for v in _names(args.clients_per_round)]
    except ValueError:
        raise ValueError(f"--clients-per-round must be comma-separated integers, got {args.clients_per_round!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--clients-per-round must list integers >= 1, got {args.clients_per_round!r}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    out = _writable_out(args.out)
    print(f"fedsparse overhead: {args.config or 'defaults'}, K in {ks}, {args.rounds} rounds -> {out}", flush=True)
    overhead(cfg, out, ks, args.rounds, tuple(_names(args.engines)), report=lambda s: print(s, flush=True),
             repeats=args.repeats)
    print(f"results: {out}/overhead.json, overhead.md")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import signal

    from fedsparse.commands.devices import devices_run, parse_limits, parse_profiles

    cfg = resolve(args.config or _default_config(), {"num-rounds": args.rounds, **overrides_of(args.run_config)})
    profiles = parse_profiles(args.profiles)
    if args.images < 1 or args.test_images < 1:
        raise ValueError("--images and --test-images must be >= 1")
    out = _writable_out(args.out)
    print(f"fedsparse devices: {len(profiles)} emulated devices ({args.profiles}), {cfg.num_rounds} rounds -> {out}",
          flush=True)

    def stop(signum, frame):  # a service manager's SIGTERM: stop like Ctrl-C (every process started is ended)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        devices_run(cfg, profiles, out, args.data_dir, args.images, args.test_images, args.timeout, args.limits,
                    report=lambda s: print(s, flush=True),
                    memory_limits=parse_limits(args.memory_limit_mib, len(profiles)))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"results: {out}/devices.json, devices.md, run/metrics.json")
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``fedsparse: error: ...``) and exit 2, like
    every other input error; ``--help`` shows the usage."""

    def error(self, message: str):  # type: ignore[override]
        where = "" if self.prog == "fedsparse" else f"{self.prog.removeprefix('fedsparse ')}: "
        self.exit(2, f"fedsparse: error: {where}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedsparse", description="Federated IST on sparse (masked) MAE features, on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
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
    swp.add_argument("--strategies", default="ist",
                     help="any of ist, ist-authors, fedavg, fedopt, fed3r, fedncm, centralized, ceiling-mlp, "
                          "ceiling-ridge, ceiling-residual (comma-separated)")
    swp.add_argument("--partitions", default="",
                     help="heterogeneity axis: iid and Dirichlet concentrations, e.g. 0.1,0.5,1,iid (default: the config's)")
    swp.add_argument("--engine", default="simulation", choices=ENGINES,
                     help="driver of the federated runs (the same config gives the same model on each)")
    swp.add_argument("--mask-modes", default="per-image",
                     help="per-image (fixed masks), shared, random (drawn anew every round: the ablation)")
    swp.add_argument("--run-config", default="", help="overrides, e.g. \"num-rounds=10\"")
    swp.add_argument("--out", default="runs/sweep", help="folder for sweep.csv, sweep.md, sweep.png and the runs")
    swp.set_defaults(func=cmd_sweep)
    ovh = sub.add_parser("overhead", help="time the same IST rounds as a plain loop, in-process Flower, and the Simulation Engine")
    ovh.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    ovh.add_argument("--clients-per-round", default="10,100,1000", help="comma-separated K values")
    ovh.add_argument("--rounds", type=int, default=3, help="rounds per engine (the first is reported apart)")
    ovh.add_argument("--engines", default="plain,in-process,simulation,reference",
                     help="any of plain, in-process, simulation, reference (bare PyTorch, one process per worker)")
    ovh.add_argument("--repeats", type=int, default=1,
                     help="time every engine this many times, in alternating order; medians are reported")
    ovh.add_argument("--run-config", default="", help="overrides, e.g. \"num-clients=1000\"")
    ovh.add_argument("--out", default="runs/overhead", help="folder for overhead.json and overhead.md")
    ovh.set_defaults(func=cmd_overhead)
    chk = sub.add_parser("check", help="run every check `fedsparse run` (or a ServerApp) makes before it starts, "
                                       "naming what is wrong; nothing runs")
    chk.add_argument("config", nargs="?", help="TOML run config (default: configs/quickstart.toml)")
    chk.add_argument("--run-config", default="", help="overrides as for fedsparse run / flwr run: \"k=v ...\" or a .toml file")
    chk.add_argument("--out", default="", help="output directory (sets out-dir)")
    chk.add_argument("--resume", default="", metavar="DIR", help="check a resume of the run in DIR")
    chk.add_argument("--engine", default="simulation", choices=ENGINES, help="the driver the run would use")
    chk.add_argument("--deployment", action="store_true",
                     help="for flwr run on SuperNodes: skip the checks that depend on num-clients")
    chk.add_argument("--node-config", default="", metavar="'partition-id=I num-partitions=N'",
                     help="also check a SuperNode's --node-config against the data (implies --deployment): its "
                          "partition, or its own data-dir='/path' against the run's classes")
    chk.set_defaults(func=cmd_check)
    dev = sub.add_parser("devices", help="emulate devices on this machine: a SuperLink and one SuperNode per profile, "
                                         "each under memory and CPU limits, through flwr run")
    dev.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    dev.add_argument("--profiles", default="tiny,small,large", help="one device per name (fedsparse.profiles)")
    dev.add_argument("--rounds", type=int, default=3, help="rounds to run (sets num-rounds; --run-config wins)")
    dev.add_argument("--data-dir", default="",
                     help="one sub-folder per device (<device>/<class>/<image>) and test/; default: a split of the sample")
    dev.add_argument("--images", type=int, default=100, help="images per device when splitting the sample")
    dev.add_argument("--test-images", type=int, default=200, help="server test images when splitting the sample")
    dev.add_argument("--limits", default="auto", choices=["auto", "cgroup", "rlimit"],
                     help="auto: cgroups where they can be made here, else RLIMIT_AS and CPU affinity")
    dev.add_argument("--memory-limit-mib", default="",
                     help="per device, an OS memory limit replacing budget + SuperNode overhead, e.g. 300,0 "
                          "(0 = the profile's): a device with less memory than its profile says")
    dev.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole flwr run")
    dev.add_argument("--run-config", default="", help="overrides, e.g. \"hidden='64,64' local-steps=5\"")
    dev.add_argument("--out", default="runs/devices", help="folder for devices.json, devices.md, the run and its logs")
    dev.set_defaults(func=cmd_devices)
    keys = sub.add_parser("keys", help=f"list the {len(config_keys())} run-config keys and their defaults")
    keys.set_defaults(func=cmd_keys)
    return parser


def one_line(err: BaseException) -> str:
    """An error as the one line the CLI promises."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as err:
        print(f"fedsparse: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsparse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
