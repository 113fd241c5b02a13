"""Fixed patch masks: which patches of an image stay visible.

Convention (used everywhere in fedsparse): a mask is a sorted ``LongTensor`` of the
indices of the *visible* (kept) patches, in row-major patch order. A mask is a pure
function of ``(mask_seed, key)``: the same image gets the same mask in every round,
run and process, because the key is hashed with SHA-256 (never Python's salted
``hash``) into the seed of a private ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import Sequence

import torch

# per-image: one fixed mask per image; shared: one fixed mask per group (client);
# random: a fresh per-image mask every round (the ablation; features cannot be cached).
MASK_MODES = ("per-image", "shared", "random")


def check_mask_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise ``ValueError`` unless it is in [0, 1)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask-ratio must be a number in [0, 1), got {ratio!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"mask-ratio must be in [0, 1), got {ratio!r}")
    return value


def num_visible(num_patches: int, ratio: float) -> int:
    """Patches kept at mask ratio ``ratio``: ``floor(N * (1 - r))``, at least 1.

    The ratio is read as the decimal the user wrote (``Fraction(repr(r))``), so
    ``num_visible(10, 0.8) == 2`` although ``10 * (1 - 0.8) == 1.9999999999999996``.
    At least one patch stays visible so the encoder always sees some input.
    """
    ratio = check_mask_ratio(ratio)
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    exact = Fraction(repr(ratio))
    return max(1, math.floor(num_patches * (1 - exact)))


def seed_for(mask_seed: int, key: str) -> int:
    """A 63-bit generator seed derived from ``(mask_seed, key)``, stable across processes."""
    digest = hashlib.sha256(f"{int(mask_seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def fixed_mask(num_patches: int, ratio: float, mask_seed: int, key: str) -> torch.Tensor:
    """Sorted indices of the visible patches for the image (or client) named ``key``.

    Returns:
        ``LongTensor [num_visible(num_patches, ratio)]``, strictly increasing.
    """
    keep = num_visible(num_patches, ratio)
    if keep == num_patches:
        return torch.arange(num_patches)
    gen = torch.Generator().manual_seed(seed_for(mask_seed, key))
    return torch.randperm(num_patches, generator=gen)[:keep].sort().values


def mask_key(mode: str, image_id: str, group: str) -> str:
    """The key a mask is drawn from: the image in ``per-image`` mode, the group in ``shared``."""
    if mode in ("per-image", "random"):  # random varies the seed by round, not the key
        return image_id
    if mode == "shared":
        return f"shared:{group}"
    raise ValueError(f"Unknown mask-mode {mode!r}; valid modes: {', '.join(MASK_MODES)}")


def masks_for(
    image_ids: Sequence[str],
    num_patches: int,
    ratio: float,
    mask_seed: int,
    mode: str = "per-image",
    group: str = "",
) -> torch.Tensor:
    """Stack the fixed masks of ``image_ids``.

    Args:
        image_ids: stable identifiers of the images (e.g. ``"train/cat/0001.jpg"``).
        group: the name of the image's owner (a client, or ``"test"``), used by ``shared`` mode.

    Returns:
        ``LongTensor [len(image_ids), num_visible]`` of visible patch indices.
    """
    keep = num_visible(num_patches, ratio)
    if not image_ids:
        return torch.empty(0, keep, dtype=torch.long)
    if mode == "shared":
        one = fixed_mask(num_patches, ratio, mask_seed, mask_key(mode, "", group))
        return one.expand(len(image_ids), -1).clone()
    rows = [fixed_mask(num_patches, ratio, mask_seed, mask_key(mode, i, group)) for i in image_ids]
    return torch.stack(rows)


def masked_image_bytes(
    image_size: int, patch_size: int, ratio: float, channels: int = 3, bytes_per_value: int = 1
) -> int:
    """Storage of one masked image: the bytes of its visible patches only.

    ``num_visible(N, r) * patch_size**2 * channels * bytes_per_value`` with
    ``N = (image_size // patch_size) ** 2``; 8-bit pixels by default. Patch indices
    cost nothing extra: they are recomputed from ``(mask_seed, image_id)``.
    """
    if image_size % patch_size:
        raise ValueError(f"image-size {image_size} is not a multiple of patch size {patch_size}")
    n = (image_size // patch_size) ** 2
    return num_visible(n, ratio) * patch_size * patch_size * channels * bytes_per_value
