"""Tests on real images: the CIFAR-10 test split (10,000 JPEGs) and RSSCN7 (2,800 aerial scenes,
256x256, 7 classes) from the project's shared data folder, never downloaded.

The archives are found at ``$FEDSPARSE_SHARED_DATA`` or ``<repo>/../shared/data`` and extracted
once per session into the session cache by the project's own ``extract_archive`` / ``load_splits``;
every test skips, with the reason, where they are absent. The CIFAR-10 training archive (50,000
images) is left out to keep this file fast: the test archive stands in for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsparse.config import RunConfig
from fedsparse.data.datasets import ImageSet, extract_archive, load_splits
from fedsparse.data.partition import partition_indices
from fedsparse.commands.probe import fit_head
from fedsparse.task import features

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FEDSPARSE_SHARED_DATA") or REPO.parent / "shared" / "data")
CIFAR_TEST = SHARED / "cifar10" / "cifar10-test-jpg.tar.gz"
RSSCN7 = SHARED / "rsscn7" / "rsscn7-256-jpg.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RSSCN7_CLASSES = ("aGrass", "bField", "cIndustry", "dRiverLake", "eForest", "fResident", "gParking")


def _need(archive: Path) -> Path:
    if not archive.is_file():
        pytest.skip(f"real-data archive {archive} not found (set FEDSPARSE_SHARED_DATA to the shared data folder)")
    return archive


@pytest.fixture(scope="session")
def cifar10_test_tree(session_cache: Path) -> Path:
    """The CIFAR-10 test archive extracted once into the session cache: ``<root>/test/<class>/*.jpg``."""
    return extract_archive(_need(CIFAR_TEST), session_cache)


@pytest.fixture(scope="session")
def cifar10_dir(cifar10_test_tree: Path, session_cache: Path) -> Path:
    """A ``cifar10`` data-dir whose train/ and test/ are both the real test split (a stand-in for the
    50,000-image training archive, which takes long to extract)."""
    d = session_cache / "real-cifar10"
    if not d.is_dir():
        d.mkdir()
        for split in ("train", "test"):
            os.symlink(cifar10_test_tree / "test", d / split)
    return d


@pytest.fixture(scope="session")
def rsscn7(session_cache: Path) -> tuple[ImageSet, ImageSet]:
    """RSSCN7 through ``load_splits("imagefolder", archive)``: the seeded 80/20 split."""
    return load_splits("imagefolder", str(_need(RSSCN7)), str(session_cache))


def per_class(images: ImageSet, n: int, seed: int) -> ImageSet:
    """``n`` seeded images of every class."""
    rng = np.random.default_rng(seed)
    idx = [rng.choice(np.flatnonzero(images.labels == c), n, replace=False) for c in range(len(images.classes))]
    return images.subset(np.sort(np.concatenate(idx)))


class TestCifar10:
    def test_class_folders_from_the_archive_are_ten_balanced_classes(self, cifar10_dir: Path, session_cache) -> None:
        train, test = load_splits("cifar10", str(cifar10_dir), str(session_cache))
        assert test.classes == CIFAR_CLASSES and train.classes == CIFAR_CLASSES
        assert len(test) == 10_000
        assert np.bincount(test.labels, minlength=10).tolist() == [1_000] * 10
        assert all(p.startswith("test/") and p.endswith(".jpg") for p in test.paths)
        assert (test.root / test.paths[0]).is_file()

    def test_the_test_archive_alone_is_not_a_cifar10_data_dir(self, tmp_path, session_cache) -> None:
        folder = tmp_path / "only-test"
        folder.mkdir()
        os.symlink(_need(CIFAR_TEST), folder / CIFAR_TEST.name)
        with pytest.raises(ValueError, match="must hold train/ and test/") as err:
            load_splits.__wrapped__("cifar10", str(folder), str(session_cache))
        assert "\n" not in str(err.value)

    def test_partitioners_on_real_labels(self, cifar10_dir: Path, session_cache) -> None:
        _, test = load_splits("cifar10", str(cifar10_dir), str(session_cache))
        y, k = test.labels, 10

        def entropy(part: np.ndarray) -> float:
            p = np.bincount(y[part], minlength=10) / len(part)
            p = p[p > 0]
            return float(-(p * np.log(p)).sum())

        iid = partition_indices(y, k, "iid", seed=0)
        assert max(map(len, iid)) - min(map(len, iid)) <= 1
        for part in iid:  # every client sees every class at about 10%
            shares = np.bincount(y[part], minlength=10) / len(part)
            assert shares.min() > 0.06 and shares.max() < 0.14
        skewed = partition_indices(y, k, "dirichlet", seed=0, alpha=0.1)
        assert np.mean([entropy(p) for p in skewed]) < 0.6 * np.mean([entropy(p) for p in iid])
        assert sorted(np.concatenate(skewed).tolist()) == list(range(len(y)))
        assert all(np.array_equal(a, b) for a, b in zip(skewed, partition_indices(y, k, "dirichlet", seed=0, alpha=0.1)))
        for part in partition_indices(y, k, "shards", seed=0):  # 20 single-class shards, two per client
            assert len(np.unique(y[part])) <= 2 and len(part) == 1_000


class TestRsscn7:
    def test_imagefolder_archive_gives_seven_classes_and_a_reproducible_80_20_split(self, rsscn7, session_cache) -> None:
        train, test = rsscn7
        assert train.classes == RSSCN7_CLASSES
        assert (len(train), len(test)) == (2_240, 560)
        assert not set(train.paths) & set(test.paths)
        counts = np.bincount(np.concatenate([train.labels, test.labels]))
        assert counts.tolist() == [400] * 7
        assert np.bincount(test.labels).min() > 50  # the seeded split is not class-sorted
        train2, test2 = load_splits.__wrapped__("imagefolder", str(RSSCN7), str(session_cache))  # fresh listing
        assert train2.paths == train.paths and test2.paths == test.paths
        assert train2.fingerprint == train.fingerprint

    def test_builtin_features_are_cached_and_a_head_beats_chance(self, rsscn7, session_cache) -> None:
        train, test = rsscn7
        tr, te = per_class(train, 30, seed=0), per_class(test, 15, seed=1)  # 210 + 105 images
        results = {}
        for ratio in (0.0, 0.75):
            cfg = RunConfig(dataset="imagefolder", data_dir=str(RSSCN7), cache_dir=str(session_cache),
                            encoder="builtin", image_size=32, mask_ratio=ratio, batch_size=32)
            first = features(cfg, tr, "train")
            assert first.x.shape == (len(tr), 192) and first.x.dtype == torch.float32
            assert torch.isfinite(first.x).all() and first.skipped == 0
            assert torch.equal(first.y, torch.as_tensor(tr.labels))
            again = features(cfg, tr, "train")
            assert again.cache_hit and again.seconds == 0.0 and torch.equal(again.x, first.x)
            results[ratio] = (cfg, first, features(cfg, te, "test"))
        assert not torch.allclose(results[0.0][1].x, results[0.75][1].x)  # masking changes the features
        cfg, f_tr, f_te = results[0.0]
        fit = fit_head((f_tr.x, f_tr.y), (f_te.x, f_te.y), cfg.replace(hidden="256"), steps=150, evals=3)
        assert fit["accuracy"] > 1 / 7 + 0.25, fit["curve"]
