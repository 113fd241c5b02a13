"""``fedsparse overhead CONFIG``: what the Flower Simulation Engine costs over a plain loop.

For each number of clients per round, the same IST rounds (same features, partitions,
batches and local steps) run three ways:

1. ``plain``: a PyTorch loop in one process (``fedsparse.plain``);
2. ``in-process``: Flower's strategy and ClientApp exchanging real Messages, no Ray
   (``strategies.measure.local_rounds``);
3. ``simulation``: the Flower Simulation Engine on Ray (``strategies.simulation``).

Every client's features are extracted into the cache before anything is timed, so the
rounds compare training and messaging only. The in-process engines run torch with
``client-cpus`` threads, as each simulated client does; the Simulation Engine runs
``cores / client-cpus`` clients side by side, so it may beat the plain loop. The first round is reported apart (Ray starts
its workers and each loads the encoder); the ratio uses the mean of the later rounds.
Writes ``overhead.json`` and ``overhead.md``.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from fedsparse.config import RunConfig
from fedsparse.plain import plain_rounds
from fedsparse.task import client_features, distinct_partitions


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads: a simulated client gets ``client-cpus`` of them,
    and on a busy machine more threads than cores make the small head's ops many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _later_mean(rounds: list[dict[str, Any]]) -> float:
    later = rounds[1:] or rounds
    return sum(r["seconds"] for r in later) / len(later)


def warm_cache(cfg: RunConfig, report: Callable[[str], None] = print) -> float:
    """Extract every client's features once (cache hits afterwards); returns seconds."""
    t0 = time.perf_counter()
    parts = distinct_partitions(cfg)
    for pid in range(parts):
        client_features(cfg, pid, cfg.num_clients)
        if (pid + 1) % max(1, parts // 10) == 0 or pid + 1 == parts:
            report(f"features of {pid + 1}/{parts} clients ready ({time.perf_counter() - t0:.0f}s)")
    return time.perf_counter() - t0


def overhead(
    cfg: RunConfig, out_dir: str | Path, clients_per_round: list[int], rounds: int,
    engines: tuple[str, ...] = ("plain", "in-process", "simulation"), report: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    from strategies.measure import local_rounds
    from strategies.simulation import simulate

    if rounds < 2:
        raise ValueError("--rounds must be >= 2: the first round is reported apart")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mask_mode == "random":
        raise ValueError("overhead needs cacheable features; use mask-mode per-image or shared")
    rows = []
    for k in clients_per_round:
        c = cfg.replace(clients_per_round=k, num_clients=max(cfg.num_clients, k), num_rounds=rounds,
                        out_dir=str(out / f"simulation-k{k}"))
        row: dict[str, Any] = {"clients_per_round": k, "num_clients": c.num_clients, "rounds": rounds,
                               "warm_cache_seconds": warm_cache(c, report)}
        for engine in engines:
            report(f"K={k}: {engine}")
            if engine in ("plain", "in-process"):
                with torch_threads(max(1, int(c.client_cpus))):  # as many as each simulated client gets
                    result = (plain_rounds if engine == "plain" else local_rounds)(c, report=report)
            elif engine == "simulation":
                result = simulate(c)
                row["simulation_peak_summed_rss_bytes"] = result.get("memory", {}).get("peak_summed_rss_bytes")
            else:
                raise ValueError(f"Unknown engine {engine!r}; valid: plain, in-process, simulation")
            rs = result["rounds"]
            row[f"{engine}_first_round_seconds"] = rs[0]["seconds"]
            row[f"{engine}_later_round_seconds"] = _later_mean(rs)
            row[f"{engine}_final_accuracy"] = rs[-1]["accuracy"]
        if "plain" in engines:
            for engine in engines:
                row[f"{engine}_vs_plain"] = row[f"{engine}_later_round_seconds"] / row["plain_later_round_seconds"]
        rows.append(row)
        report(f"K={k}: " + ", ".join(f"{e} {row[f'{e}_later_round_seconds']:.2f}s/round" for e in engines))
        (out / "overhead.json").write_text(json.dumps({"config": cfg.to_run_config(), "rows": rows}, indent=1))
        (out / "overhead.md").write_text(markdown(rows, engines))
    return rows


def markdown(rows: list[dict[str, Any]], engines: tuple[str, ...]) -> str:
    head = ["clients per round"] + [f"{e} s/round (first)" for e in engines] + [f"{e} s/round (later)" for e in engines]
    if "plain" in engines:
        head += [f"{e} / plain" for e in engines if e != "plain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["clients_per_round"])]
        cells += [f"{r[f'{e}_first_round_seconds']:.2f}" for e in engines]
        cells += [f"{r[f'{e}_later_round_seconds']:.2f}" for e in engines]
        if "plain" in engines:
            cells += [f"{r[f'{e}_vs_plain']:.2f}x" for e in engines if e != "plain"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
