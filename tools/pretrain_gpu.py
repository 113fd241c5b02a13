"""Pretrain the built-in encoder on a GPU, images decoded straight from the archive (how `builtin` was made).

``fedsparse pretrain`` extracts an archive into the cache and reads 50,000 small files back.
On the lent GPU machine a run that went through that step printed nothing in 10 minutes
(cause not established; the sandboxed file system is the suspect). This script decodes every
image of a ``.tar.gz`` in memory instead (50,000 CIFAR-10 JPEGs in 7 s there) and runs the same ``fedsparse.inputs.pretrain.pretrain`` on the GPU. With no
``--epochs`` it sizes the run to a time budget: it trains 2 epochs on 16,384 images,
times the second, and takes the number of epochs that fills 90% of what is left
(warm-up: 5% of them, at least 1 epoch).

The shipped ``builtin`` encoder (README "Encoders") came from two runs on one H200:

    python tools/pretrain_gpu.py ../shared/data/cifar10/cifar10-train-jpg.tar.gz --out /tmp/q --budget-seconds 140
    #   -> calibration 28,205 img/s: 64 epochs, warm-up 3.2 epochs, 106 s of training
    python tools/pretrain_gpu.py ../shared/data/cifar10/cifar10-train-jpg.tar.gz --out /tmp/q \\
        --epochs 100 --warmup-epochs 5 --resume --max-seconds 62
    #   -> resumed at epoch 64 on a 100-epoch cosine, stopped by the budget after epoch 98
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsparse.inputs.pretrain import PretrainConfig, load_images, pretrain  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def decode_archive(path: str, size: int = 32) -> torch.Tensor:
    """Every image of a tar archive, in member order, as uint8 [N, 3, size, size] (unreadable ones skipped)."""
    with tarfile.open(path) as tar:
        blobs = [io.BytesIO(tar.extractfile(m).read()) for m in tar
                 if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)]
    return load_images(blobs, size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", help=".tar.gz of images (every image in it is used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--epochs", type=int, default=0, help="0: size the run to --budget-seconds")
    ap.add_argument("--warmup-epochs", type=float, default=0.0, help="0: 5%% of the epochs, at least 1")
    ap.add_argument("--budget-seconds", type=float, default=140.0, help="decoding, calibration and training")
    ap.add_argument("--max-seconds", type=float, default=0.0, help="stop after the epoch that passes this (0: none)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    images = decode_archive(args.archive)
    print(f"{len(images)} images decoded in {time.perf_counter() - t0:.1f} s", flush=True)
    epochs = args.epochs
    if not epochs:
        calib = images[:16384]
        pretrain(calib, Path(args.out) / "calibration", PretrainConfig(epochs=2, batch_size=args.batch_size, device=args.device),
                 report=lambda s: None)
        seconds = json.loads((Path(args.out) / "calibration" / "history.json").read_text())[-1]["seconds"]
        rate = len(calib) // args.batch_size * args.batch_size / seconds
        left = args.budget_seconds - (time.perf_counter() - t0)
        epochs = max(1, int(0.9 * left * rate / len(images)))
        print(f"calibration: {rate:.0f} img/s -> {epochs} epochs", flush=True)
    cfg = PretrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                         warmup_epochs=args.warmup_epochs or max(1.0, 0.05 * epochs))
    pretrain(images, args.out, cfg, resume=args.resume, max_seconds=args.max_seconds or None,
             report=lambda s: print(s, flush=True) if "step 50/" not in s else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
