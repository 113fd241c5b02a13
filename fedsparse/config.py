"""Run configuration: every run-config key, its default, its type and its check.

``RunConfig`` is the single definition of the keys. ``[tool.flwr.app.config]`` in
``pyproject.toml`` repeats the defaults because Flower reads them from there; a test
keeps the two identical. Keys are kebab-case in TOML and in Flower's ``run_config``
and snake_case here; ``RunConfig.from_run_config`` maps one to the other, checks
types and values, and rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from fedsparse.data.partition import PARTITIONERS
from fedsparse.faults import ALL_FAULT_MODES
from fedsparse.model.head import parse_hidden
from fedsparse.model.ist import GROUP_RULES, IST_VARIANTS, SCALINGS, SUBNET_SCHEMES

IST_STARTS = ("random", "closed-form")
RESIDUAL_SKIPS = ("fixed", "trained")
LR_SCHEDULES = ("constant", "cosine")
from fedsparse.model.server_opt import SERVER_OPTIMIZERS
from fedsparse.inputs.masking import MASK_MODES, check_mask_ratio

PREPROCESSING = ("paper", "imagenet")
ENCODER_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class RunConfig:
    """One experiment. Defaults are the offline quickstart's, except where a comment says."""

    # --- data -------------------------------------------------------------------------
    dataset: str = "cifar10-sample"  # bundled 10k/2k CIFAR-10 JPEG sample; see fedsparse/data.py
    data_dir: str = ""  # folder or .tar.gz for datasets read from disk
    cache_dir: str = ""  # feature + extraction cache; "" = $FEDSPARSE_CACHE or ~/.cache/fedsparse
    out_dir: str = "runs/latest"  # metrics.json, model.pt, accuracy.png
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5  # only for partitioner = "dirichlet"
    classes: str = ""  # the run's class list, "cat,dog,..." (label = position); "" = the data set's classes
    # --- sparse input -----------------------------------------------------------------
    encoder: str = "builtin"  # "builtin", a timm model name (hub weights), or a checkpoint path
    image_size: int = 32
    preprocessing: str = "paper"  # paper: Normalize(0.5, 0.5) as the authors' code
    encoder_dtype: str = "fp32"
    mask_ratio: float = 0.5
    mask_seed: int = 1234  # the authors' SEED
    mask_mode: str = "per-image"
    # --- federation -------------------------------------------------------------------
    strategy: str = "ist"
    num_clients: int = 20
    clients_per_round: int = 4
    subnets_per_round: int = 0  # G for IST: 0 = one subnet per client (G = K); ignored by fedavg
    ist_scaling: str = "none"  # none (as the authors) or width: subnets trained at full-width scale
    # IST under label skew (fedsparse/algorithms/ist.py; README "IST under label skew" has the measurements)
    ist_variant: str = "skew"  # authors (the paper's IST; stays at 0.10 on 2-class clients) or skew (learns)
    label_aware: bool = True  # skew: clients train their own classes' output rows; 0.10 -> 0.25 on 2-class clients
    ist_subnets: str = "random"  # skew: random (fresh partition per round) or rolling (FedRolex: no gain measured)
    ist_overlap: float = 1.0  # skew: each neuron in this many subnets (1 = disjoint; 2 gains, at 2.7x the bytes)
    server_opt: str = "sgd"  # skew IST and fedopt: none, sgd (FedAvgM) or adam (FedAdam) on the merged update
    server_lr: float = 1.0  # the server optimizer's learning rate
    server_momentum: float = 0.7  # sgd's momentum, adam's beta1; 0.9 overshot with 4 clients per round (README)
    group_rule: str = "mean"  # how replies for one subnet (fedavg: all replies) combine: mean, trimmed-mean, median
    group_trim: float = 0.1  # trimmed-mean: the fraction cut at each end
    clip_factor: float = 2.0  # ist, fedavg, fedopt: clip each update to this x the round's median update RMS; 0 = off
    min_cosine: float = 0.0  # ist, fedavg, fedopt: drop an update whose cosine with its group's median update is below; -1 = off
    outlier_strikes: int = 2  # a client whose update is clipped in this many rounds is not sampled again in the run; 0 = off
    outlier_pardon: str = ""  # readmit banned clients when the run starts or resumes: "all" or ids "3,17"
    ridge_lambda: float = 1.0  # fed3r: the ridge penalty; 1 beat Fed3R's 0.01 on the sample (README)
    # IST from the closed form (docs/algorithms.md): logits = ridge head (skip) + a residual MLP
    ist_start: str = "closed-form"  # skew IST: closed-form (ridge statistics, then a residual MLP) or random (the MLP alone)
    residual_temperature: float = 0.1  # closed-form: the ridge head's logits / this; 1 let the MLP swamp them (docs/algorithms.md)
    residual_normalize: bool = False  # closed-form: each class's ridge row scaled to unit norm (Fed3R's); lost 2-4 points
    residual_skip: str = "trained"  # closed-form: trained (merged like the output layer) or fixed (clients leave the ridge head)
    residual_lr: float = 3e-5  # closed-form: the clients' learning rate (Fed3R+FT's small one); lr's default lost 0.7 points
    ridge_features: int = 512  # closed-form: random ReLU features the ridge head also reads (0 = the features alone)
    num_rounds: int = 30
    round_timeout: float = 600.0  # seconds to wait for replies; late clients count as failed
    # --- what the server accepts (see fedsparse/engine/rounds.py check_reply) -------------
    update_bound: float = 10.0  # refuse a reply that moved an array > 10x its norm (honest, shipped configs: <= 0.42); 0 = off
    max_examples: int = 1_000_000  # a reply's weight cap where the server cannot know the client's data size
    eval_every: int = 1  # evaluate the head every N rounds (the last round always)
    save_seconds: float = 1.0  # write the round's files at most every N wall seconds (first, last, stopped: always); 0 = every round
    resume: bool = False  # continue from out-dir/checkpoint.pt (same config; num-rounds may grow)
    client_cpus: float = 1.0  # Ray resources per simulated client (sets concurrency)
    # simulation: a running Ray cluster to attach to ("HEAD-IP:6379", "auto"); "" = $RAY_ADDRESS if set, else a
    # Ray of this machine's cores, started and stopped by the run; "local" = that, whatever $RAY_ADDRESS says
    ray_address: str = ""
    # --- fault injection (studies and tests; see fedsparse/faults.py) --------------------
    fault_rate: float = 0.0  # probability that a client fails in a round, drawn from (seed, round, partition)
    fault_mode: str = "raise"  # raise, nan, hang or mix; an attack (fedsparse/attacks.py: fault-rate of clients hostile) or drop
    attack_strength: float = 0.0  # the attack's strength (sign-flip/scale factor, ipm epsilon, alie z, noise); 0 = its default
    # --- head and local training ------------------------------------------------------
    hidden: str = "1024,1024"
    local_steps: int = 20  # the paper repartitions every 20 iterations
    batch_size: int = 64
    lr: float = 0.001
    lr_schedule: str = "constant"  # the clients' lr by round: constant, or cosine (lr * (1 + cos(pi (t-1) / T)) / 2)
    seed: int = 0
    # --- heterogeneous devices (fedsparse/profiles.py) ----------------------------------
    device_profiles: str = ""  # simulation: "tiny:0.5,small:0.3,large:0.2" spreads profiles; "" = none

    def __post_init__(self) -> None:
        _check_types(self)  # first: the checks below compare numbers
        _check_choice("dataset", self.dataset, _dataset_names())
        _check_choice("partitioner", self.partitioner, PARTITIONERS)
        _check_classes(self.classes)
        _check_choice("preprocessing", self.preprocessing, PREPROCESSING)
        _check_choice("encoder-dtype", self.encoder_dtype, ENCODER_DTYPES)
        _check_choice("mask-mode", self.mask_mode, MASK_MODES)
        _check_choice("fault-mode", self.fault_mode, ALL_FAULT_MODES)
        _check_choice("ist-scaling", self.ist_scaling, SCALINGS)
        _check_choice("ist-variant", self.ist_variant, IST_VARIANTS)
        _check_choice("ist-subnets", self.ist_subnets, SUBNET_SCHEMES)
        _check_choice("server-opt", self.server_opt, SERVER_OPTIMIZERS)
        _check_choice("group-rule", self.group_rule, GROUP_RULES)
        if not self.ist_overlap >= 1.0:
            raise ValueError(f"ist-overlap must be >= 1 (1 = disjoint subnets), got {self.ist_overlap}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        if not -1.0 <= self.min_cosine < 1.0:
            raise ValueError(f"min-cosine must be in [-1, 1) (-1 = off), got {self.min_cosine}")
        if self.ridge_features < 0:
            raise ValueError(f"ridge-features must be >= 0 (0 = the features alone), got {self.ridge_features}")
        if self.outlier_strikes < 0:
            raise ValueError(f"outlier-strikes must be >= 0 (0 = off), got {self.outlier_strikes}")
        parse_pardon(self.outlier_pardon)
        if not 0.0 <= self.group_trim < 0.5:
            raise ValueError(f"group-trim must be in [0, 0.5), got {self.group_trim}")
        _check_choice("ist-start", self.ist_start, IST_STARTS)
        _check_choice("residual-skip", self.residual_skip, RESIDUAL_SKIPS)
        _check_choice("lr-schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("server_lr", "ridge_lambda", "residual_temperature", "residual_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_kebab(name)} must be > 0, got {getattr(self, name)}")
        check_mask_ratio(self.mask_ratio)
        parse_hidden(self.hidden)
        for name in ("image_size", "num_clients", "clients_per_round", "num_rounds", "local_steps", "batch_size",
                     "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_kebab(name)} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.save_seconds < math.inf:
            raise ValueError(f"save-seconds must be a finite number >= 0 (0 = every round), got {self.save_seconds}")
        for name in ("lr", "dirichlet_alpha", "round_timeout", "client_cpus"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_kebab(name)} must be > 0, got {getattr(self, name)}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients-per-round ({self.clients_per_round}) exceeds num-clients ({self.num_clients})"
            )
        if self.subnets_per_round < 0:
            raise ValueError(f"subnets-per-round must be >= 0 (0 = one per client), got {self.subnets_per_round}")
        if self.subnets_per_round > self.clients_per_round:
            raise ValueError(
                f"subnets-per-round ({self.subnets_per_round}) exceeds clients-per-round ({self.clients_per_round})"
            )
        if not 0.0 <= self.fault_rate < 1.0:
            raise ValueError(f"fault-rate must be in [0, 1), got {self.fault_rate}")
        if not self.encoder.strip():
            raise ValueError("encoder must not be empty; use 'builtin', a timm model name or a checkpoint path")
        _check_ranges(self)
        _check_profiles(self)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return parse_hidden(self.hidden)

    @property
    def num_subnets(self) -> int:
        """G, the IST subnets per round: ``subnets-per-round``, or K when it is 0 (1 for fedavg)."""
        if self.strategy == "fedavg":
            return 1
        return self.subnets_per_round or self.clients_per_round

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's ``context.run_config`` (kebab-case keys); missing keys keep defaults."""
        known = {_kebab(f.name): f for f in fields(cls)}  # kebab-case only, as Flower reads them
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ValueError(f"Unknown config key {key!r}; valid keys: {', '.join(config_keys())}")
            values[known[key].name] = _coerce(key, value, known[key].type)
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict, the form Flower and the TOML files use."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def parse_pardon(text: str) -> "set[int] | str":
    """``outlier-pardon``: "" (nobody), "all", or comma-separated client ids (fedsparse.engine.outliers)."""
    text = text.strip()
    if text in ("", "all"):
        return text
    try:
        ids = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"outlier-pardon must be 'all' or comma-separated client ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"outlier-pardon: client ids are >= 0, got {text!r}")
    return ids


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def config_keys() -> list[str]:
    """All run-config keys, kebab-case, in definition order."""
    return [_kebab(f.name) for f in fields(RunConfig)]


def _dataset_names() -> tuple[str, ...]:
    from fedsparse.data.datasets import DATASETS  # local import: data imports heavy deps lazily

    return tuple(DATASETS)


INT64_MAX = 2**63 - 1  # Flower carries run-config integers as signed 64-bit values
MAX_IMAGE_SIZE = 4096  # pixels per side; larger inputs exhaust memory in the patch embedding


def _check_types(cfg: "RunConfig") -> None:
    """Every key holds its annotated type (an int is also a float), ints fit in 64 bits,
    floats are finite, strings hold no NUL character. Types other than str, int, float and
    bool are left to their own checks."""
    import math
    import numbers

    for f in fields(cfg):
        key, value = _kebab(f.name), getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ValueError(f"config key {key!r} must be {kind}, got {value!r} ({type(value).__name__})")
        if kind == "int" and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError(f"{key} must fit in 64 bits (Flower carries integers as int64), got {value}")
        if kind == "float" and not math.isfinite(value):
            raise ValueError(f"{key} must be a finite number, got {value}")
        if kind == "str" and "\x00" in value:
            raise ValueError(f"{key} must not contain a NUL character, got {value!r}")


def _check_ranges(cfg: "RunConfig") -> None:
    """The ranges ``__post_init__`` does not check itself. (A dataset that needs ``data-dir``
    is checked where the data is loaded: config files leave it to the command line.)"""
    for name in ("seed", "mask_seed", "update_bound", "max_examples"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_kebab(name)} must be >= 0, got {getattr(cfg, name)}")
    if cfg.image_size > MAX_IMAGE_SIZE:
        raise ValueError(f"image-size must be at most {MAX_IMAGE_SIZE}, got {cfg.image_size}")
    if not cfg.out_dir.strip():
        raise ValueError("out-dir must not be empty (it is where metrics.json, model.pt and checkpoint.pt go)")


def _check_profiles(cfg: "RunConfig") -> None:
    """``device-profiles``: known names, shares > 0 summing to 1; IST slices sized to
    capacity need disjoint subnets (see ``fedsparse.algorithms.ist``)."""
    from fedsparse.profiles import parse_profile_spread  # local: profiles imports torch

    if parse_profile_spread(cfg.device_profiles) and cfg.strategy == "ist" and cfg.ist_variant == "skew" \
            and cfg.ist_overlap > 1.0:
        raise ValueError(f"device-profiles needs disjoint IST subnets (ist-overlap = 1), got ist-overlap {cfg.ist_overlap:g}")


def _check_classes(text: str) -> None:
    from fedsparse.data.datasets import parse_classes  # local import: data imports heavy deps lazily

    parse_classes(text)


def _check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {key} {value!r}; valid choices: {', '.join(choices)}")


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Check a run-config value against the field's annotated type (a string here)."""
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. hidden = 1024 on the command line
    raise ValueError(f"config key {key!r} must be {kind}, got {value!r} ({type(value).__name__})")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run-config TOML file (flat ``key = value`` pairs, as ``flwr run --run-config`` takes)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {p} is not valid TOML: {err}") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config file {p} must hold flat key = value pairs; found tables {nested}")
    return data


