"""Tests for fedsparse/encoder.py: visible-patch CLS features and encoder loading."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedsparse.inputs.encoder import (
    encode,
    load_checkpoint,
    load_encoder,
    load_image,
    normalize,
    patchify,
    save_checkpoint,
    visible_cls,
    weights_digest,
)
from fedsparse.inputs.masking import masks_for, num_visible


def tiny_vit(seed: int = 0, **overrides) -> torch.nn.Module:
    """A small timm ViT (patch 8 on 32x32: 16 patches) with seeded random weights."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(**kwargs)
        # timm initialises cls_token near 0; make the prefix tokens matter in the comparison
        with torch.no_grad():
            model.cls_token.normal_(0, 0.5)
            model.pos_embed.normal_(0, 0.5)
            if getattr(model, "reg_token", None) is not None:
                model.reg_token.normal_(0, 0.5)
    return model.eval()


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def all_patches(batch: int, n: int) -> torch.Tensor:
    return torch.arange(n).expand(batch, -1)


class TestOwnViT:
    """``fedsparse.inputs.vit.ViT`` (the built-in encoder and checkpoint files, without timm)
    is timm's ``VisionTransformer``: the same seeded initialisation, the same features."""

    def test_no_timm_is_imported_to_build_or_run_it(self) -> None:
        import subprocess
        import sys

        code = ("import sys\nfrom fedsparse.inputs.encoder import encode, load_encoder\nimport torch\n"
                "e = load_encoder('builtin', 32)\n"
                "f = encode(e, torch.zeros(2, 3, 32, 32), torch.arange(32).expand(2, -1))\n"
                "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules), tuple(f.shape))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[0] == "[] (2, 192)", out.stdout

    @pytest.mark.parametrize("image_size", [32, 64])
    def test_seeded_initialisation_is_timms(self, image_size) -> None:
        from timm.models.vision_transformer import VisionTransformer

        from fedsparse.inputs.encoder import BUILTIN_ARCH, BUILTIN_SEED, build_builtin

        ours = build_builtin(image_size).state_dict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BUILTIN_SEED)
            theirs = VisionTransformer(img_size=image_size, num_classes=0, global_pool="token", **BUILTIN_ARCH).state_dict()
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []

    def test_features_are_timms_bit_for_bit(self, builtin_encoder) -> None:
        from timm.models.vision_transformer import VisionTransformer

        from fedsparse.inputs.encoder import BUILTIN_ARCH

        ours = builtin_encoder.model
        theirs = VisionTransformer(img_size=32, num_classes=0, global_pool="token", **BUILTIN_ARCH).eval()
        theirs.load_state_dict(ours.state_dict())
        x = images(8, seed=3)
        keep = masks_for([f"i{i}" for i in range(8)], 64, 0.5, 0)
        with torch.no_grad():
            assert torch.equal(visible_cls(ours, x, keep), visible_cls(theirs, x, keep))
            assert torch.equal(ours.forward_features(x), theirs.forward_features(x))


