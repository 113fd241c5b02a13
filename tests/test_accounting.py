"""Analytic costs (fedsparse.accounting.costs) against counters and hand counts."""

from __future__ import annotations

import warnings

import pytest
import torch

from fedsparse.accounting.costs import (
    ViTShape,
    cls_cache_bytes,
    encoder_macs,
    head_train_tensor_bytes,
    masked_images_bytes,
)
from fedsparse.commands.bench import counted_macs
from fedsparse.inputs.encoder import load_encoder
from fedsparse.model.head import MLPHead
from fedsparse.inputs.masking import masked_image_bytes

VIT_B16 = ViTShape(image_size=224, patch_size=16, dim=768, depth=12)


class TestEncoderMacs:
    @pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.9])
    def test_matches_the_flop_counter_on_the_real_forward(self, builtin_encoder, ratio):
        shape = ViTShape.of(builtin_encoder.model, 32)
        assert encoder_macs(shape, ratio) == counted_macs(builtin_encoder, ratio)

    def test_matches_the_counter_for_another_architecture(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            enc = load_encoder("vit_tiny_patch16_224@random", 64)  # 16 patches, dim 192, 12 blocks
        shape = ViTShape.of(enc.model, 64)
        assert (shape.dim, shape.depth, shape.num_patches) == (192, 12, 16)
        for ratio in (0.0, 0.5):
            assert encoder_macs(shape, ratio) == counted_macs(enc, ratio)

    def test_vit_b16_full_image_is_its_published_17_6_gmacs(self):
        assert encoder_macs(VIT_B16, 0.0) / 1e9 == pytest.approx(17.56, abs=0.01)

    def test_masking_75_percent_cuts_work_about_4_07_times(self):
        # 197 -> 50 tokens: 4.06x, a little more than 196/49 = 4 because attention is quadratic
        assert encoder_macs(VIT_B16, 0.0) / encoder_macs(VIT_B16, 0.75) == pytest.approx(4.07, abs=0.01)

    def test_work_falls_strictly_with_the_ratio(self):
        macs = [encoder_macs(VIT_B16, r / 10) for r in range(10)]
        assert all(a > b for a, b in zip(macs, macs[1:]))


class TestStorage:
    def test_masked_images_are_n_times_one_masked_image(self):
        for r in (0.0, 0.5, 0.9):
            assert masked_images_bytes(7, VIT_B16, r) == 7 * masked_image_bytes(224, 16, r)

    def test_cls_cache_is_fp32_vectors(self):
        assert cls_cache_bytes(10, 192) == torch.zeros(10, 192).element_size() * 10 * 192


def test_head_train_tensor_bytes_counts_params_grads_and_adam_moments():
    head = MLPHead(192, (64, 32), 10)
    params = sum(p.numel() for p in head.parameters())
    assert head_train_tensor_bytes(head.dims, 8) == 4 * (4 * params + 8 * (192 + 64 + 32 + 10))