def parse_overrides(text: str) -> dict[str, Any]:
    """``"mask-ratio=0.75 num-rounds=3 hidden='512,512'"`` -> dict, values parsed as TOML."""
    import shlex

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ValueError(f"run-config override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # bare words are strings: strategy=fedavg
    return out


def resolve(config_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then a TOML file, then ``key=value`` overrides; every layer is checked."""
    merged: dict[str, Any] = {}
    if config_path is not None:
        merged.update(load_toml(config_path))
    merged.update(overrides or {})
    return RunConfig.from_run_config(merged)


# --- writing TOML: one way, with tomli-w ---------------------------------------------------------


def toml_text(data: Mapping[str, Any]) -> str:
    """``data`` (nested mappings for tables) as a TOML document, written by tomli-w: strings
    double-quoted and escaped as TOML says, keys quoted where they must be."""
    import tomli_w

    return tomli_w.dumps(data)


def toml_value(value: Any) -> str:
    """One value as TOML writes it: ``0.5``, ``true``, ``"a b"``."""
    return toml_text({"v": value}).removeprefix("v = ").rstrip("\n")


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``values`` as one ``flwr run --run-config`` (or ``flower-supernode --node-config``)
    string, ``k=v ...`` with TOML values. Flower finds a quoted value by its closing quote,
    with no escapes, so a string holding a double quote cannot be carried: refused."""
    for key, value in values.items():
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"run-config value {key}={value!r} holds a double quote, which flwr cannot carry")
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def same_run(saved: dict[str, Any], cfg: RunConfig) -> bool:
    """Whether a saved run config (a ``metrics.json``'s ``config``) is ``cfg``, ``resume`` aside:
    a resumed run is the same run. Commands that reuse finished runs ask this."""
    current = cfg.to_run_config()
    return {k: v for k, v in saved.items() if k != "resume"} == {k: v for k, v in current.items() if k != "resume"}


def round_lr(cfg: RunConfig, server_round: int, base: float | None = None) -> float:
    """The clients' learning rate in round ``server_round`` (1-based) of ``cfg.num_rounds``:
    ``lr`` (or ``base``: an algorithm's own rate) throughout (``constant``), or ``cosine``:
    ``lr * (1 + cos(pi (t - 1) / T)) / 2``, from ``lr`` in round 1 down towards 0 in round T. A
    pure function of the round: a resumed run goes on where it stopped."""
    lr = cfg.lr if base is None else base
    if cfg.lr_schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / cfg.num_rounds))
