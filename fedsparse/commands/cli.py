"""The ``fedsparse`` command.

    fedsparse run [CONFIG] [--run-config "k=v ..."]... [--out DIR] [--resume DIR] [--engine simulation]
    fedsparse check [CONFIG] [--run-config "k=v ..." | --run-config FILE.toml]... [--resume DIR]
    fedsparse pretrain DATA --out DIR [--run-config "epochs=100 device='cuda' dtype='bf16'"]... [--resume]
    fedsparse probe [CONFIG] [--encoders builtin,builtin-random,pixels] [--run-config ...]...
    fedsparse bench [CONFIG] [--mask-ratios 0,0.5,0.75,0.9] [--encoder-dtypes fp32,bf16] [--out DIR]
    fedsparse sweep [CONFIG] [--mask-ratios 0,0.1,...,0.9] [--strategies ist,fedavg,centralized] [--out DIR]
    fedsparse overhead [CONFIG] [--clients-per-round-list 10,100,1000] [--num-rounds 3] [--out DIR]
    fedsparse hostile [CONFIG] [--rates 0.2] [--attacks all] [--defences none,default] [--out DIR]
    fedsparse devices [CONFIG] [--profiles tiny,small,large] [--num-rounds 3] [--device-data-dir DIR] [--out DIR]
    fedsparse keys
    fedsparse --version

One convention for every command: a flag that sets a run-config key is named as the key
(``--num-rounds`` sets ``num-rounds``); every other setting is a key given with
``--run-config``, which may be repeated: ``"k=v ..."`` strings and TOML files, merged in
command-line order with flags named as keys (the later wins). ``--out`` is where a command
writes (for ``run`` and ``check``, the run's ``out-dir``). ``--help`` shows each default.
Flags renamed to follow the convention still work as hidden aliases that print a one-line
deprecation warning (``RENAMED`` lists them).

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
from pathlib import Path

from fedsparse.commands.drivers import DRIVERS, run_with_engine
from fedsparse.config import RunConfig, config_keys, load_toml, parse_overrides, resolve
from fedsparse.errors import USER_ERRORS, one_line

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"


def _default_config() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _overrides_of_one(text: str) -> dict:
    text = (text or "").strip()
    if text.endswith(".toml") and "=" not in text:
        return load_toml(text)
    try:
        return parse_overrides(text)
    except ValueError as err:
        if "quotation" in str(err) or "escaped" in str(err):  # shlex: an unbalanced quote
            raise ValueError(f"--run-config {text!r}: {str(err).lower()}") from None
        raise


def overrides_of(items: str | dict | list | None) -> dict:
    """``--run-config`` as ``flwr run`` takes it (``"k=v ..."`` pairs, or one TOML file), given
    any number of times, and the values of flags named as keys: merged in order, the later wins."""
    if items is None or isinstance(items, (str, dict)):
        items = [items or ""]
    merged: dict = {}
    for item in items:
        merged.update(item if isinstance(item, dict) else _overrides_of_one(item))
    return merged


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
        from strategies.simulation import import_ray, ray_address

        import_ray()  # a client-only install has no Ray: say so before anything else
        if ray_address(cfg) is None:  # on a cluster: checked against its nodes once attached
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
    ``0 <= partition-id < num-partitions``, and a partition that holds examples; with
    ``client-worker``, its settings (``clients.worker``)."""
    from fedsparse.data.partition import check_partition_id

    node = parse_overrides(text)
    from clients.worker import idle_seconds, socket_dir, worker_enabled

    if worker_enabled(node):  # client-worker = true: its settings and its private socket folder
        idle_seconds(node)
        socket_dir()
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
        from strategies.simulation import ray_address

        if ray_address(cfg) is None:  # on a cluster: checked against its nodes once attached
            check_client_cpus(cfg)
    preflight(cfg, partitions=not deployment)
    if args.node_config:
        check_node_config(cfg, args.node_config)
    print(f"fedsparse check: the config is valid ({args.resume or args.config or _default_config() or 'defaults'}"
          f"{' + --run-config' if args.run_config else ''}); data, encoder and {cfg.out_dir} are usable")
    return 0


