"""MAE pretraining (fedsparse.inputs.pretrain): augmentation, devices, checkpoints, resume, time budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fedsparse.inputs.encoder import load_encoder
from fedsparse.inputs.pretrain import MAE, PretrainConfig, augment, norm_pix_target, pretrain, random_keep, resolve_device

TINY = dict(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0.5, device="cpu")


def _images(n: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


class TestAugment:
    def test_equals_per_image_flip_and_crop(self) -> None:
        """The batched crop takes the same draws, in the same order, as a per-image loop."""
        batch = _images(9)
        got = augment(batch, torch.Generator().manual_seed(5))
        gen = torch.Generator().manual_seed(5)
        x = batch.float() / 255
        flip = torch.rand(len(x), generator=gen) < 0.5
        dx = torch.randint(0, 9, (len(x),), generator=gen)
        dy = torch.randint(0, 9, (len(x),), generator=gen)
        expected = []
        for i in range(len(x)):
            img = x[i].flip(-1) if flip[i] else x[i]
            padded = nn.functional.pad(img[None], (4, 4, 4, 4), mode="reflect")[0]
            expected.append(padded[:, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32])
        assert torch.equal(got, torch.stack(expected))
        assert flip.any() and not flip.all()  # both branches exercised by this seed

    def test_stays_in_unit_range(self) -> None:
        out = augment(_images(8), torch.Generator().manual_seed(0))
        assert out.dtype == torch.float32 and out.shape == (8, 3, 32, 32)
        assert 0 <= float(out.min()) and float(out.max()) <= 1


class TestDevice:
    def test_auto_is_cuda_only_when_visible(self) -> None:
        assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
        assert resolve_device("cpu") == "cpu"

    @pytest.mark.parametrize("name", ["tpu", "gpu0", "mps"])
    def test_unknown_device_is_one_line_error(self, name: str) -> None:
        with pytest.raises(ValueError, match=f"Unknown device '{name}'"):
            resolve_device(name)

    @pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
    def test_cuda_without_gpu_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")

    def test_unknown_dtype_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="Unknown pretraining dtype 'fp16'"):
            pretrain(_images(), tmp_path, PretrainConfig(**{**TINY, "dtype": "fp16"}), report=lambda s: None)


class TestLoss:
    def test_loss_counts_masked_patches_only(self) -> None:
        torch.manual_seed(0)
        model = MAE(32)
        x01 = torch.rand(2, 3, 32, 32)
        keep = random_keep(2, 64, 0.75, torch.Generator().manual_seed(0))
        target = norm_pix_target(x01, 4)
        base = model(x01, keep, target)
        changed = target.clone()
        changed.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, target.shape[-1]), 100.0)  # visible patches only
        assert torch.allclose(model(x01, keep, changed), base)
        changed[:, :, 0] += 1.0  # every patch, masked ones included
        assert not torch.allclose(model(x01, keep, changed), base)

    def test_bf16_autocast_trains_close_to_fp32(self, tmp_path: Path) -> None:
        hist = {}
        for dtype in ("fp32", "bf16"):
            pretrain(_images(), tmp_path / dtype, PretrainConfig(**{**TINY, "dtype": dtype}), report=lambda s: None)
            hist[dtype] = json.loads((tmp_path / dtype / "history.json").read_text())
        assert hist["fp32"][0]["loss"] == pytest.approx(hist["bf16"][0]["loss"], rel=0.05)
        assert hist["fp32"][0]["loss"] != hist["bf16"][0]["loss"]  # autocast really ran


class TestRun:
    def test_writes_loadable_encoder_and_learns(self, tmp_path: Path) -> None:
        images = _images(32)
        enc = pretrain(images, tmp_path, PretrainConfig(**{**TINY, "epochs": 6, "batch_size": 8, "lr": 2e-3}),
                       report=lambda s: None)
        history = json.loads((tmp_path / "history.json").read_text())
        assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
        assert history[-1]["loss"] < history[0]["loss"]
        loaded = load_encoder(str(enc), 32)
        assert loaded.dim == 192 and loaded.num_patches == 64
        assert all(v.dtype == torch.float16 for v in torch.load(enc, weights_only=True)["model"].values()
                   if v.is_floating_point())

    def test_resume_continues_where_it_stopped(self, tmp_path: Path) -> None:
        images = _images()
        full, split = tmp_path / "full", tmp_path / "split"
        pretrain(images, full, PretrainConfig(**{**TINY, "epochs": 3}), report=lambda s: None)
        pretrain(images, split, PretrainConfig(**{**TINY, "epochs": 3}), max_seconds=0.0, report=lambda s: None)
        assert len(json.loads((split / "history.json").read_text())) == 1  # stopped after epoch 1
        assert (split / "encoder.pth").is_file()  # the encoder so far
        lines: list[str] = []
        pretrain(images, split, PretrainConfig(**{**TINY, "epochs": 3}), resume=True, report=lines.append)
        assert lines[0].startswith("resumed from") and "epoch 1" in lines[0]
        a = json.loads((full / "history.json").read_text())
        b = json.loads((split / "history.json").read_text())
        assert [h["epoch"] for h in b] == [1, 2, 3]
        assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-4)  # same draws, same model

    @pytest.mark.parametrize(("every", "saves"), [(0.0, [1, 2, 3]), (1e9, [3])])
    def test_checkpoint_every_epoch_or_after_checkpoint_seconds_and_at_the_end(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: float, saves: list[int]
    ) -> None:
        import fedsparse.inputs.pretrain as mod

        seen: list[int] = []
        real = mod.atomic_torch_save
        monkeypatch.setattr(mod, "atomic_torch_save", lambda obj, path: (seen.append(obj["epoch"]), real(obj, path)))
        pretrain(_images(), tmp_path, PretrainConfig(**{**TINY, "epochs": 3}), checkpoint_seconds=every,
                 report=lambda s: None)
        assert seen == saves
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 3
