"""IST with and without width scaling on one config, in the Flower-free plain loop.

    .venv/bin/python tools/ist_scaling.py configs/cifar10-offline.toml "mask-ratio=0.5"

Runs ``fedsparse.plain.plain_rounds`` (the reference loop the tests check against in-process
Flower) once per ``ist-scaling`` and prints best and final test accuracy. One thread, so that it
can share the machine.
"""

from __future__ import annotations

import sys
import time

import torch

from fedsparse.config import parse_overrides, resolve
from fedsparse.plain import plain_rounds


def main() -> None:
    torch.set_num_threads(1)
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/cifar10-offline.toml"
    overrides = parse_overrides(sys.argv[2]) if len(sys.argv) > 2 else {}
    for scaling in ("none", "width"):
        t0 = time.perf_counter()
        rounds = plain_rounds(resolve(config, {**overrides, "ist-scaling": scaling}), report=lambda _: None)["rounds"]
        acc = [r["accuracy"] for r in rounds]
        print(f"ist-scaling={scaling}: final {acc[-1]:.4f}, best {max(acc):.4f}, "
              f"{len(acc)} rounds, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
