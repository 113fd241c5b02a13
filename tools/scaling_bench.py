"""How a simulated round's cost grows with the clients per round, on one Ray node and on a
two-node Ray cluster on the same machine (docs/benchmarks/scaling.md).

    python tools/scaling_bench.py configs/scale.toml --ks 10,100,1000 --num-clients 1000 --rounds 3 \\
        --run-config "data-dir='/path/cifar10' cache-dir='/path/cache'" --out runs/scaling

For each K (clients per round) and layout, one ``fedsparse run`` in a fresh process:

- ``one-node``: ``ray-address='local'``, Ray started by the run with this machine's cores;
- ``two-node``: attached (``RAY_ADDRESS``) to a cluster of two ``ray start`` nodes on this
  machine with half the cores each (``strategies.local_cluster``): the same total CPUs. The
  cluster is started once, before the first two-node run, and stopped at the end.

Per run: seconds per round (first round apart: Ray's workers start, each new client is asked
who it is and loads its features), split into the server's CPU seconds (the driver process:
server, Flower's runtime, Ray's driver; ``RoundMetrics.server_cpu_seconds``) and the clients'
seconds (extracting and training, summed over the round's clients); the driver's peak RSS,
the client processes' peaks summed (``ray_nodes``), and the peak of the RSS summed over every
process of the run (the driver's tree, and the cluster's node processes for two-node), sampled
every second. Writes ``scaling.json``, ``scaling.csv`` and ``scaling.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsparse.accounting.memory import tree_sample  # noqa: E402
from strategies.local_cluster import LocalCluster  # noqa: E402


class SummedRss:
    """Peak of the RSS summed over the process trees of ``roots()``, sampled every ``interval`` s."""

    def __init__(self, roots, interval: float = 1.0) -> None:
        self.roots, self.interval, self.peak = roots, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for root in self.roots():
                try:
                    total += tree_sample(root, 0.0, pss=False).rss
                except Exception:  # noqa: BLE001 - a process that just exited
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "SummedRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_run(config: str, overrides: str, k: int, num_clients: int, rounds: int, out: Path, layout: str,
            cluster: LocalCluster | None) -> dict:
    run_config = f"{overrides} clients-per-round={k} num-clients={num_clients} num-rounds={rounds} save-seconds=30"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    if cluster is None:
        run_config += " ray-address='local'"
    else:
        env["RAY_ADDRESS"] = cluster.address
    cmd = [sys.executable, "-m", "fedsparse.commands.cli", "run", config, "--run-config", run_config, "--out", str(out)]
    print(f"[{layout}, K={k}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        roots = (lambda: [proc.pid] + [p.pid for p in cluster.procs]) if cluster else (lambda: [proc.pid])
        with SummedRss(roots) as rss:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{layout} K={k}: fedsparse run exited with {rc}; see {out}.log")
    m = json.loads((out / "metrics.json").read_text())
    rs = m["rounds"]
    later = rs[1:] or rs
    return {
        "layout": layout, "clients_per_round": k, "num_clients": num_clients, "rounds": len(rs),
        "first_round_seconds": rs[0]["seconds"],
        "round_seconds": mean(r["seconds"] for r in later),
        "server_cpu_seconds": mean(r["server_cpu_seconds"] for r in later),
        "client_seconds_sum": mean(r["client_seconds_sum"] or 0.0 for r in later),
        "driver_peak_rss_bytes": m["driver_peak_rss_bytes"],
        "client_processes": sum(n["workers"] for n in m["ray_nodes"]),
        "client_processes_peak_rss_bytes": sum(n["peak_rss_bytes_sum"] for n in m["ray_nodes"]),
        "summed_peak_rss_bytes": rss.peak,
        "nodes_used": len(m["ray_nodes"]),
        "tasks_per_node": [n["tasks"] for n in m["ray_nodes"]],
        "cross_node_arrays": m.get("cross_node_arrays"),
        "final_accuracy": next((r["accuracy"] for r in reversed(rs) if r["accuracy"] is not None), None),
        "wall_seconds": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--ks", default="10,100,1000", help="clients per round")
    ap.add_argument("--num-clients", default="10x", help="a number, or Nx: N times the clients per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layouts", default="one-node,two-node")
    ap.add_argument("--run-config", default="", help="more overrides, as for fedsparse run")
    ap.add_argument("--out", default="runs/scaling")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the cluster it started (finally)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    layouts = args.layouts.split(",")
    cores = os.cpu_count() or 1
    rows: list[dict] = []
    cluster = None
    try:
        for layout in layouts:
            if layout == "two-node":
                cluster = LocalCluster(PYTHONPATH=str(ROOT))
                cluster.start_head(cpus=cores / 2)
                cluster.add_worker(cpus=cores / 2)
            for k in ks:
                n = k * int(args.num_clients[:-1]) if args.num_clients.endswith("x") else int(args.num_clients)
                rows.append(one_run(args.config, args.run_config, k, n, args.rounds, out / f"{layout}-k{k}", layout,
                                    cluster))
                print(json.dumps(rows[-1]), flush=True)
                (out / "scaling.json").write_text(json.dumps({"machine_cores": cores, "rows": rows}, indent=1))
            if cluster is not None:
                cluster.stop()
                cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
    with open(out / "scaling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k not in ("tasks_per_node", "cross_node_arrays")])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames})
    (out / "scaling.md").write_text(table(rows))
    plot(rows, out / "scaling.png")
    print(table(rows))
    return 0


def plot(rows: list[dict], path: Path) -> Path:
    """Seconds per round (later rounds) and the server's CPU seconds per round against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for layout, style in (("one-node", "o-"), ("two-node", "s--")):
        mine = sorted((r for r in rows if r["layout"] == layout), key=lambda r: r["clients_per_round"])
        if not mine:
            continue
        ks = [r["clients_per_round"] for r in mine]
        left.plot(ks, [r["round_seconds"] for r in mine], style, label=layout)
        right.plot(ks, [r["server_cpu_seconds"] for r in mine], style, label=layout)
    for ax, title in ((left, "seconds per round"), (right, "server CPU seconds per round")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients per round")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> str:
    gb = 1e9
    lines = ["| layout | clients per round | num-clients | s per round (first) | s per round (later) | server CPU s "
             "per round | clients' s per round (summed) | driver peak RSS | client processes' peak RSS (summed) | "
             "all processes' summed peak RSS | nodes (tasks each) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['clients_per_round']:,} | {r['num_clients']:,} | "
                     f"{r['first_round_seconds']:.1f} | {r['round_seconds']:.2f} | {r['server_cpu_seconds']:.2f} | "
                     f"{r['client_seconds_sum']:.2f} | {r['driver_peak_rss_bytes'] / gb:.2f} GB | "
                     f"{r['client_processes_peak_rss_bytes'] / gb:.2f} GB ({r['client_processes']}) | "
                     f"{r['summed_peak_rss_bytes'] / gb:.2f} GB | {r['nodes_used']} "
                     f"({', '.join(str(t) for t in r['tasks_per_node'])}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
