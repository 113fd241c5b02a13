"""Masked-autoencoder pretraining of a small ViT on a local image folder (``fedsparse pretrain``).

MAE (He et al., 2022) with the encoder running on the visible patches through the same
``visible_tokens`` forward that feature extraction uses: 75% of the patches are masked at
random per image and step, a light decoder (``DECODER`` below) reconstructs the masked
patches from the encoded visible ones plus mask tokens, and the loss is the mean squared
error on the masked patches of per-patch normalised pixels (``norm_pix_loss``). AdamW with
linear warm-up and cosine decay, flips and padded random crops as augmentation.

It runs on the CPU or a GPU (``device``; ``dtype = "bf16"`` trains under autocast). The
random draws (epoch order, flips, crops, masks) come from one CPU generator whatever the
device, so a run is the same sequence of batches on either and resumes anywhere.

Training writes ``<out>/checkpoint.pt`` (everything needed to resume) at the end of an epoch
once ``checkpoint_seconds`` have passed since the last one (every epoch on a CPU, where an
epoch takes minutes; about once a minute on a GPU) and at the end, ``<out>/history.json``
every epoch, and ``<out>/encoder.pth`` (encoder only, fp16, loadable with ``encoder = <path>``)
at the end. ``--resume`` continues from ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import torch
from torch import nn

from fedsparse.inputs.encoder import BUILTIN_ARCH, _vit, load_image, normalize, patchify, save_checkpoint, visible_tokens
from fedsparse.inputs.features import atomic_torch_save

log = logging.getLogger("fedsparse")

DECODER = {"dim": 128, "depth": 2, "num_heads": 4}


@dataclass
class PretrainConfig:
    """Hyper-parameters of one pretraining run (stored in the checkpoint)."""

    image_size: int = 32
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1.5e-3  # peak, after warm-up
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    mask_ratio: float = 0.75
    preprocessing: str = "paper"
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"; resolve_device("auto") picks one
    dtype: str = "fp32"  # "bf16": forward under autocast (weights and optimizer stay fp32)


DTYPES = ("fp32", "bf16")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other names are checked."""
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"Unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
    return name


def sincos_pos_embed(dim: int, side: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE ``get_2d_sincos_pos_embed``): [side*side, dim]."""
    assert dim % 4 == 0, "sin-cos embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    parts = []
    for grid in (ys.reshape(-1), xs.reshape(-1)):
        out = grid[:, None] * omega[None]  # (N, D/4)
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, 1).float()


class MAE(nn.Module):
    """A ViT encoder (timm) plus a light MAE decoder."""

    def __init__(self, image_size: int = 32, arch: dict | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        arch = dict(arch or BUILTIN_ARCH)
        self.encoder = _vit(image_size, **arch)
        self.patch_size = int(arch["patch_size"])
        side = image_size // self.patch_size
        self.num_patches = side * side
        d = DECODER["dim"]
        self.decoder_embed = nn.Linear(int(arch["embed_dim"]), d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos", sincos_pos_embed(d, side).unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(d, DECODER["num_heads"], 4.0) for _ in range(DECODER["depth"])])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred = nn.Linear(d, self.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():  # the encoder starts from fixed sin-cos positions, as in MAE
            enc_pos = sincos_pos_embed(int(arch["embed_dim"]), side)
            self.encoder.pos_embed[:, 1:] = enc_pos
            self.encoder.pos_embed[:, :1] = 0

    def forward(self, images: torch.Tensor, keep: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one batch. images: [B,3,H,W] normalised; keep: [B,n] visible ids; target: [B,N,p*p*3]."""
        b, n = keep.shape
        tokens = visible_tokens(self.encoder, images, keep)  # (B, 1+n, D)
        x = self.decoder_embed(tokens)
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])  # visible back in place
        full = full + self.decoder_pos
        y = self.decoder_blocks(torch.cat([x[:, :1], full], 1))
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, N, p*p*3)
        masked = torch.ones(b, self.num_patches, dtype=torch.bool, device=keep.device)
        masked.scatter_(1, keep, False)
        err = ((pred.float() - target) ** 2).mean(-1)
        return (err * masked).sum() / masked.sum()


