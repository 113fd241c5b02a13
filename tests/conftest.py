"""Shared fixtures: tiny image folders, a session feature/extraction cache, the builtin encoder.

Everything is CPU-only, tiny and seeded. No test touches ``~/.cache``: ``FEDSPARSE_CACHE``
points at a per-session temporary folder for the whole run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session (the bundled sample is extracted into it once)."""
    return tmp_path_factory.mktemp("fedsparse-cache")


@pytest.fixture(autouse=True)
def _isolated_cache_env(monkeypatch: pytest.MonkeyPatch, session_cache: Path) -> None:
    """Never fall back to ``~/.cache/fedsparse``, even where a test forgets ``cache_dir``."""
    monkeypatch.setenv("FEDSPARSE_CACHE", str(session_cache))


def write_image(path: Path, size: int = 32, seed: int = 0) -> Path:
    """A random RGB image (PNG or JPEG by suffix) with seeded pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


@pytest.fixture
def image_writer() -> Callable[..., Path]:
    """``image_writer(path, size=32, seed=0)`` writes one seeded random RGB image."""
    return write_image


@pytest.fixture
def make_image_tree() -> Callable[..., Path]:
    """Factory: ``make_image_tree(root, {"train": 3, "test": 1}, classes=("cat", "dog"))``.

    Writes ``root/<split>/<class>/<i>.png`` (``split`` "" = no split folder) with distinct
    seeded pixels; sizes alternate 32 and 40 so that resizing is exercised too.
    """

    def make(
        root: Path,
        splits: dict[str, int],
        classes: tuple[str, ...] = ("cat", "dog"),
        suffix: str = ".png",
    ) -> Path:
        seed = 0
        for split, per_class in splits.items():
            for c in classes:
                for i in range(per_class):
                    folder = root / split / c if split else root / c
                    write_image(folder / f"{i:03d}{suffix}", size=32 if i % 2 == 0 else 40, seed=seed)
                    seed += 1
        return root

    return make


@pytest.fixture(scope="session")
def builtin_encoder():
    """The randomly initialised builtin architecture at 32x32 (warning asserted in test_encoder)."""
    from fedsparse.inputs.encoder import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder("builtin-random", 32)
