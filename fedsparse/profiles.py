"""Device profiles: named per-device settings for a heterogeneous federation.

A profile is what one kind of device can do: the mask ratio it encodes at (fewer visible
patches = less encoder work), the share of each hidden layer it can train (``width``: IST
gives it a slice of that relative size), its local steps and batch size, its encoder
precision and threads, the memory budget it stands for (peak RSS of the client process) and
how many images it encodes per forward.

Where profiles come from:

- **simulation** (plain, in-process, Simulation Engine): ``device-profiles =
  "tiny:0.5,small:0.3,large:0.2"`` spreads them over the virtual clients with exact shares
  (``profile_for``: a permutation of the partition ids seeded by ``seed``, cut by the shares);
- **deployment**: a SuperNode names one in its node config, ``profile=tiny``, and may override
  any field with ``profile-<field>`` (``profile-mask-ratio=0.75``, ``profile-memory-mib=900``);
  it reports the result in its reply to the server's identity query (``node_profile``).

``device-profiles = ""`` (the default) gives no client a profile: every client uses the run's
own keys, exactly as before profiles existed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from fedsparse.inputs.masking import check_mask_ratio
from fedsparse.seeds import derive_seed

PROFILE_DTYPES = ("fp32", "bf16")  # the encoder precisions (config.ENCODER_DTYPES)
NODE_PROFILE_KEY = "profile"  # node config: the profile's name
NODE_OVERRIDE_PREFIX = "profile-"  # node config: profile-<field> = value overrides one field


@dataclass(frozen=True)
class Profile:
    """One kind of device; see the module docstring. Checked on construction (one-line errors)."""

    name: str
    mask_ratio: float  # this device's encoder mask ratio
    width: float  # capacity: share of each hidden layer it can train, relative to the largest (0, 1]
    local_steps: int
    batch_size: int
    encoder_dtype: str  # fp32 | bf16
    threads: int
    memory_mib: int  # the memory of the device it stands for: its whole SuperNode's peak (client_budget_mib)
    encoder_batch: int  # images per encoder forward

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"profile name must be a non-empty string, got {self.name!r}")
        for name, kind in (("mask_ratio", float), ("width", float), ("local_steps", int), ("batch_size", int),
                           ("threads", int), ("memory_mib", int), ("encoder_batch", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
                raise ValueError(f"profile {self.name!r}: {_kebab(name)} must be {kind.__name__}, got {value!r}")
        try:
            check_mask_ratio(self.mask_ratio)
        except ValueError as err:
            raise ValueError(f"profile {self.name!r}: {err}") from None
        if not (math.isfinite(self.width) and 0.0 < self.width <= 1.0):
            raise ValueError(f"profile {self.name!r}: width must be in (0, 1], got {self.width}")
        for name in ("local_steps", "batch_size", "threads", "memory_mib", "encoder_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile {self.name!r}: {_kebab(name)} must be >= 1, got {getattr(self, name)}")
        if self.encoder_dtype not in PROFILE_DTYPES:
            raise ValueError(f"profile {self.name!r}: encoder-dtype must be one of {', '.join(PROFILE_DTYPES)}, "
                             f"got {self.encoder_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case fields (``mask-ratio``, ...): the form node configs and replies carry."""
        return {_kebab(k): v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Profile":
        """The inverse of ``to_dict``; unknown keys and bad values are one-line errors."""
        known = {_kebab(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown profile field {unknown[0]!r}; valid: {', '.join(known)}")
        missing = sorted(set(known) - set(values))
        if missing:
            raise ValueError(f"profile is missing field {missing[0]!r}")
        return cls(**{known[k].name: _coerce_field(known[k], v, str(values.get("name", "?"))) for k, v in values.items()})


# The shipped profiles. ``memory_mib`` is the device's memory, which its whole SuperNode must fit
# (flower-supernode, flower-superexec and the ClientApp process; ``fedsparse devices`` runs each
# device under that operating-system limit). The SuperNode's own two processes take
# ``SUPERNODE_PROCESSES_MIB`` (284 MiB RSS measured here); the ClientApp gets the rest
# (``client_budget_mib``), which starts at the library's imports (torch, fedsparse, Flower: 580
# MiB with the default install, ``fedsparse.accounting.budget.LIBRARY_BASELINE_BYTES``; timm adds
# 190 MiB where a hub encoder extracts features). docs/benchmarks/deployment.md has the measured peaks.
SUPERNODE_PROCESSES_MIB = 290
#
# Every profile encodes in fp32. bf16 (``profile-encoder-dtype=bf16``, for a device whose CPU
# has bf16 arithmetic) gives features that differ from the fp32 ones the server evaluates on,
# and it was not faster than fp32 on any CPU this project was measured on (BENCHMARKS.md, section 1).
PROFILES: dict[str, Profile] = {
    # A small single-board computer or an old phone (1 GiB of RAM, one usable core): 1 GiB for
    # the whole SuperNode, 734 MiB of it for the ClientApp on cached features (586 MiB measured);
    # its one-off extraction (the built-in encoder: 642 MiB of RSS, BENCHMARKS.md section 5) is held to the whole 1 GiB
    # (fit_profile). Encodes a quarter of the patches, 32 images at a time, and trains a quarter
    # of the hidden width for 10 steps of 32.
    "tiny": Profile("tiny", mask_ratio=0.75, width=0.25, local_steps=10, batch_size=32, encoder_dtype="fp32",
                    threads=1, memory_mib=1024, encoder_batch=32),
    # A mid-range phone or a Raspberry Pi 4 with 2 GiB (two cores): 1.5 GiB for the SuperNode,
    # 1,246 MiB of it for the ClientApp. Half the patches, half the hidden width, 20 steps of 64.
    "small": Profile("small", mask_ratio=0.5, width=0.5, local_steps=20, batch_size=64, encoder_dtype="fp32",
                     threads=2, memory_mib=1536, encoder_batch=64),
    # A laptop or an edge server (4+ GiB, four cores): 2.5 GiB for the SuperNode. The run's
    # defaults: half the patches in fp32, the full width, 20 steps of 64, the encoder's batch of 256.
    "large": Profile("large", mask_ratio=0.5, width=1.0, local_steps=20, batch_size=64, encoder_dtype="fp32",
                     threads=4, memory_mib=2560, encoder_batch=256),
}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _coerce_field(f: dataclasses.Field, value: Any, profile: str) -> Any:
    """A node-config value for field ``f``: TOML gives ints, floats and strings; accept a number
    written as a string too (``"0.75"``)."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    key = _kebab(f.name)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"profile {profile!r}: {key} must be a string, got {value!r}")
        return value
    if isinstance(value, str):
        try:
            value = float(value) if kind == "float" else int(value)
        except ValueError:
            raise ValueError(f"profile {profile!r}: {key} must be {kind}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"profile {profile!r}: {key} must be {kind}, got {value!r}")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"profile {profile!r}: {key} must be an integer, got {value!r}")
            value = int(value)
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"profile {profile!r}: {key} must be finite, got {value!r}")
    return value


def parse_profile_spread(spec: str) -> list[tuple[str, float]]:
    """``"tiny:0.5,small:0.3,large:0.2"`` -> ``[("tiny", 0.5), ("small", 0.3), ("large", 0.2)]``.

    Names must be in ``PROFILES`` (each at most once), shares finite and > 0, summing to 1
    within 1e-6. ``""`` -> ``[]`` (no profiles). Bad input: a one-line ``ValueError``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"device-profiles must be a string, got {spec!r}")
    if not spec.strip():
        return []
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        name, sep, raw = item.partition(":")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise ValueError(f"device-profiles entry {item!r} is not name:share (e.g. 'tiny:0.5,large:0.5')")
        if name not in PROFILES:
            raise ValueError(f"device-profiles: unknown profile {name!r}; valid: {', '.join(PROFILES)}")
        if any(name == n for n, _ in out):
            raise ValueError(f"device-profiles: profile {name!r} appears twice")
        try:
            share = float(raw)
        except ValueError:
            raise ValueError(f"device-profiles: share of {name!r} is not a number: {raw!r}") from None
        if not (math.isfinite(share) and share > 0):
            raise ValueError(f"device-profiles: share of {name!r} must be > 0, got {raw}")
        out.append((name, share))
    total = sum(s for _, s in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"device-profiles: shares must sum to 1, got {total:.6g} in {spec!r}")
    return out


def spread_counts(shares: list[tuple[str, float]], n: int) -> list[int]:
    """How many of ``n`` clients get each profile: ``n * share`` rounded by largest remainder
    (ties to the profile listed first), summing to ``n``."""
    raw = [n * s for _, s in shares]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def profile_assignment(spec: str, num_clients: int, seed: int) -> list[str | None]:
    """The profile name of every partition id ``0..num_clients-1`` (all None for ``spec = ""``):
    a permutation seeded by ``seed`` cut into runs of ``spread_counts`` in the spec's order."""
    shares = parse_profile_spread(spec)
    if not shares:
        return [None] * num_clients
    gen = torch.Generator().manual_seed(derive_seed("device-profiles", seed))
    perm = torch.randperm(num_clients, generator=gen).tolist()
    out: list[str | None] = [None] * num_clients
    pos = 0
    for (name, _), count in zip(shares, spread_counts(shares, num_clients)):
        for pid in perm[pos : pos + count]:
            out[pid] = name
        pos += count
    return out


def profile_for(cfg: Any, partition_id: int) -> Profile | None:
    """The profile of simulated client ``partition_id`` under ``cfg.device_profiles`` (None when
    it is ``""``): exact shares of ``cfg.num_clients``, seeded by ``cfg.seed``."""
    spec = getattr(cfg, "device_profiles", "")
    if not spec:
        return None
    if not 0 <= int(partition_id) < cfg.num_clients:
        raise ValueError(f"partition id {partition_id} is outside 0..{cfg.num_clients - 1}")
    name = profile_assignment(spec, cfg.num_clients, cfg.seed)[int(partition_id)]
    return PROFILES[name] if name is not None else None


def node_profile(node_config: Mapping[str, Any]) -> Profile | None:
    """The profile a SuperNode's node config names: ``profile=tiny`` plus ``profile-<field>``
    overrides (``profile-mask-ratio=0.75``). None when it names none (no ``profile`` key and no
    override). Unknown profile, unknown field or bad value: a one-line ``ValueError``."""
    name = node_config.get(NODE_PROFILE_KEY)
    overrides = {k[len(NODE_OVERRIDE_PREFIX):]: v for k, v in node_config.items()
                 if isinstance(k, str) and k.startswith(NODE_OVERRIDE_PREFIX)}
    if name is None:
        if overrides:
            raise ValueError(f"node config has {NODE_OVERRIDE_PREFIX}{next(iter(overrides))} but no profile=NAME")
        return None
    if not isinstance(name, str) or name not in PROFILES:
        raise ValueError(f"node config: unknown profile {name!r}; valid: {', '.join(PROFILES)}")
    known = {_kebab(f.name): f for f in fields(Profile) if f.name != "name"}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"node config: unknown profile key '{NODE_OVERRIDE_PREFIX}{key}'; valid: "
                             f"{', '.join(NODE_OVERRIDE_PREFIX + k for k in known)}")
        changes[known[key].name] = _coerce_field(known[key], value, name)
    return dataclasses.replace(PROFILES[name], **changes) if changes else PROFILES[name]


def client_profile(cfg: Any, partition_id: int | None, node_config: Mapping[str, Any] | None = None) -> Profile | None:
    """A client's own profile: its node config's ``profile`` (with overrides) when it names one,
    else its share of ``cfg.device_profiles`` by partition id (simulation), else None."""
    named = node_profile(node_config or {})
    if named is not None:
        return named
    if partition_id is None or not getattr(cfg, "device_profiles", "") or not 0 <= int(partition_id) < cfg.num_clients:
        return None
    return profile_for(cfg, int(partition_id))


# --- the client side: what a profile changes, and the memory budget --------------------------------

PROFILE_RECORD = "profile"  # ConfigRecord of an identity-query reply: the node's profile (to_dict)
# reply metrics of a client with a profile (numbers only: Flower MetricRecords)
PREDICTED_PEAK_KEY = "predicted-peak-bytes"
BUDGET_KEY = "memory-budget-bytes"
ENCODER_BATCH_KEY = "encoder-batch"
MASK_RATIO_KEY = "mask-ratio"
ENCODER_MACS_KEY = "encoder-macs-per-image"


@dataclass(frozen=True)
class ClientFit:
    """How a client with ``profile`` runs a task: the run's config with the profile's mask ratio
    and encoder dtype (so its features are a cache entry of their own), its threads, and the
    encoder batch that keeps its predicted peak within its budget."""

    profile: Profile
    cfg: Any  # RunConfig
    threads: int
    encoder_batch: int
    predicted_peak_bytes: int
    encoder_macs: int  # per image, at the profile's mask ratio
    budget_bytes: int = 0  # what the prediction was held to (fit_profile)

    def metrics(self) -> dict[str, float]:
        return {PREDICTED_PEAK_KEY: self.predicted_peak_bytes, BUDGET_KEY: self.budget_bytes,
                ENCODER_BATCH_KEY: self.encoder_batch, MASK_RATIO_KEY: self.profile.mask_ratio,
                ENCODER_MACS_KEY: self.encoder_macs}


def client_budget_mib(profile: Profile) -> int:
    """The ClientApp process's share of a profile's memory: the device's ``memory-mib`` less
    what the SuperNode's own processes take (``SUPERNODE_PROCESSES_MIB``)."""
    return profile.memory_mib - SUPERNODE_PROCESSES_MIB


def fit_profile(cfg: Any, profile: Profile, head_dims: tuple[int, ...] | list[int], batch_size: int,
                num_examples: int = 0, log: Any = None, cached: bool = False) -> ClientFit:
    """Before extracting or training: predict this client's peak memory
    (``fedsparse.accounting.budget``; ``cached``: the features are in the cache, so the task
    only trains) and shrink its encoder batch until it fits (saying so in one log line), or
    raise ``MemoryBudgetError`` (one line) when not even one image per forward fits.

    A round on cached features is held to the ClientApp's share of the profile's
    ``memory-mib`` (``client_budget_mib``). The one-off extraction of a cold cache is held to
    the whole ``memory-mib``: its extra peak is mostly library pages (torch's, timm's for a hub
    model), which a memory-limited device (or cgroup) reclaims from the processes that idle
    meanwhile; measured when extraction imported timm, a tiny device's 816 MiB-RSS extraction
    charged its cgroup under 700 MiB."""
    import logging

    from fedsparse.accounting.budget import MIB, fit_encoder_batch, predict_peak_bytes
    from fedsparse.accounting.costs import encoder_macs
    from fedsparse.inputs.encoder import builds_with_timm
    from fedsparse.inputs.features import encoder_ref

    run = cfg.replace(mask_ratio=profile.mask_ratio, encoder_dtype=profile.encoder_dtype)
    ref = encoder_ref(run.encoder, run.image_size)  # no encoder built (nor timm imported) to size it
    shape, params = ref.shape, ref.params
    timm = builds_with_timm(run.encoder)

    def predict(batch: int) -> int:
        return predict_peak_bytes(shape, params, profile.mask_ratio, batch, head_dims, batch_size, num_examples,
                                  threads=profile.threads, extracting=not cached, timm=timm)

    budget = max(0, client_budget_mib(profile) if cached else profile.memory_mib) * MIB
    try:
        fit = fit_encoder_batch(budget, profile.encoder_batch, predict)
    except ValueError as err:
        raise type(err)(f"profile {profile.name!r}: {err}; " + (
            f"the profile's memory-mib {profile.memory_mib} MiB less {SUPERNODE_PROCESSES_MIB} MiB for the "
            "SuperNode's own processes" if cached else
            f"the profile's memory-mib {profile.memory_mib} MiB cannot extract its features; fill its feature "
            "cache ahead of time")) from None
    if fit.shrunk:
        (log or logging.getLogger("fedsparse")).info(
            "profile %s: encoder batch %d -> %d to stay within %d MiB (predicted peak %.0f MiB)", profile.name,
            profile.encoder_batch, fit.encoder_batch, profile.memory_mib, fit.predicted_peak_bytes / MIB)
    return ClientFit(profile, run, profile.threads, fit.encoder_batch, fit.predicted_peak_bytes,
                     encoder_macs(shape, profile.mask_ratio), budget)
