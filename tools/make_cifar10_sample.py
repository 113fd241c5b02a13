"""Cut the bundled CIFAR-10 sample (fedsparse/assets/cifar10-sample.tar.gz).

Picks, per class and with a fixed seed, TRAIN_PER_CLASS images of the training split and
TEST_PER_CLASS of the test split from the CIFAR-10 JPEG archives, and writes them unchanged
(same JPEG bytes, same relative paths) into a reproducible .tar.gz.

    python tools/make_cifar10_sample.py ../shared/data/cifar10 fedsparse/assets/cifar10-sample.tar.gz
"""

from __future__ import annotations

import gzip
import io
import random
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
SEED = 0


def pick(archive: Path, per_class: int) -> list[tuple[str, bytes]]:
    by_class: dict[str, list[tarfile.TarInfo]] = defaultdict(list)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for m in members:
            by_class[Path(m.name).parts[-2]].append(m)
        rng = random.Random(SEED)
        out = []
        for cls in sorted(by_class):
            chosen = rng.sample(sorted(by_class[cls], key=lambda m: m.name), per_class)
            for m in sorted(chosen, key=lambda m: m.name):
                out.append((m.name.lstrip("./"), tar.extractfile(m).read()))
    return out


def main(src: str, dst: str) -> None:
    src_dir = Path(src)
    files = pick(src_dir / "cifar10-train-jpg.tar.gz", TRAIN_PER_CLASS)
    files += pick(src_dir / "cifar10-test-jpg.tar.gz", TEST_PER_CLASS)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    with gzip.GzipFile(dst, "wb", mtime=0) as gz:
        gz.write(buf.getvalue())
    print(f"wrote {dst}: {len(files)} images, {Path(dst).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
