"""Feature cache: masked CLS features, extracted once and reused across rounds and runs.

A cache entry is keyed by everything the features depend on: the encoder's identity
(spec, SHA-256 of its weights, input size), the mask (ratio, seed, mode, group), the
preprocessing and encoder dtype, and the data (data-set fingerprint and the exact image
ids). The key's JSON is stored beside the tensors and compared on load, so a changed key
never serves stale features. Writes are atomic (temp file + rename), so parallel client
processes may race on an entry without corrupting it.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from filelock import FileLock

from fedsparse.accounting.costs import ViTShape
from fedsparse.data.datasets import ImageSet
from fedsparse.inputs.encoder import Encoder, encode, load_encoder, load_image, normalize
from fedsparse.inputs.masking import masks_for

log = logging.getLogger("fedsparse")
DECODE_CHUNK = 512  # images decoded and encoded at a time: bounds memory on big partitions
ENCODE_BATCH = 256  # images per encoder forward (encoder.encode's default)
# A device profile's encoder batch (fedsparse.profiles): set for one client's extraction by
# ``encoder_batch``; None = ENCODE_BATCH and DECODE_CHUNK, as without profiles.
_ENCODER_BATCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("fedsparse_encoder_batch", default=None)


@contextlib.contextmanager
def encoder_batch(n: int | None) -> Iterator[None]:
    """Extract with ``n`` images per encoder forward, decoding ``n`` times ``DECODE_CHUNK // n``
    images at a time (``n`` when larger), in this context; None changes nothing. Batches of
    ``ENCODE_BATCH`` are those extraction uses without it."""
    token = _ENCODER_BATCH.set(None if n is None else max(1, int(n)))
    try:
        yield
    finally:
        _ENCODER_BATCH.reset(token)


def batch_and_chunk() -> tuple[int, int]:
    """(images per encoder forward, images decoded at a time) in the current context."""
    n = _ENCODER_BATCH.get()
    if n is None:
        return ENCODE_BATCH, DECODE_CHUNK
    return n, n * max(1, DECODE_CHUNK // n)
FORMAT_VERSION = 1


@dataclass
class Features:
    """Cached features of one image set.

    Attributes:
        x: [N, D] float32 CLS vectors; y: [N] int64 labels.
        seconds: extraction time (0.0 when served from the cache).
        cache_hit: whether the entry already existed.
        skipped: images that could not be read (left out of x and y).
    """

    x: torch.Tensor
    y: torch.Tensor
    seconds: float
    cache_hit: bool
    skipped: int


@lru_cache(maxsize=2)
def get_encoder(spec: str, image_size: int) -> Encoder:
    """The encoder for ``spec``, loaded once per process (and reused by every client in it)."""
    return load_encoder(spec, image_size)


def encoder_loaded() -> bool:
    """Whether this process has loaded an encoder: it extracted features (a cache miss)."""
    return get_encoder.cache_info().currsize > 0


@dataclass(frozen=True)
class EncoderRef:
    """What names an encoder's features and sizes its work, without the encoder: its
    ``identity`` (the feature-cache key's part), its shape and parameter count (the memory
    budget's). ``build()`` loads the encoder itself, for a cache miss only.

    For a checkpoint file (``builtin`` and paths) the reference is read from the file's tensors
    without timm (``checkpoint_identity``): a client or server whose features are cached never
    imports timm or builds the model. A timm spec (hub name, ``name@file``, ``@random``,
    ``builtin-random``) has no file to read it from, and is built."""

    spec: str
    image_size: int
    identity: dict
    shape: ViTShape
    params: int

    @property
    def dim(self) -> int:
        return self.shape.dim

    @property
    def num_patches(self) -> int:
        return self.shape.num_patches

    def build(self) -> Encoder:
        return get_encoder(self.spec, self.image_size)


def encoder_ref(spec: str, image_size: int) -> EncoderRef:
    """The ``EncoderRef`` of ``spec`` (see there); once per process and checkpoint file version."""
    from fedsparse.inputs.encoder import checkpoint_of

    try:
        path = checkpoint_of(spec)
        stamp = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) if path is not None else None
    except OSError:  # missing: checkpoint_identity says so in one line
        stamp = None
    return _encoder_ref(spec, image_size, stamp)


@lru_cache(maxsize=4)
def _encoder_ref(spec: str, image_size: int, stamp: tuple | None) -> EncoderRef:
    from fedsparse.inputs.encoder import checkpoint_identity

    found = checkpoint_identity(spec, image_size)
    if found is not None:
        identity, arch, params = found
        shape = ViTShape(image_size=image_size, patch_size=int(arch["patch_size"]), dim=int(arch["embed_dim"]),
                         depth=int(arch["depth"]), mlp_ratio=float(arch.get("mlp_ratio", 4.0)))
        return EncoderRef(spec, image_size, identity, shape, params)
    encoder = get_encoder(spec, image_size)
    return EncoderRef(spec, image_size, encoder.identity, ViTShape.of(encoder.model, image_size),
                      sum(int(t.numel()) for t in encoder.model.parameters()))


def feature_key(
    encoder: Encoder | EncoderRef,
    images: ImageSet,
    mask_ratio: float,
    mask_seed: int,
    mask_mode: str,
    group: str,
    preprocessing: str,
    dtype: str,
) -> dict[str, Any]:
    """Everything the features depend on, as a JSON-able dict."""
    ids_sha = hashlib.sha256("\n".join(images.paths).encode()).hexdigest()[:16]
    return {
        "version": FORMAT_VERSION,
        "encoder": encoder.identity,
        "mask": {"ratio": float(mask_ratio), "seed": int(mask_seed), "mode": mask_mode,
                 "group": group if mask_mode == "shared" else ""},
        "preprocessing": preprocessing,
        "dtype": dtype,
        "data": {"fingerprint": images.fingerprint, "ids": ids_sha, "n": len(images)},
    }


class FeatureCache:
    """A folder of feature entries, ``<root>/features/<sha256 of key>.pt``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "features"

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.root / f"{digest}.pt"

    def load(self, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            entry = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss, not a crash
            log.warning("feature cache entry %s is unreadable; recomputing", p)
            return None
        if (
            not isinstance(entry, dict)
            or entry.get("key") != json.dumps(key, sort_keys=True)
            or not {"x", "y", "skipped"} <= entry.keys()
        ):
            return None
        return entry["x"], entry["y"], int(entry["skipped"])

    @contextlib.contextmanager
    def lock(self, key: dict[str, Any]) -> Iterator[None]:
        """Hold an exclusive lock on ``key``'s entry, across processes and threads
        (``filelock`` on ``<root>/locks/<digest>.lock``), so that clients missing the same entry
        at once extract it once: the others wait and then read it."""
        p = self.root.parent / "locks" / self.path(key).with_suffix(".lock").name
        p.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(p, thread_local=False):
            yield

    def store(self, key: dict[str, Any], x: torch.Tensor, y: torch.Tensor, skipped: int) -> Path:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"key": json.dumps(key, sort_keys=True), "x": x.contiguous(), "y": y, "skipped": skipped}, p)
        return p


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def extract(
    encoder: Encoder,
    images: ImageSet,
    *,
    mask_ratio: float,
    mask_seed: int,
    mask_mode: str = "per-image",
    group: str = "",
    preprocessing: str = "paper",
    dtype: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Masked CLS features of ``images``, uncached. Unreadable images are skipped and counted.

    Returns:
        (x [N', D] float32, y [N'] int64, skipped) with ``N' = len(images) - skipped``.
    """
    xs, ys, skipped = [], [], 0
    batch_size, chunk = batch_and_chunk()
    for start in range(0, len(images), chunk):
        ids = images.paths[start : start + chunk]
        labels = images.labels[start : start + chunk]
        pix, keep_ids, keep_y = [], [], []
        for rel, label in zip(ids, labels):
            img = load_image(images.root / rel, encoder.image_size)
            if img is None:
                skipped += 1
                log.warning("skipping unreadable image %s", images.root / rel)
                continue
            pix.append(img)
            keep_ids.append(rel)
            keep_y.append(int(label))
        if pix:
            batch = normalize(torch.stack(pix), preprocessing)
            keep = masks_for(keep_ids, encoder.num_patches, mask_ratio, mask_seed, mask_mode, group)
            xs.append(encode(encoder, batch, keep, dtype, batch_size))
            ys.append(torch.tensor(keep_y, dtype=torch.int64))
        if progress is not None:
            progress(min(start + chunk, len(images)), len(images))
    if not xs:
        raise ValueError(f"none of the {len(images)} images under {images.root} could be read")
    return torch.cat(xs), torch.cat(ys), skipped


def cached_features(
    encoder: Encoder | EncoderRef,
    images: ImageSet,
    cache: FeatureCache,
    *,
    mask_ratio: float,
    mask_seed: int,
    mask_mode: str = "per-image",
    group: str = "",
    preprocessing: str = "paper",
    dtype: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
    cache_only: bool = False,
) -> Features | None:
    """Features of ``images`` from ``cache``, extracting and storing them on a miss
    (``cache_only``: None on a miss instead).

    ``encoder`` may be an ``EncoderRef``: it is built only on a miss.
    A miss is extracted under ``cache.lock(key)``: a second process (e.g. the other IST worker
    with ``partitioner = "full"``) that misses the same entry meanwhile waits and reads it.
    """
    key = feature_key(encoder, images, mask_ratio, mask_seed, mask_mode, group, preprocessing, dtype)
    hit = cache.load(key)
    if hit is None and cache_only:
        return None
    if hit is None:
        with cache.lock(key):
            hit = cache.load(key)  # stored while we waited?
            if hit is None:
                if isinstance(encoder, EncoderRef):
                    encoder = encoder.build()
                t0 = time.perf_counter()
                x, y, skipped = extract(
                    encoder, images, mask_ratio=mask_ratio, mask_seed=mask_seed, mask_mode=mask_mode, group=group,
                    preprocessing=preprocessing, dtype=dtype, progress=progress,
                )
                seconds = time.perf_counter() - t0
                cache.store(key, x, y, skipped)
                return Features(x, y, seconds, False, skipped)
    x, y, skipped = hit
    return Features(x, y, 0.0, True, skipped)
