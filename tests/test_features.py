"""Tests for fedsparse/features.py: masked feature extraction and the feature cache."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsparse.data.datasets import load_splits
from fedsparse.inputs.encoder import encode, load_encoder, load_image, normalize, save_checkpoint
from fedsparse.inputs.features import FeatureCache, cached_features, extract, feature_key
from fedsparse.inputs.masking import masks_for

MASK = dict(mask_ratio=0.5, mask_seed=1234)


@pytest.fixture
def tree(tmp_path: Path, make_image_tree) -> Path:
    """train/{cat,dog}/ 3 images each, test/{cat,dog}/ 1 each."""
    return make_image_tree(tmp_path / "images", {"train": 3, "test": 1})


@pytest.fixture
def train(tree: Path, tmp_path: Path):
    return load_splits("imagefolder", str(tree), str(tmp_path / "data-cache"))[0]


@pytest.fixture
def cache(tmp_path: Path) -> FeatureCache:
    return FeatureCache(tmp_path / "feature-cache")


def entries(cache: FeatureCache) -> list[Path]:
    return sorted(cache.root.glob("*")) if cache.root.exists() else []


class TestExtract:
    def test_features_equal_the_hand_pipeline(self, builtin_encoder, train) -> None:
        x, y, skipped = extract(builtin_encoder, train, **MASK)
        pix = torch.stack([load_image(train.root / p, 32) for p in train.paths])
        keep = masks_for(list(train.paths), 64, 0.5, 1234)
        ref = encode(builtin_encoder, normalize(pix, "paper"), keep)
        assert skipped == 0 and x.shape == (6, 192) and x.dtype == torch.float32
        assert torch.allclose(x, ref, atol=1e-5)
        assert y.dtype == torch.int64 and y.tolist() == train.labels.tolist()

    def test_unreadable_image_is_skipped_and_counted(self, builtin_encoder, tree, tmp_path) -> None:
        (tree / "train" / "dog" / "zz_broken.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
        train = load_splits("imagefolder", str(tree), str(tmp_path / "c2"))[0]
        assert len(train) == 7
        x, y, skipped = extract(builtin_encoder, train, **MASK)
        assert skipped == 1 and len(x) == len(y) == 6
        good = [i for i, p in enumerate(train.paths) if not p.endswith("zz_broken.jpg")]
        x_good, y_good, _ = extract(builtin_encoder, train.subset(good), **MASK)
        assert torch.allclose(x, x_good, atol=1e-5)  # the others keep their own masks and labels
        assert torch.equal(y, y_good)

    def test_all_unreadable_raises(self, builtin_encoder, tmp_path) -> None:
        for c in ("a", "b"):
            (tmp_path / "bad" / c).mkdir(parents=True)
            (tmp_path / "bad" / c / "x.jpg").write_bytes(b"nope")
        train, test = load_splits("imagefolder", str(tmp_path / "bad"), str(tmp_path / "c3"))
        with pytest.raises(ValueError, match="could be read"):
            extract(builtin_encoder, train, **MASK)

    def test_progress_reports_done_and_total(self, builtin_encoder, train) -> None:
        calls: list[tuple[int, int]] = []
        extract(builtin_encoder, train, **MASK, progress=lambda done, total: calls.append((done, total)))
        assert calls == [(6, 6)]


class TestFeatureCache:
    def test_first_call_extracts_second_call_hits(self, builtin_encoder, train, cache) -> None:
        first = cached_features(builtin_encoder, train, cache, **MASK)
        assert first.cache_hit is False and first.seconds > 0 and first.skipped == 0
        assert len(entries(cache)) == 1
        second = cached_features(builtin_encoder, train, cache, **MASK)
        assert second.cache_hit is True and second.seconds == 0.0
        assert torch.equal(second.x, first.x) and torch.equal(second.y, first.y)
        assert second.skipped == first.skipped

    def test_no_temp_files_are_left_behind(self, builtin_encoder, train, cache) -> None:
        cached_features(builtin_encoder, train, cache, **MASK)
        assert [p.suffix for p in entries(cache)] == [".pt"]

    def test_concurrent_misses_extract_once(self, builtin_encoder, train, cache, monkeypatch) -> None:
        """Two clients (threads here; flock works the same across processes) miss the same entry
        at once: one extracts, the other waits for the lock and reads the stored entry."""
        import threading
        import time

        import fedsparse.inputs.features as features_mod

        calls, real = [], features_mod.extract

        def slow_extract(*args, **kwargs):
            calls.append(threading.get_ident())
            time.sleep(0.5)  # long enough for the other thread to miss and block on the lock
            return real(*args, **kwargs)

        monkeypatch.setattr(features_mod, "extract", slow_extract)
        results = []
        threads = [threading.Thread(target=lambda: results.append(cached_features(builtin_encoder, train, cache, **MASK)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(calls) == 1
        assert sorted(r.cache_hit for r in results) == [False, True]
        assert torch.equal(results[0].x, results[1].x)
        assert [p.suffix for p in entries(cache)] == [".pt"]  # the lock file lives outside the entries

    @pytest.mark.parametrize(
        "change",
        [
            {"mask_ratio": 0.75},
            {"mask_seed": 4321},
            {"mask_mode": "shared", "group": "client-0"},
            {"preprocessing": "imagenet"},
            {"dtype": "bf16"},
        ],
        ids=["mask-ratio", "mask-seed", "mask-mode", "preprocessing", "dtype"],
    )
    def test_changed_setting_misses_and_gives_new_features(self, builtin_encoder, train, cache, change) -> None:
        base = cached_features(builtin_encoder, train, cache, **MASK)
        changed = cached_features(builtin_encoder, train, cache, **{**MASK, **change})
        assert changed.cache_hit is False
        assert not torch.allclose(changed.x, base.x, atol=1e-4), "served features of the old setting"
        assert len(entries(cache)) == 2
        again = cached_features(builtin_encoder, train, cache, **MASK)
        assert again.cache_hit is True and torch.equal(again.x, base.x)

    def test_group_matters_only_in_shared_mode(self, builtin_encoder, train, cache) -> None:
        cached_features(builtin_encoder, train, cache, **MASK, group="client-0")
        assert cached_features(builtin_encoder, train, cache, **MASK, group="client-1").cache_hit is True
        a = cached_features(builtin_encoder, train, cache, **MASK, mask_mode="shared", group="client-0")
        b = cached_features(builtin_encoder, train, cache, **MASK, mask_mode="shared", group="client-1")
        assert (a.cache_hit, b.cache_hit) == (False, False)
        assert not torch.allclose(a.x, b.x, atol=1e-4)

    def test_changed_encoder_weights_at_same_path_miss(self, builtin_encoder, train, cache, tmp_path) -> None:
        path = tmp_path / "enc.pth"
        save_checkpoint(builtin_encoder.model, path)
        enc_a = load_encoder(str(path), 32)
        first = cached_features(enc_a, train, cache, **MASK)

        perturbed = copy.deepcopy(builtin_encoder.model)
        with torch.no_grad():
            perturbed.blocks[0].attn.qkv.weight[0, 0] += 0.5
        save_checkpoint(perturbed, path)  # same spec string, new weights
        enc_b = load_encoder(str(path), 32)
        assert enc_b.spec == enc_a.spec and enc_b.weights_sha != enc_a.weights_sha

        second = cached_features(enc_b, train, cache, **MASK)
        assert second.cache_hit is False
        assert not torch.equal(second.x, first.x)
        ref, _, _ = extract(enc_b, train, **MASK)
        assert torch.allclose(second.x, ref, atol=1e-6)

    def test_changed_image_file_misses(self, builtin_encoder, tree, cache, tmp_path, image_writer) -> None:
        train = load_splits("imagefolder", str(tree), str(tmp_path / "c4"))[0]
        first = cached_features(builtin_encoder, train, cache, **MASK)
        image_writer(tree / train.paths[0], size=40, seed=999)  # new pixels, new size on disk
        relisted = load_splits.__wrapped__("imagefolder", str(tree), str(tmp_path / "c4"))[0]
        assert relisted.fingerprint != train.fingerprint
        second = cached_features(builtin_encoder, relisted, cache, **MASK)
        assert second.cache_hit is False
        assert not torch.allclose(second.x[0], first.x[0], atol=1e-4)
        assert torch.allclose(second.x[1:], first.x[1:], atol=1e-5)

    def test_corrupt_entry_is_a_miss_and_is_rewritten(self, builtin_encoder, train, cache) -> None:
        first = cached_features(builtin_encoder, train, cache, **MASK)
        (entry,) = entries(cache)
        entry.write_bytes(entry.read_bytes()[:50])  # truncated write
        second = cached_features(builtin_encoder, train, cache, **MASK)
        assert second.cache_hit is False and torch.allclose(second.x, first.x, atol=1e-6)
        assert cached_features(builtin_encoder, train, cache, **MASK).cache_hit is True

    def test_garbage_entry_is_a_miss(self, builtin_encoder, train, cache) -> None:
        key = feature_key(builtin_encoder, train, 0.5, 1234, "per-image", "", "paper", "fp32")
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        cache.path(key).write_bytes(b"\x00" * 64)
        assert cache.load(key) is None
        assert cached_features(builtin_encoder, train, cache, **MASK).cache_hit is False

    def test_foreign_torch_file_is_a_miss(self, builtin_encoder, train, cache) -> None:
        # a readable torch file that is not a cache entry ("a truncated or foreign file is a miss")
        key = feature_key(builtin_encoder, train, 0.5, 1234, "per-image", "", "paper", "fp32")
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.zeros(3), cache.path(key))
        assert cache.load(key) is None

    def test_entry_with_other_key_is_never_served(self, builtin_encoder, train, cache) -> None:
        key = feature_key(builtin_encoder, train, 0.5, 1234, "per-image", "", "paper", "fp32")
        other = dict(key, preprocessing="imagenet")
        # simulate a digest collision: an entry for another key stored at this key's path
        cache.path(key).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(other, sort_keys=True), "x": torch.zeros(6, 192),
                    "y": torch.zeros(6, dtype=torch.int64), "skipped": 0}, cache.path(key))
        assert cache.load(key) is None
        fresh = cached_features(builtin_encoder, train, cache, **MASK)
        assert fresh.cache_hit is False and fresh.x.abs().sum() > 0

    def test_skipped_count_survives_the_cache(self, builtin_encoder, tree, cache, tmp_path) -> None:
        (tree / "train" / "cat" / "broken.png").write_bytes(b"garbage")
        train = load_splits("imagefolder", str(tree), str(tmp_path / "c5"))[0]
        first = cached_features(builtin_encoder, train, cache, **MASK)
        second = cached_features(builtin_encoder, train, cache, **MASK)
        assert (first.skipped, second.skipped) == (1, 1) and second.cache_hit

    def test_key_covers_encoder_mask_data_and_preprocessing(self, builtin_encoder, train) -> None:
        key = feature_key(builtin_encoder, train, 0.5, 1234, "per-image", "g", "paper", "fp32")
        assert key["encoder"]["weights"] == builtin_encoder.weights_sha
        assert key["mask"] == {"ratio": 0.5, "seed": 1234, "mode": "per-image", "group": ""}
        assert key["data"]["fingerprint"] == train.fingerprint and key["data"]["n"] == 6
        sub = train.subset(np.arange(5))
        assert feature_key(builtin_encoder, sub, 0.5, 1234, "per-image", "g", "paper", "fp32") != key


def test_encoder_ref_names_the_same_entries_as_the_built_encoder(tmp_path: Path) -> None:
    """The reference read from a checkpoint file (no model built) has the built encoder's
    identity, shape and size, so the cache entries it names are the ones extraction wrote;
    a changed file is a new reference (its digest changes)."""
    from fedsparse.accounting.costs import ViTShape
    from fedsparse.inputs.encoder import build_builtin
    from fedsparse.inputs.features import encoder_ref

    ref, built = encoder_ref("builtin", 32), load_encoder("builtin", 32)
    assert ref.identity == built.identity and ref.shape == ViTShape.of(built.model, 32)
    assert ref.params == sum(p.numel() for p in built.model.parameters())
    path = tmp_path / "enc.pth"
    save_checkpoint(build_builtin(32), path, half=True)
    assert encoder_ref(str(path), 32).identity == load_encoder(str(path), 32).identity
    model = build_builtin(32)
    with torch.no_grad():
        model.cls_token.add_(1.0)
    save_checkpoint(model, path, half=True)
    assert encoder_ref(str(path), 32).identity == load_encoder(str(path), 32).identity != built.identity
    with pytest.raises(ValueError, match="image-size is 64"):
        encoder_ref(str(path), 64)
