"""Shared fixtures: tiny image folders, a session feature/extraction cache, the builtin encoder.

Everything is CPU-only, tiny and seeded. No test touches ``~/.cache``: ``FEDSPARSE_CACHE``
points at a per-session temporary folder for the whole run.

The suite runs on pytest-xdist workers, one per core (``-n auto --dist loadgroup`` in
pyproject.toml's addopts; ``-n 0`` runs it in one process). Tests are handed out one at a time,
so any two may run at once, each in its own process with its own session fixtures. Tests that
must not overlap share a group, ``@pytest.mark.xdist_group("NAME")``: a group's tests run one
after another on one worker, in file order. Group ``"ray"`` holds every test that starts a Ray
cluster (the Simulation Engine: each sizes its cluster to the whole machine); a new such test
joins it. Ports are picked free at run time (``fedsparse.local_deployment.free_ports``), never
fixed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


# Under pytest-xdist the workers already fill the cores: each gets its share of math threads,
# in its own process and (OMP_NUM_THREADS) in every process its tests start. More threads than
# cores make torch's idle OpenMP threads spin: 2 workers x 2 threads on 2 cores ran a test's
# pretraining 7x slower than with 1 thread each.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

_UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which tags each grouped test
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` every test with an ``xdist_group`` mark must carry its group in
    its node id: that is how pytest-xdist hands a group to one worker. Where the two plugins
    disagree (pytest 9.2 with pytest-xdist 3.8), the groups are silently ignored and the Ray
    tests overlap, so each grouped test fails, saying why (an error raised here would reach the
    terminal only as pytest-xdist's internal error)."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup")):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and item.nodeid.rfind("@") <= item.nodeid.rfind("]"):
            item.stash[_UNGROUPED] = (f"pytest-xdist did not group this xdist_group test under pytest "
                                      f"{pytest.__version__}: install the pytest that pyproject.toml's test extra asks for")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)


# Flower's SuperExecs (under the SuperLink and the SuperNodes that the deployment tests start)
# look for work every second by default; every message of a deployed run waits for that poll.
# Inherited by every process a test starts.
os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")


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


def image_tree(
    root: Path,
    splits: dict[str, int],
    classes: tuple[str, ...] = ("cat", "dog"),
    suffix: str = ".png",
) -> Path:
    """Writes ``root/<split>/<class>/<i>.png`` (``split`` "" = no split folder) with distinct
    seeded pixels; sizes alternate 32 and 40 so that resizing is exercised too."""
    seed = 0
    for split, per_class in splits.items():
        for c in classes:
            for i in range(per_class):
                folder = root / split / c if split else root / c
                write_image(folder / f"{i:03d}{suffix}", size=32 if i % 2 == 0 else 40, seed=seed)
                seed += 1
    return root


@pytest.fixture
def make_image_tree() -> Callable[..., Path]:
    """Factory: ``make_image_tree(root, {"train": 3, "test": 1}, classes=("cat", "dog"))``
    writes a fresh tree under ``root`` (``image_tree``)."""
    return image_tree


@pytest.fixture(scope="session")
def shared_image_tree(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``shared_image_tree({"train": 8, "test": 3}, classes=("a", "b", "c"))``, the same
    tree as ``make_image_tree`` writes, written once per session (per xdist worker) for each
    layout and shared by every test that asks for it. Read it, never change it: a test that adds,
    removes or breaks images makes its own with ``make_image_tree``."""
    trees: dict[tuple, Path] = {}

    def get(splits: dict[str, int], classes: tuple[str, ...] = ("cat", "dog"), suffix: str = ".png") -> Path:
        key = (tuple(splits.items()), tuple(classes), suffix)
        if key not in trees:
            trees[key] = image_tree(tmp_path_factory.mktemp("shared-tree"), splits, classes, suffix)
        return trees[key]

    return get


@pytest.fixture(scope="session")
def shared_feature_cache(session_cache: Path) -> Path:
    """A ``cache-dir`` shared by the session's tests: a shared tree's features are extracted by
    the first run that needs them and read from the cache by every later one. For tests that
    assert nothing about cache hits and misses; the others give their run a fresh folder."""
    return session_cache / "shared-features"


@pytest.fixture(scope="session")
def builtin_encoder():
    """The randomly initialised builtin architecture at 32x32 (warning asserted in test_encoder)."""
    from fedsparse.inputs.encoder import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_encoder("builtin-random", 32)