def norm_pix_target(images01: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalised pixels (MAE ``norm_pix_loss``): [B, N, p*p*3]."""
    t = patchify(images01, patch_size)
    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    return (t - mean) / (var + 1e-6).sqrt()


def load_images(
    paths: Sequence[Path | BinaryIO], image_size: int, progress: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Decode images (files, or file objects holding their bytes) into one uint8 tensor [N, 3, S, S];
    unreadable ones are skipped."""
    out = []
    for i, p in enumerate(paths):
        img = load_image(p, image_size)
        if img is not None:
            out.append((img * 255).round().to(torch.uint8))
        if progress and (i + 1) % 5000 == 0:
            progress(i + 1, len(paths))
    if not out:
        raise ValueError("no readable images to pretrain on")
    return torch.stack(out)


def augment(batch: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flips and padded random crops on a uint8 batch [B,3,S,S] -> float in [0,1].

    The draws come from ``gen`` (a CPU generator); the pixels stay on ``batch``'s device.
    """
    b, s = len(batch), batch.shape[-1]
    flip = (torch.rand(b, generator=gen) < 0.5).to(batch.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(batch.device)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(batch.device)
    x = batch.float().div_(255)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")  # (B, 3, S+2p, S+2p)
    ar = torch.arange(s, device=batch.device)
    rows = (dy[:, None] + ar)[:, None, :, None]  # (B, 1, S, 1)
    cols = (dx[:, None] + ar)[:, None, None, :]  # (B, 1, 1, S)
    return padded[torch.arange(b, device=batch.device)[:, None, None, None], torch.arange(3, device=batch.device)[None, :, None, None], rows, cols]


def random_keep(b: int, n: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Fresh random visible-patch ids per image (training masks are not fixed): [B, n_keep], on the CPU."""
    keep = max(1, int(n * (1 - ratio)))
    return torch.rand(b, n, generator=gen).argsort(1)[:, :keep].sort(1).values


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    images: torch.Tensor,
    out_dir: str | Path,
    cfg: PretrainConfig,
    resume: bool = False,
    max_seconds: float | None = None,
    report: Callable[[str], None] = print,
    checkpoint_seconds: float = 60.0,
) -> Path:
    """Train, checkpointing each epoch; returns the path of the encoder checkpoint.

    Args:
        images: uint8 [N, 3, S, S] training images (moved to ``cfg.device`` once).
        max_seconds: stop after the epoch that passes this much wall time, writing
            ``checkpoint.pt`` and the encoder so far; ``--resume`` continues.
        checkpoint_seconds: least time between two ``checkpoint.pt`` writes (epoch ends only).
    """
    if cfg.dtype not in DTYPES:
        raise ValueError(f"Unknown pretraining dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    device = torch.device(resolve_device(cfg.device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = MAE(cfg.image_size).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU: the same draws on every device
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    start_epoch, history = 0, []
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, history = state["epoch"], state["history"]
        report(f"resumed from {ckpt} at epoch {start_epoch}")
    images = images.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    t0 = last_ckpt = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen).to(device)
        loss_sum, window, te = torch.zeros((), device=device), torch.zeros((), device=device), time.perf_counter()
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, warmup, cfg.lr)
            x01 = augment(images[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]], gen)
            keep = random_keep(len(x01), model.num_patches, cfg.mask_ratio, gen).to(device)
            with autocast:
                loss = model(normalize(x01, cfg.preprocessing), keep, norm_pix_target(x01, model.patch_size))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()  # summed on the device: no host sync per step
            window += loss.detach()
            if (i + 1) % 50 == 0 or i + 1 == steps_per_epoch:
                n = (i % 50) + 1
                rate = (i + 1) * cfg.batch_size / (time.perf_counter() - te)
                report(f"epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{steps_per_epoch} "
                       f"loss {float(window) / n:.4f} ({rate:.0f} img/s)")
                window.zero_()
        history.append({"epoch": epoch + 1, "loss": float(loss_sum) / steps_per_epoch, "seconds": time.perf_counter() - te})
        (out / "history.json").write_text(json.dumps(history, indent=1))
        stop = max_seconds is not None and time.perf_counter() - t0 > max_seconds and epoch + 1 < cfg.epochs
        if stop or epoch + 1 == cfg.epochs or time.perf_counter() - last_ckpt >= checkpoint_seconds:
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                               "epoch": epoch + 1, "history": history, "config": asdict(cfg)}, ckpt)
            last_ckpt = time.perf_counter()
        if stop:
            report(f"stopping after epoch {epoch + 1} of {cfg.epochs} (time budget); continue with --resume")
            break
    enc_path = out / "encoder.pth"
    save_checkpoint(model.encoder, enc_path, half=True)
    report(f"wrote {enc_path} ({enc_path.stat().st_size / 1e6:.1f} MB) after epoch {len(history)} of {cfg.epochs}")
    return enc_path
