"""IST with and without width scaling on one config, in the Flower-free plain driver.

    .venv/bin/python tools/ist_scaling.py configs/cifar10-offline.toml "mask-ratio=0.5"

Runs the ``RoundEngine`` over a ``PlainTransport`` (every client in this process, no Flower:
the reference the tests check the Flower drivers against) once per ``ist-scaling``, each
into ``<out-dir>/ist-scaling-<value>``, and prints best and final test accuracy. One
thread, so that it can share the machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fedsparse.config import parse_overrides, resolve
from fedsparse.engine.plain import PlainTransport
from fedsparse.engine.rounds import RoundEngine


def main() -> None:
    torch.set_num_threads(1)
    config = sys.argv[1] if len(sys.argv) > 1 else "configs/cifar10-offline.toml"
    overrides = parse_overrides(sys.argv[2]) if len(sys.argv) > 2 else {}
    for scaling in ("none", "width"):
        t0 = time.perf_counter()
        cfg = resolve(config, {**overrides, "ist-scaling": scaling, "resume": False})
        cfg = cfg.replace(out_dir=str(Path(cfg.out_dir) / f"ist-scaling-{scaling}"))
        metrics = RoundEngine(cfg, report=lambda _: None).run(PlainTransport(cfg))
        print(f"ist-scaling={scaling}: final {metrics.final_accuracy:.4f}, best {metrics.best_accuracy:.4f}, "
              f"{len(metrics.rounds)} rounds, {time.perf_counter() - t0:.0f} s -> {cfg.out_dir}", flush=True)


if __name__ == "__main__":
    main()