class TestVisibleCls:
    def test_unmasked_builtin_equals_its_full_forward(self, builtin_encoder) -> None:
        model = builtin_encoder.model
        x = images(3)
        with torch.no_grad():
            ref = model.forward_features(x)[:, 0]
            got = visible_cls(model, x, all_patches(3, builtin_encoder.num_patches))
        assert got.shape == (3, 192)
        assert torch.allclose(got, ref, atol=1e-5)

    @pytest.mark.parametrize(
        "variant",
        [
            {},  # patch 8, one CLS token with its own position embedding
            {"patch_size": 16},  # 4 patches
            {"reg_tokens": 2},  # register tokens between CLS and patches
            {"no_embed_class": True, "reg_tokens": 1},  # prefix tokens carry no position embedding
        ],
        ids=["patch8", "patch16", "reg-tokens", "no-embed-class"],
    )
    def test_unmasked_tiny_vit_equals_timm_forward_features(self, variant) -> None:
        model = tiny_vit(**variant)
        x = images(2)
        n = model.patch_embed.num_patches
        with torch.no_grad():
            ref = model.forward_features(x)[:, 0]
            got = visible_cls(model, x, all_patches(2, n))
        assert torch.allclose(got, ref, atol=1e-5)

    def test_masked_forward_equals_timm_on_the_kept_tokens(self) -> None:
        model = tiny_vit(1)
        x = images(3, seed=1)
        keep = masks_for(["a", "b", "c"], 16, 0.75, 3)  # 4 of 16 patches, different per image
        with torch.no_grad():
            tokens = model._pos_embed(model.patch_embed(x))  # (B, 1 + N, D), timm's own embedding
            rows = [torch.cat([tokens[i, :1], tokens[i, 1 + keep[i]]]) for i in range(3)]
            ref = model.norm(model.blocks(model.norm_pre(torch.stack(rows))))[:, 0]
            got = visible_cls(model, x, keep)
        assert torch.allclose(got, ref, atol=1e-5)

    def test_masked_pixels_do_not_affect_the_feature(self, builtin_encoder) -> None:
        model, p = builtin_encoder.model, builtin_encoder.patch_size
        x = images(1, seed=2)
        keep = masks_for(["img"], 64, 0.5, 0)
        y = x.clone()
        hidden = sorted(set(range(64)) - set(keep[0].tolist()))
        for n in hidden:  # scribble over every masked patch
            r, c = divmod(n, 32 // p)
            y[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = 100.0
        with torch.no_grad():
            assert torch.allclose(visible_cls(model, x, keep), visible_cls(model, y, keep), atol=1e-6)
            # ... while a visible patch does
            z = x.clone()
            r, c = divmod(int(keep[0, 0]), 32 // p)
            z[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = 100.0
            assert not torch.allclose(visible_cls(model, x, keep), visible_cls(model, z, keep), atol=1e-3)

    @pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
    def test_blocks_process_one_plus_visible_tokens(self, builtin_encoder, ratio: float) -> None:
        model = builtin_encoder.model
        seen: list[tuple[int, ...]] = []
        handle = model.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
        try:
            keep = masks_for(["a", "b"], 64, ratio, 0)
            with torch.no_grad():
                visible_cls(model, images(2), keep)
        finally:
            handle.remove()
        assert seen == [(2, 1 + num_visible(64, ratio), 192)]


class TestHelpers:
    def test_patchify_is_row_major_with_channel_major_patches(self) -> None:
        x = images(2, size=8)
        p = 4
        out = patchify(x, p)
        assert out.shape == (2, 4, 3 * p * p)
        for b in range(2):
            for n in range(4):
                r, c = divmod(n, 2)
                assert torch.equal(out[b, n], x[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1))

    def test_encode_batches_equal_one_pass(self, builtin_encoder) -> None:
        x = images(5, seed=3)
        keep = masks_for([str(i) for i in range(5)], 64, 0.5, 0)
        with torch.no_grad():
            ref = visible_cls(builtin_encoder.model, x, keep)
        got = encode(builtin_encoder, x, keep, batch_size=2)
        assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-5)

    def test_encode_bf16_is_close_to_fp32(self, builtin_encoder) -> None:
        x = images(2, seed=4)
        keep = masks_for(["a", "b"], 64, 0.5, 0)
        fp32, bf16 = encode(builtin_encoder, x, keep), encode(builtin_encoder, x, keep, dtype="bf16")
        assert bf16.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
        assert torch.all(cos > 0.99)

    def test_encode_of_nothing_is_empty(self, builtin_encoder) -> None:
        out = encode(builtin_encoder, torch.empty(0, 3, 32, 32), torch.empty(0, 32, dtype=torch.long))
        assert out.shape == (0, 192)

    def test_normalize_paper_preset_maps_unit_interval_to_minus_one_one(self) -> None:
        x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
        out = normalize(x, "paper")
        assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
        im = normalize(torch.ones(1, 3, 1, 1), "imagenet")
        assert torch.allclose(im.flatten(), (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))

    def test_normalize_unknown_preset_raises_listing_choices(self) -> None:
        with pytest.raises(ValueError, match="paper"):
            normalize(torch.zeros(1, 3, 2, 2), "zscore")

    def test_load_image_reads_exact_pixels_and_resizes(self, tmp_path: Path, image_writer) -> None:
        import numpy as np
        from PIL import Image

        path = image_writer(tmp_path / "a.png", size=32, seed=5)
        ref = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
        assert torch.equal(load_image(path, 32), ref)
        big = load_image(image_writer(tmp_path / "b.png", size=48, seed=6), 32)
        assert big.shape == (3, 32, 32) and 0.0 <= float(big.min()) and float(big.max()) <= 1.0

    def test_load_image_returns_none_for_garbage(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"\x00garbage, not a jpeg")
        assert load_image(bad, 32) is None
        assert load_image(tmp_path / "missing.png", 32) is None


class TestBuiltin:
    def test_builtin_random_warns_that_weights_are_random(self) -> None:
        with pytest.warns(UserWarning, match="random weights"):
            enc = load_encoder("builtin-random", 32)
        assert (enc.patch_size, enc.num_patches, enc.dim, enc.image_size) == (4, 64, 192, 32)
        assert not enc.model.training
        assert not any(p.requires_grad for p in enc.model.parameters())

    def test_builtin_is_reproducible_and_leaves_global_rng_alone(self, builtin_encoder) -> None:
        torch.manual_seed(0)
        expected = torch.rand(2)
        torch.manual_seed(0)
        with pytest.warns(UserWarning):
            again = load_encoder("builtin-random", 32)
        assert torch.equal(torch.rand(2), expected)
        assert again.weights_sha == builtin_encoder.weights_sha

    def test_builtin_random_rejects_size_not_multiple_of_patch(self) -> None:
        with pytest.raises(ValueError, match="multiple"):
            load_encoder("builtin-random", 30)

    def test_builtin_loads_bundled_pretrained_weights_without_warning(self, builtin_encoder) -> None:
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("error")
            enc = load_encoder("builtin", 32)
        assert (enc.patch_size, enc.num_patches, enc.dim) == (4, 64, 192)
        assert enc.weights_sha != builtin_encoder.weights_sha  # not the random initialisation
        assert load_encoder("builtin", 32).weights_sha == enc.weights_sha

    def test_builtin_is_pretrained_at_32_only(self) -> None:
        with pytest.raises(ValueError, match="builtin-random"):
            load_encoder("builtin", 64)


def mae_style_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder keys plus the decoder and mask token of an official MAE pretraining checkpoint."""
    state = dict(model.state_dict())
    d = 16
    state.update(
        {
            "mask_token": torch.zeros(1, 1, d),
            "decoder_embed.weight": torch.zeros(d, 64),
            "decoder_embed.bias": torch.zeros(d),
            "decoder_pos_embed": torch.zeros(1, 17, d),
            "decoder_blocks.0.attn.qkv.weight": torch.zeros(3 * d, d),
            "decoder_norm.weight": torch.ones(d),
            "decoder_pred.weight": torch.zeros(8 * 8 * 3, d),
        }
    )
    return state


class TestCheckpoints:
    def test_save_then_load_keeps_weights_sha(self, builtin_encoder, tmp_path: Path) -> None:
        path = tmp_path / "builtin.pth"
        save_checkpoint(builtin_encoder.model, path)
        loaded = load_encoder(str(path), 32)
        assert loaded.weights_sha == builtin_encoder.weights_sha
        assert (loaded.patch_size, loaded.num_patches, loaded.dim) == (4, 64, 192)
        x = images(2)
        keep = masks_for(["a", "b"], 64, 0.5, 0)
        assert torch.allclose(encode(loaded, x, keep), encode(builtin_encoder, x, keep), atol=1e-6)

    def test_safetensors_without_metadata_loads_by_shape(self, builtin_encoder, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        path = tmp_path / "builtin.safetensors"
        save_file({k: v.contiguous() for k, v in builtin_encoder.model.state_dict().items()}, str(path))
        assert load_encoder(str(path), 32).weights_sha == builtin_encoder.weights_sha

    def test_official_mae_checkpoint_loads_without_decoder(self, tmp_path: Path) -> None:
        src = tiny_vit(2, embed_dim=64, num_heads=1)  # heads are inferred as dim // 64
        path = tmp_path / "mae_pretrain.pth"
        torch.save({"model": mae_style_state(src), "epoch": 799}, path)
        model = load_checkpoint(path)
        state = model.state_dict()
        assert not any(k.startswith(("decoder", "mask_token")) for k in state)
        assert state.keys() == src.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())
        assert load_encoder(str(path), 32).weights_sha == weights_digest(src)

    def test_distributed_module_prefix_is_stripped(self, tmp_path: Path) -> None:
        src = tiny_vit(3, embed_dim=64, num_heads=1)
        path = tmp_path / "ddp.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
        assert weights_digest(load_checkpoint(path)) == weights_digest(src)

    @pytest.mark.parametrize(
        "key",
        ["norm.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "blocks.1.attn.qkv.weight"],
    )
    def test_missing_encoder_key_raises_naming_it(self, tmp_path: Path, key: str) -> None:
        state = mae_style_state(tiny_vit(4, embed_dim=64, num_heads=1))
        del state[key]
        path = tmp_path / "broken.pth"
        torch.save({"model": state}, path)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            load_encoder(str(path), 32)

    def test_missing_key_in_fedsparse_checkpoint_raises_naming_it(self, builtin_encoder, tmp_path: Path) -> None:
        path = tmp_path / "b.pth"
        save_checkpoint(builtin_encoder.model, path)
        obj = torch.load(path, weights_only=True)
        del obj["model"]["blocks.5.norm2.bias"]
        torch.save(obj, path)
        with pytest.raises(ValueError, match=r"blocks\.5\.norm2\.bias"):
            load_encoder(str(path), 32)

    def test_misshaped_encoder_key_raises_naming_it(self, builtin_encoder, tmp_path: Path) -> None:
        path = tmp_path / "b.pth"
        save_checkpoint(builtin_encoder.model, path)
        obj = torch.load(path, weights_only=True)
        obj["model"]["blocks.2.attn.proj.bias"] = torch.zeros(7)
        torch.save(obj, path)
        with pytest.raises(ValueError, match=r"blocks\.2\.attn\.proj\.bias"):
            load_encoder(str(path), 32)

    def test_checkpoint_for_other_image_size_raises(self, builtin_encoder, tmp_path: Path) -> None:
        path = tmp_path / "b.pth"
        save_checkpoint(builtin_encoder.model, path)
        with pytest.raises(ValueError, match="image-size"):
            load_encoder(str(path), 64)

    def test_corrupt_checkpoint_raises_value_error(self, tmp_path: Path) -> None:
        path = tmp_path / "corrupt.pth"
        path.write_bytes(b"definitely not a checkpoint")
        with pytest.raises(ValueError, match="cannot read checkpoint"):
            load_encoder(str(path), 32)

    def test_unknown_encoder_name_raises(self) -> None:
        with pytest.raises(ValueError, match="no_such_encoder_xyz"):
            load_encoder("no_such_encoder_xyz", 32)

    def test_missing_checkpoint_path_raises_file_not_found(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_encoder(str(tmp_path / "absent.pth"), 32)
        with pytest.raises(FileNotFoundError):
            load_encoder(f"vit_tiny_patch16_224@{tmp_path / 'absent.pth'}", 224)


class TestTimmLocalWeights:
    def test_timm_name_at_local_file_loads_those_weights(self, tmp_path: Path) -> None:
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            src = timm.create_model("vit_tiny_patch16_224", num_classes=0)
        saved = src.state_dict()
        path = tmp_path / "vit_tiny.pth"
        torch.save(saved, path)
        enc = load_encoder(f"vit_tiny_patch16_224@{path}", 224)  # timm's pretrained code path, no network
        loaded = enc.model.state_dict()
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], v) for k, v in saved.items())
        assert (enc.patch_size, enc.num_patches, enc.dim) == (16, 196, 192)
        assert enc.weights_sha == weights_digest(src)

    def test_timm_name_with_wrong_weights_raises_value_error(self, tmp_path: Path) -> None:
        path = tmp_path / "wrong.pth"
        torch.save(tiny_vit().state_dict(), path)
        with pytest.raises(ValueError, match="cannot load weights"):
            load_encoder(f"vit_tiny_patch16_224@{path}", 224)


def test_weights_digest_changes_with_any_weight(builtin_encoder) -> None:
    other = copy.deepcopy(builtin_encoder.model)
    with torch.no_grad():
        other.blocks[3].mlp.fc2.bias[0] += 1e-3
    assert weights_digest(other) != builtin_encoder.weights_sha
    assert weights_digest(builtin_encoder.model) == builtin_encoder.weights_sha


def test_timm_name_at_random_builds_seeded_random_weights_without_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(UserWarning, match="random weights"):
        a = load_encoder("vit_tiny_patch16_224@random", 32)
    with pytest.warns(UserWarning):
        b = load_encoder("vit_tiny_patch16_224@random", 32)
    assert a.weights_sha == b.weights_sha and (a.dim, a.num_patches) == (192, 4)
