"""Server time of the default defence: IST's aggregation of one round with ``clip-factor`` 0
(off) and the default, on replies of the shape ``configs/scale.toml`` gives (a 768-1024-1024-10
head, 100 clients in 3 groups, label-aware), timed alternately in one process; prints the ratio.

    .venv/bin/python tools/defence_cost.py [--clients 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedsparse.algorithms.base import CLASS_COUNTS, ClientUpdate
from fedsparse.algorithms.ist import IST
from fedsparse.algorithms.robust import clip_updates
from fedsparse.config import RunConfig
from fedsparse.model.head import MLPHead


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = RunConfig(num_clients=1000, clients_per_round=args.clients, subnets_per_round=3, hidden="1024,1024")
    state = MLPHead(768, [1024, 1024], 10).state_dict()
    algos = {f: IST(base.replace(clip_factor=f)) for f in (0.0, base.clip_factor)}
    tasks = algos[0.0].plan(1, state, list(range(args.clients)))
    g = torch.Generator().manual_seed(0)
    updates = []
    for t in tasks:
        arrays = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in t.arrays.items()}
        arrays[CLASS_COUNTS] = torch.randint(0, 20, (10,), generator=g).float()
        updates.append(ClientUpdate(t.client, arrays, 50))
    times: dict[float, list[float]] = {f: [] for f in algos}
    for _ in range(args.repeats):
        for f, algo in algos.items():
            t0 = time.perf_counter()
            algo.aggregate(1, state, tasks, [ClientUpdate(u.client, u.arrays, u.num_examples) for u in updates])
            times[f].append(time.perf_counter() - t0)
    clip = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        clip_updates(tasks, [ClientUpdate(u.client, u.arrays, u.num_examples) for u in updates], base.clip_factor)
        clip.append(time.perf_counter() - t0)
    off, on = statistics.median(times[0.0]), statistics.median(times[base.clip_factor])
    print(f"clip_updates alone: {statistics.median(clip):.3f} s ({statistics.median(clip) / off:.1%} of the undefended aggregate)")
    print(f"IST aggregate, {args.clients} replies (scale.toml shapes), median of {args.repeats}: "
          f"clip-factor 0: {off:.3f} s, clip-factor {base.clip_factor:g}: {on:.3f} s, ratio {on / off:.2f}")


if __name__ == "__main__":
    main()