# pretrain's settings: key -> (type, default, help). Given with --run-config like every other command's.
PRETRAIN_KEYS: dict[str, tuple[type, object, str]] = {
    "epochs": (int, 10, "training epochs"),
    "batch-size": (int, 256, "images per step"),
    "lr": (float, 1.5e-3, "peak learning rate (AdamW)"),
    "warmup-epochs": (float, 1.0, "linear warm-up, then cosine decay to the last epoch"),
    "mask-ratio": (float, 0.75, "share of the patches the MAE hides"),
    "image-size": (int, 32, "images are resized to this side"),
    "seed": (int, 0, "seed of the weights, masks and batch order"),
    "cache-dir": (str, "", "where archives are extracted"),
    "device": (str, "auto", "auto (a CUDA GPU when there is one), cpu, cuda, cuda:N"),
    "dtype": (str, "fp32", "fp32, or bf16: train under autocast"),
    "max-minutes": (float, 0.0, "stop after the epoch that passes this budget (0 = no limit)"),
}


def pretrain_settings(items) -> dict:
    """pretrain's ``--run-config`` over ``PRETRAIN_KEYS``' defaults, types checked, ranges checked."""
    from fedsparse.config import _coerce

    given = overrides_of(items)
    unknown = sorted(set(given) - set(PRETRAIN_KEYS))
    if unknown:
        raise ValueError(f"Unknown pretrain key {unknown[0]!r}; valid keys: {', '.join(PRETRAIN_KEYS)}")
    s = {k: _coerce(k, given.get(k, default), kind.__name__) for k, (kind, default, _) in PRETRAIN_KEYS.items()}
    for key, ok, rule in (
        ("epochs", s["epochs"] >= 1, ">= 1"),
        ("batch-size", s["batch-size"] >= 1, ">= 1"),
        ("image-size", 1 <= s["image-size"] <= 4096, "in [1, 4096]"),
        ("seed", s["seed"] >= 0, ">= 0"),
        ("lr", math.isfinite(s["lr"]) and s["lr"] > 0, "a finite number > 0"),
        ("warmup-epochs", math.isfinite(s["warmup-epochs"]) and s["warmup-epochs"] >= 0, "a finite number >= 0"),
        ("mask-ratio", 0.0 <= s["mask-ratio"] < 1.0, "in [0, 1)"),
        ("max-minutes", math.isfinite(s["max-minutes"]) and s["max-minutes"] >= 0,
         "a finite number >= 0 (0 = no limit)"),
        ("dtype", s["dtype"] in ("fp32", "bf16"), "fp32 or bf16"),
    ):
        if not ok:
            raise ValueError(f"fedsparse pretrain {key} must be {rule}, got {s[key]!r}")
    return s


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fedsparse.data.datasets import check_writable_dir, load_splits
    from fedsparse.inputs.pretrain import PretrainConfig, load_images, pretrain, resolve_device

    s = pretrain_settings(args.run_config)
    check_writable_dir(args.out, "--out")
    cfg = PretrainConfig(image_size=s["image-size"], epochs=s["epochs"], batch_size=s["batch-size"], lr=s["lr"],
                         warmup_epochs=s["warmup-epochs"], mask_ratio=s["mask-ratio"], seed=s["seed"],
                         device=resolve_device(s["device"]), dtype=s["dtype"])
    train, _ = load_splits("imagefolder", args.data, s["cache-dir"])
    print(f"fedsparse pretrain: {len(train)} training images under {train.root}, on {cfg.device} ({cfg.dtype})", flush=True)
    images = load_images([train.root / p for p in train.paths], cfg.image_size,
                         progress=lambda i, n: print(f"decoded {i}/{n} images", flush=True))
    budget = s["max-minutes"] * 60 if s["max-minutes"] else None
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
    ratios, dtypes = _ratios(args.mask_ratios), _names(args.encoder_dtypes)
    print(f"fedsparse bench: {args.config or 'defaults'} ({cfg.encoder}, {cfg.image_size}px) -> {out}", flush=True)
    bench(cfg, out, ratios, dtypes, args.extraction_images, args.speed_images,
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


def cmd_hostile(args: argparse.Namespace) -> int:
    from fedsparse.commands.hostile import hostile, parse_attacks, parse_defences, parse_rates

    cfg = resolve(args.config or _default_config(), overrides_of(args.run_config))
    rates, attacks = parse_rates(_names(args.rates)), parse_attacks(_names(args.attacks))
    defences = parse_defences(_names(args.defences))
    out = _writable_out(args.out)
    print(f"fedsparse hostile: {args.config or 'defaults'}, {len(attacks)} attacks at {args.rates} hostile, "
          f"defences {args.defences} -> {out}", flush=True)
    rows = hostile(cfg, out, rates, attacks, defences, engine=args.engine, report=lambda s: print(s, flush=True))
    print(f"{len(rows)} runs in the table; results: {out}/hostile.csv, hostile.md")
    return 0


def cmd_overhead(args: argparse.Namespace) -> int:
    from fedsparse.commands.overhead import overhead

    cfg = resolve(args.config or _default_config(), {"num-rounds": 3, **overrides_of(args.run_config)})
    flag = "--clients-per-round-list"
    try:
        ks = [int(v) for v in _names(args.clients_per_round_list)]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {args.clients_per_round_list!r}") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"{flag} must list integers >= 1, got {args.clients_per_round_list!r}")
    out = _writable_out(args.out)
    print(f"fedsparse overhead: {args.config or 'defaults'}, K in {ks}, {cfg.num_rounds} rounds -> {out}", flush=True)
    overhead(cfg, out, ks, cfg.num_rounds, tuple(_names(args.engines)), report=lambda s: print(s, flush=True),
             repeats=args.repeats)
    print(f"results: {out}/overhead.json, overhead.md")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import signal

    from fedsparse.commands.devices import devices_run, parse_limits, parse_profiles

    cfg = resolve(args.config or _default_config(), {"num-rounds": 3, **overrides_of(args.run_config)})
    profiles = parse_profiles(args.profiles)
    if args.images_per_device < 1 or args.test_images < 1:
        raise ValueError("--images-per-device and --test-images must be >= 1")
    out = _writable_out(args.out)
    print(f"fedsparse devices: {len(profiles)} emulated devices ({args.profiles}), {cfg.num_rounds} rounds -> {out}",
          flush=True)

    def stop(signum, frame):  # a service manager's SIGTERM: stop like Ctrl-C (every process started is ended)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        devices_run(cfg, profiles, out, args.device_data_dir, args.images_per_device, args.test_images,
                    args.run_timeout, args.limits,
                    report=lambda s: print(s, flush=True),
                    memory_limits=parse_limits(args.memory_limit_mib, len(profiles)), client_worker=args.client_worker)
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
    every other input error; ``--help`` shows the usage and every default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        where = "" if self.prog == "fedsparse" else f"{self.prog.removeprefix('fedsparse ')}: "
        self.exit(2, f"fedsparse: error: {where}{message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, except where there is none to show (an empty
    string, an unset flag, a list to append to) or the help text already gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text or not action.option_strings \
                or action.default in (None, "", False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _warn_renamed(old: str, new: str) -> None:
    print(f"fedsparse: warning: {old} is deprecated; use {new}", file=sys.stderr)


class KeyFlag(argparse.Action):
    """A flag named as the run-config key it sets: its value joins ``--run-config``'s list, so
    that the two merge in command-line order (the later wins)."""

    def __init__(self, option_strings, dest, key: str, renamed_to: str = "", **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest="run_config", **kwargs)
        self.key, self.renamed_to = key, renamed_to

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.renamed_to:
            _warn_renamed(option_string, self.renamed_to)
        setattr(namespace, "run_config", [*(getattr(namespace, "run_config", None) or []), {self.key: values}])


class Renamed(argparse._StoreAction):
    """A flag's old name: still accepted, hidden from ``--help``, with a one-line warning."""

    def __init__(self, option_strings, dest, renamed_to: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.renamed_to = renamed_to

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _warn_renamed(option_string, self.renamed_to)
        setattr(namespace, self.dest, values)


# old flag -> new flag, per command: kept as hidden aliases so that scripts and the other
# side of a deployment that still pass them keep working (each use prints a warning)
RENAMED: dict[str, dict[str, str]] = {
    "pretrain": {f"--{k}": f'--run-config "{k}=..."' for k in PRETRAIN_KEYS},
    "bench": {"--images": "--extraction-images", "--dtypes": "--encoder-dtypes"},
    "overhead": {"--clients-per-round": "--clients-per-round-list", "--rounds": "--num-rounds"},
    "devices": {"--rounds": "--num-rounds", "--images": "--images-per-device", "--timeout": "--run-timeout",
                "--data-dir": "--device-data-dir"},
}


def _add_renamed(parser: argparse.ArgumentParser, command: str) -> None:
    """The hidden aliases of ``RENAMED[command]``, each with its new flag's dest and type."""
    for old, new in RENAMED[command].items():
        if new.startswith("--run-config"):
            kind = PRETRAIN_KEYS[old[2:]][0]
            parser.add_argument(old, action=KeyFlag, key=old[2:], renamed_to=new, type=kind, help=argparse.SUPPRESS)
            continue
        target = parser._option_string_actions[new]
        if isinstance(target, KeyFlag):
            parser.add_argument(old, action=KeyFlag, key=target.key, renamed_to=new, type=target.type,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(old, action=Renamed, dest=target.dest, renamed_to=new, type=target.type)


def _run_config(parser: argparse.ArgumentParser, example: str, keys: str = "run-config") -> None:
    parser.add_argument("--run-config", action="append", default=[], metavar="'k=v ...' | FILE.toml",
                        help=f"{keys} keys, e.g. \"{example}\", or a TOML file of them; may be repeated "
                             "(merged in order, the later wins)")


def _version() -> str:
    from importlib import metadata

    from fedsparse import __version__

    try:
        flwr = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        flwr = "not installed"
    return f"fedsparse {__version__} (flwr {flwr}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedsparse", description="Federated IST on sparse (masked) MAE features, on Flower.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".")

    run = command("run", "run an experiment: on Flower's Simulation Engine, or in this process with --engine")
    run.add_argument("config", nargs="?", help="TOML run config (default: configs/quickstart.toml)")
    _run_config(run, "mask-ratio=0.75 num-rounds=3")
    run.add_argument("--out", default="", help="output directory (sets out-dir)")
    run.add_argument("--resume", default="", metavar="DIR",
                     help="continue the run in DIR after its last finished round (same config; num-rounds may grow)")
    run.add_argument("--engine", default="simulation", choices=DRIVERS,
                     help="simulation: Flower's Simulation Engine (Ray); in-process: Flower messages, no Ray; "
                          "plain: PyTorch only. The same config gives the same model on each")
    run.set_defaults(func=cmd_run)
    pre = command("pretrain", "pretrain a small ViT as a masked autoencoder on an image folder or archive")
    pre.add_argument("data", help="class-folder tree or .tar.gz (its train/ split when it has one)")
    pre.add_argument("--out", required=True, help="folder for checkpoint.pt, history.json and encoder.pth")
    _run_config(pre, "epochs=100 batch-size=512 device='cuda' dtype='bf16'", keys="pretrain")
    pre.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    pre.epilog = "pretrain keys (--run-config) and their defaults: " + "; ".join(
        f"{k} = {d!r}: {h}" for k, (_, d, h) in PRETRAIN_KEYS.items())
    pre.set_defaults(func=cmd_pretrain)
    prb = command("probe", "train the head centrally on each encoder's features (or raw pixels) and report "
                           "test accuracy")
    prb.add_argument("config", nargs="?", help="TOML run config for data, mask and head (default: quickstart)")
    prb.add_argument("--encoders", default="builtin,builtin-random,pixels", help="comma-separated encoder specs; 'pixels' = raw pixels")
    prb.add_argument("--steps", type=int, default=3000, help="Adam steps")
    _run_config(prb, "mask-ratio=0")
    prb.add_argument("--out", default="", help="write the results as JSON here")
    prb.set_defaults(func=cmd_probe)
    ben = command("bench", "measure what a client pays per mask ratio: encoder work, memory, storage, and "
                           "bytes per round for IST and FedAvg")
    ben.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    ben.add_argument("--mask-ratios", default="0,0.5,0.75,0.9", help="comma-separated; r = 0 is always added")
    ben.add_argument("--encoder-dtypes", default="fp32,bf16", help="encoder dtypes to time (bf16 under CPU autocast)")
    ben.add_argument("--extraction-images", type=int, default=256,
                     help="images per fresh feature-extraction process (memory, storage)")
    ben.add_argument("--speed-images", type=int, default=64, help="images per throughput measurement")
    _run_config(ben, "clients-per-round=2")
    ben.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.md, bench.png")
    _add_renamed(ben, "bench")
    ben.set_defaults(func=cmd_bench)
    swp = command("sweep", "run the experiment over mask ratios x strategies x partitions x mask modes: "
                           "the paper's accuracy/storage table")
    swp.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    swp.add_argument("--mask-ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="comma-separated")
    swp.add_argument("--strategies", default="ist",
                     help="any of ist, ist-authors, fedavg, fedopt, fed3r, fedncm, centralized, ceiling-mlp, "
                          "ceiling-ridge, ceiling-residual (comma-separated)")
    swp.add_argument("--partitions", default="",
                     help="heterogeneity axis: iid and Dirichlet concentrations, e.g. 0.1,0.5,1,iid (default: the config's)")
    swp.add_argument("--engine", default="simulation", choices=DRIVERS,
                     help="driver of the federated runs (the same config gives the same model on each)")
    swp.add_argument("--mask-modes", default="per-image",
                     help="per-image (fixed masks), shared, random (drawn anew every round: the ablation)")
    _run_config(swp, "num-rounds=10")
    swp.add_argument("--out", default="runs/sweep", help="folder for sweep.csv, sweep.md, sweep.png and the runs")
    swp.set_defaults(func=cmd_sweep)
    hst = command("hostile", "run the attack catalogue (hostile clients inside the reply checks) "
                             "with and without the defence: one table")
    hst.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    hst.add_argument("--rates", default="0.2", help="fractions of the clients that are hostile, comma-separated")
    hst.add_argument("--attacks", default="all", help="all, or any of " + ", ".join(_attack_names()))
    hst.add_argument("--defences", default="none,default",
                     help="none (clip-factor 0, min-cosine -1, group-rule mean), clip (min-cosine -1: clipping "
                          "alone) and/or default (the config as it is)")
    hst.add_argument("--engine", default="plain", choices=DRIVERS, help="driver of the runs (same model on each)")
    _run_config(hst, "num-rounds=10")
    hst.add_argument("--out", default="runs/hostile", help="folder for hostile.csv, hostile.md and the runs")
    hst.set_defaults(func=cmd_hostile)
    ovh = command("overhead", "time the same rounds on the plain loop, in-process Flower, the Simulation Engine "
                              "and a bare-PyTorch reference")
    ovh.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    ovh.add_argument("--clients-per-round-list", default="10,100,1000",
                     help="comma-separated clients-per-round values, one measurement each")
    ovh.add_argument("--num-rounds", action=KeyFlag, key="num-rounds", type=int, metavar="N",
                     help="rounds per engine, the first reported apart (sets num-rounds; default: 3)")
    ovh.add_argument("--engines", default="plain,in-process,simulation,reference",
                     help="any of plain, in-process, simulation, reference (bare PyTorch, one process per worker)")
    ovh.add_argument("--repeats", type=int, default=1,
                     help="time every engine this many times, in alternating order; medians are reported")
    _run_config(ovh, "num-clients=1000")
    ovh.add_argument("--out", default="runs/overhead", help="folder for overhead.json and overhead.md")
    _add_renamed(ovh, "overhead")
    ovh.set_defaults(func=cmd_overhead)
    chk = command("check", "run every check `fedsparse run` (or a ServerApp) makes before it starts, "
                           "naming what is wrong; nothing runs")
    chk.add_argument("config", nargs="?", help="TOML run config (default: configs/quickstart.toml)")
    _run_config(chk, "num-clients=100")
    chk.add_argument("--out", default="", help="output directory (sets out-dir)")
    chk.add_argument("--resume", default="", metavar="DIR", help="check a resume of the run in DIR")
    chk.add_argument("--engine", default="simulation", choices=DRIVERS, help="the driver the run would use")
    chk.add_argument("--deployment", action="store_true",
                     help="for flwr run on SuperNodes: skip the checks that depend on num-clients")
    chk.add_argument("--node-config", default="", metavar="'partition-id=I num-partitions=N'",
                     help="also check a SuperNode's --node-config against the data (implies --deployment): its "
                          "partition, or its own data-dir='/path' against the run's classes")
    chk.set_defaults(func=cmd_check)
    dev = command("devices", "emulate devices on this machine: a SuperLink and one SuperNode per profile, "
                             "each under memory and CPU limits, through flwr run")
    dev.add_argument("config", nargs="?", help="TOML run config (default: quickstart)")
    dev.add_argument("--profiles", default="tiny,small,large", help="one device per name (fedsparse.profiles)")
    dev.add_argument("--num-rounds", action=KeyFlag, key="num-rounds", type=int, metavar="N",
                     help="rounds to run (sets num-rounds; default: 3)")
    dev.add_argument("--device-data-dir", default="",
                     help="one sub-folder per device (<device>/<class>/<image>) and test/; default: a split of the sample")
    dev.add_argument("--images-per-device", type=int, default=100,
                     help="training images per device when splitting the sample")
    dev.add_argument("--test-images", type=int, default=200, help="server test images when splitting the sample")
    dev.add_argument("--limits", default="auto", choices=["auto", "cgroup", "rlimit"],
                     help="auto: cgroups where they can be made here, else RLIMIT_AS and CPU affinity")
    dev.add_argument("--memory-limit-mib", default="",
                     help="per device, an OS memory limit replacing the profile's memory (whole SuperNode), e.g. 300,0 "
                          "(0 = the profile's): a device with less memory than its profile says")
    dev.add_argument("--client-worker", action="store_true",
                     help="node config client-worker = true on every SuperNode: a long-lived worker per device keeps "
                          "torch and the model loaded, the per-message ClientApp forwards to it (docs/deployment.md)")
    dev.add_argument("--run-timeout", type=float, default=1200.0,
                     help="seconds for the whole flwr run (each round's limit is the key round-timeout)")
    _run_config(dev, "hidden='64,64' local-steps=5")
    dev.add_argument("--out", default="runs/devices", help="folder for devices.json, devices.md, the run and its logs")
    _add_renamed(dev, "devices")
    dev.set_defaults(func=cmd_devices)
    keys = command("keys", f"list the {len(config_keys())} run-config keys and their defaults")
    keys.set_defaults(func=cmd_keys)
    _add_renamed(pre, "pretrain")
    return parser


def _attack_names() -> tuple[str, ...]:
    from fedsparse.attacks import ATTACKS

    return ATTACKS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"fedsparse: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsparse: interrupted", file=sys.stderr)
        return 130


def console(argv: list[str] | None = None) -> int:
    """The installed ``fedsparse`` command: ``main``, exiting without the interpreter's final
    full garbage collection (``fedsparse.processes.exit_without_final_collection``)."""
    from fedsparse.processes import exit_without_final_collection

    exit_without_final_collection()
    return main(argv)


if __name__ == "__main__":
    sys.exit(console())
