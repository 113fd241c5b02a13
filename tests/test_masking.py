"""Tests for fedsparse/masking.py: fixed, reproducible visible-patch masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedsparse.inputs.masking import (
    check_mask_ratio,
    fixed_mask,
    mask_key,
    masked_image_bytes,
    masks_for,
    num_visible,
    seed_for,
)

RATIOS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
KEEP_196 = [196, 176, 156, 137, 117, 98, 78, 58, 39, 19]
KEEP_10 = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
IDS = ["train/cat/0001.jpg", "train/dog/0002.jpg", "test/cat/0003.png", "ünïcode/ä.jpg"]


class TestKeepCounts:
    @pytest.mark.parametrize("ratio, expected", zip(RATIOS, KEEP_196))
    def test_keep_count_is_floor_of_decimal_ratio_n196(self, ratio: float, expected: int) -> None:
        assert num_visible(196, ratio) == expected
        assert fixed_mask(196, ratio, 1234, "img").numel() == expected
        assert masks_for(IDS, 196, ratio, 1234).shape == (len(IDS), expected)

    @pytest.mark.parametrize("ratio, expected", zip(RATIOS, KEEP_10))
    def test_keep_count_is_floor_of_decimal_ratio_n10(self, ratio: float, expected: int) -> None:
        # 10 * (1 - 0.8) == 1.9999999999999996 in floats; the decimal reading gives 2
        assert num_visible(10, ratio) == expected
        assert fixed_mask(10, ratio, 0, "img").numel() == expected

    def test_at_least_one_patch_stays_visible(self) -> None:
        assert num_visible(4, 0.9) == 1
        assert num_visible(1, 0.5) == 1
        assert fixed_mask(4, 0.9, 0, "x").numel() == 1

    def test_zero_ratio_keeps_every_patch_in_order(self) -> None:
        assert torch.equal(fixed_mask(196, 0.0, 7, "any"), torch.arange(196))

    def test_non_positive_patch_count_raises(self) -> None:
        with pytest.raises(ValueError, match="num_patches"):
            num_visible(0, 0.5)


class TestRatioValidation:
    @pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf"), "half", None])
    def test_ratio_outside_unit_interval_raises_naming_mask_ratio(self, bad: object) -> None:
        with pytest.raises(ValueError, match="mask-ratio"):
            check_mask_ratio(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="mask-ratio"):
            num_visible(196, bad)  # type: ignore[arg-type]

    @pytest.mark.parametrize("good", [0, 0.0, 0.5, 0.999, "0.25"])
    def test_valid_ratio_is_returned_as_float(self, good: object) -> None:
        value = check_mask_ratio(good)  # type: ignore[arg-type]
        assert isinstance(value, float) and value == float(good)  # type: ignore[arg-type]


class TestMaskShape:
    @pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9])
    def test_masks_are_sorted_unique_and_in_range(self, ratio: float) -> None:
        for i in range(25):
            m = fixed_mask(196, ratio, 1234, f"img{i}")
            assert m.dtype == torch.long
            assert torch.all(m[1:] > m[:-1]), "not strictly increasing (sorted and unique)"
            assert int(m.min()) >= 0 and int(m.max()) < 196

    def test_masks_for_rows_equal_fixed_mask_per_image(self) -> None:
        stacked = masks_for(IDS, 64, 0.5, 99)
        for row, image_id in zip(stacked, IDS):
            assert torch.equal(row, fixed_mask(64, 0.5, 99, image_id))

    def test_empty_id_list_gives_empty_mask_batch(self) -> None:
        out = masks_for([], 196, 0.75, 0)
        assert out.shape == (0, 49) and out.dtype == torch.long


class TestReproducibility:
    def test_same_key_gives_same_mask(self) -> None:
        assert torch.equal(fixed_mask(196, 0.75, 5, "a"), fixed_mask(196, 0.75, 5, "a"))

    def test_mask_seed_changes_the_mask(self) -> None:
        assert not torch.equal(fixed_mask(196, 0.75, 1, "a"), fixed_mask(196, 0.75, 2, "a"))

    def test_mask_draw_does_not_touch_global_rng(self) -> None:
        torch.manual_seed(0)
        expected = torch.rand(3)
        torch.manual_seed(0)
        fixed_mask(196, 0.5, 1, "a")
        assert torch.equal(torch.rand(3), expected)

    def test_seed_is_63_bit_and_key_sensitive(self) -> None:
        s = seed_for(1234, "img")
        assert 0 <= s < 2**63
        assert s != seed_for(1234, "img2") and s != seed_for(1235, "img")

    def test_masks_identical_across_processes(self) -> None:
        code = (
            "import json, sys; from fedsparse.inputs.masking import masks_for, seed_for;"
            "ids = json.loads(sys.argv[1]);"
            "print(json.dumps({'per': masks_for(ids, 196, 0.75, 1234).tolist(),"
            " 'shared': masks_for(ids, 196, 0.5, 7, 'shared', 'client-3').tolist(),"
            " 'seed': seed_for(1234, ids[0])}))"
        )
        env = dict(os.environ, PYTHONHASHSEED="12345")  # salted str hash must not matter
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(IDS)], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        other = json.loads(proc.stdout)
        assert other["per"] == masks_for(IDS, 196, 0.75, 1234).tolist()
        assert other["shared"] == masks_for(IDS, 196, 0.5, 7, "shared", "client-3").tolist()
        assert other["seed"] == seed_for(1234, IDS[0])


class TestMaskModes:
    def test_per_image_masks_differ_between_images(self) -> None:
        ids = [f"train/c/{i:04d}.jpg" for i in range(30)]
        rows = {tuple(r) for r in masks_for(ids, 196, 0.75, 1234, "per-image").tolist()}
        assert len(rows) == len(ids)

    def test_shared_mode_gives_one_mask_per_group(self) -> None:
        ids = [f"train/c/{i:04d}.jpg" for i in range(10)]
        a = masks_for(ids, 196, 0.75, 1234, "shared", "client-0")
        b = masks_for(ids[:3], 196, 0.75, 1234, "shared", "client-0")
        other = masks_for(ids, 196, 0.75, 1234, "shared", "client-1")
        assert torch.equal(a, a[:1].expand_as(a))  # every image of the group shares it
        assert torch.equal(a[0], b[0])  # independent of which images are asked for
        assert not torch.equal(a[0], other[0])  # another group gets another mask
        # the shared mask is a fresh tensor per row, not a view that aliases memory
        a[0, 0] = -1
        assert int(a[1, 0]) != -1

    def test_shared_mode_ignores_image_id(self) -> None:
        assert mask_key("shared", "img-a", "g") == mask_key("shared", "img-b", "g")
        assert mask_key("per-image", "img-a", "g") != mask_key("per-image", "img-b", "g")

    def test_unknown_mode_raises_listing_modes(self) -> None:
        with pytest.raises(ValueError, match="per-image.*shared.*random"):
            masks_for(["a"], 196, 0.5, 0, "sometimes")


class TestMaskedImageBytes:
    @pytest.mark.parametrize(
        "image_size, patch, ratio, channels, bpv, expected",
        [
            (224, 16, 0.75, 3, 1, 49 * 16 * 16 * 3),  # N = 196, keep 49
            (224, 16, 0.0, 3, 1, 224 * 224 * 3),  # unmasked: the full image
            (32, 4, 0.5, 3, 1, 32 * 4 * 4 * 3),  # N = 64, keep 32
            (32, 4, 0.5, 3, 4, 32 * 4 * 4 * 3 * 4),  # fp32 pixels
            (20, 2, 0.8, 1, 1, 20 * 2 * 2 * 1),  # N = 100, keep 20; grey
        ],
    )
    def test_bytes_equal_hand_arithmetic(self, image_size, patch, ratio, channels, bpv, expected) -> None:
        assert masked_image_bytes(image_size, patch, ratio, channels, bpv) == expected

    def test_image_size_not_multiple_of_patch_raises(self) -> None:
        with pytest.raises(ValueError, match="multiple"):
            masked_image_bytes(30, 4, 0.5)
