"""bf16 against fp32 for the visible-patch encoder: speed and agreement, measured in one run.

    python benchmarks/encoder_dtype.py [--encoder vit_base_patch16_224] [--image-size 224]
                                       [--mask-ratio 0.75] [--images 32]

Random weights by default (``timm.create_model(name, pretrained=False)``): speed does not
depend on the weights. Prints images/s for fp32 and bf16 (CPU autocast), their ratio, and the
mean cosine similarity of the CLS vectors.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from fedsparse.encoder import Encoder, encode, weights_digest
from fedsparse.masking import masks_for


def timed(encoder: Encoder, x: torch.Tensor, keep: torch.Tensor, dtype: str, repeats: int = 2) -> tuple[float, torch.Tensor]:
    encode(encoder, x[:2], keep[:2], dtype)  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = encode(encoder, x, keep, dtype, batch_size=16)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="vit_base_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--images", type=int, default=32)
    args = ap.parse_args()
    model = timm.create_model(args.encoder, pretrained=False, num_classes=0, img_size=args.image_size).eval()
    pe = model.patch_embed
    enc = Encoder(model, args.encoder, weights_digest(model), args.image_size, int(pe.patch_size[0]), int(pe.num_patches), model.embed_dim)
    torch.manual_seed(0)
    x = torch.randn(args.images, 3, args.image_size, args.image_size)
    keep = masks_for([str(i) for i in range(args.images)], enc.num_patches, args.mask_ratio, 1234)
    fp32_rate, fp32 = timed(enc, x, keep, "fp32")
    bf16_rate, bf16 = timed(enc, x, keep, "bf16")
    cos = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1).mean().item()
    print(f"{args.encoder} at {args.image_size}px, mask ratio {args.mask_ratio}, {args.images} images, "
          f"{torch.get_num_threads()} threads")
    print(f"fp32 {fp32_rate:.1f} img/s, bf16 {bf16_rate:.1f} img/s, speed-up {bf16_rate / fp32_rate:.2f}x, "
          f"mean cosine(fp32, bf16) {cos:.5f}")


if __name__ == "__main__":
    main()
