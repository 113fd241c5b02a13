"""``fedsparse overhead CONFIG``: what the Flower Simulation Engine costs over a plain loop.

For each number of clients per round, the same IST rounds (same features, partitions,
batches and local steps, the same ``RoundEngine``) run through three drivers:

1. ``plain``: every client in this process, no Flower (``fedsparse.engine.plain``);
2. ``in-process``: the Strategy adapter and the ClientApp exchanging real Messages, no Ray
   (``strategies.in_process.in_process_run``);
3. ``simulation``: the Flower Simulation Engine on Ray (``strategies.simulation.simulate``);
4. ``reference``: a bare-PyTorch IST trainer with one process (one thread) per worker, the K
   workers training at the same time (``fedsparse.commands.reference``); its final model is
   checked to be the engine's, so both time the same work.

Every client's features are extracted into the cache before anything is timed, so the
rounds compare training and messaging only. The in-process drivers run torch with
``client-cpus`` threads, as each simulated client does; the Simulation Engine runs
``cores / client-cpus`` clients side by side, so it may beat the plain loop. The time of a
round is ``RunMetrics.rounds[i].seconds`` (from planning to the written checkpoint). The
first round is reported apart (Ray starts its workers and each loads the encoder); the
ratio uses the mean of the later rounds. Each driver writes its run to its own folder
(``<engine>-k<K>``). Writes ``overhead.json`` and ``overhead.md``.

A round's time is the wall time from one round's end to the next's (``RoundMetrics.elapsed``),
so it includes what the engine does between rounds (queueing the round's files for the
background writer, the progress line, asking for the next clients), not only
``RoundMetrics.seconds``. ``repeats`` > 1 runs every driver that many times, in alternating
order (forwards, then backwards, ...), so that drivers compared are timed minutes apart at
most on a machine whose speed drifts: a driver's time is the median over its repeats, and
its ratio to another the median of the ratios within each repeat.

Every driver runs the same ``train_slice``, and every one reports how long its slowest client
trained in each round (``RoundMetrics.client_train_seconds_max``; the reference's workers
time the same call). The rest of the round (``*_later_rest_seconds``: planning, slicing,
messages, aggregation, bookkeeping) is what the driver adds; it does not move with how fast
the machine happened to train during that driver's turn, which the round's ratio does. In the
plain loop it includes the other clients' training (they train one after the other).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch

from fedsparse.commands.drivers import DRIVERS, run_with_engine
from fedsparse.commands.reference import reference_rounds, supports as reference_supports
from fedsparse.config import RunConfig
from fedsparse.engine.client import torch_threads
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.task import client_features, distinct_partitions

ENGINES = ("plain", "in-process", "simulation", "reference")  # fedsparse.commands.drivers' DRIVERS + the reference
assert set(ENGINES) == {*DRIVERS, "reference"}


def round_walls(rounds: list[RoundMetrics]) -> list[float]:
    """Wall seconds of each round: the first's ``seconds``, then the time between round ends."""
    if not rounds:
        return []
    return [rounds[0].seconds] + [b.elapsed - a.elapsed for a, b in zip(rounds, rounds[1:])]


def _later_mean(seconds: list[float]) -> float:
    later = seconds[1:] or seconds
    return sum(later) / len(later)


def run_engine(cfg: RunConfig, engine: str, report: Callable[[str], None] = print) -> RunMetrics:
    """``cfg`` on one of ``DRIVERS``; the in-process drivers with ``client-cpus`` torch threads."""
    if engine == "simulation":
        return run_with_engine(cfg, engine)
    with torch_threads(max(1, int(cfg.client_cpus))):  # as many as each simulated client gets
        return run_with_engine(cfg, engine, report)


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
    engines: tuple[str, ...] = ENGINES, report: Callable[[str], None] = print, repeats: int = 1,
) -> list[dict[str, Any]]:
    """Time ``rounds`` rounds at each K on each engine, ``repeats`` times; write overhead.json
    and overhead.md; return the rows."""
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"Unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    if rounds < 2:
        raise ValueError(f"num-rounds must be >= 2: the first round is reported apart, got {rounds}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    if "reference" in engines and not reference_supports(cfg):
        report("the bare-PyTorch reference runs only the authors' pure IST (ist-variant = authors, "
               "one subnet per client); leaving it out")
        engines = tuple(e for e in engines if e != "reference")
    if cfg.mask_mode == "random":
        raise ValueError("overhead needs cacheable features; use mask-mode per-image or shared")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in clients_per_round:
        c = cfg.replace(clients_per_round=k, num_clients=max(cfg.num_clients, k), num_rounds=rounds,
                        resume=False)
        row: dict[str, Any] = {"clients_per_round": k, "num_clients": c.num_clients, "rounds": rounds,
                               "repeats": repeats, "warm_cache_seconds": warm_cache(c, report)}
        later: dict[str, list[float]] = {e: [] for e in engines}
        training: dict[str, list[float]] = {e: [] for e in engines}
        for rep in range(repeats):
            for engine in (engines if rep % 2 == 0 else engines[::-1]):
                report(f"K={k}: {engine}" + (f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""))
                if engine == "reference":
                    ref = reference_rounds(c)
                    seconds, accuracy, workers = ref["seconds"], ref["accuracy"], ref["workers"]
                    train = ref["train_seconds"]
                    reference_state = ref["state"]
                    row["reference_workers"] = workers
                else:
                    result = run_engine(c.replace(out_dir=str(out / f"{engine}-k{k}")), engine, report)
                    if len(result.rounds) < rounds:
                        raise RuntimeError(f"{engine} finished {len(result.rounds)} of {rounds} rounds at K={k}")
                    if engine == "simulation":
                        row["simulation_peak_summed_rss_bytes"] = result.memory.get("peak_summed_rss_bytes")
                    seconds, accuracy = round_walls(result.rounds), result.final_accuracy
                    train = [r.client_train_seconds_max or 0.0 for r in result.rounds]
                later[engine].append(_later_mean(seconds))
                training[engine].append(_later_mean(train))
                if rep == 0:
                    row[f"{engine}_first_round_seconds"] = seconds[0]
                    row[f"{engine}_final_accuracy"] = accuracy
                elif accuracy != row[f"{engine}_final_accuracy"]:
                    raise RuntimeError(f"{engine} ended at accuracy {accuracy} in repeat {rep + 1}, "
                                       f"{row[f'{engine}_final_accuracy']} in the first: not the same work")
        for engine in engines:
            row[f"{engine}_later_round_seconds"] = median(later[engine])
            row[f"{engine}_later_round_seconds_runs"] = later[engine]
            # the slowest client's training (the same train_slice in every driver), and the rest
            # of the round: what the driver adds, apart from how fast the machine trained
            row[f"{engine}_later_train_seconds"] = median(training[engine])
            row[f"{engine}_later_train_seconds_runs"] = training[engine]
            row[f"{engine}_later_rest_seconds"] = median([a - b for a, b in zip(later[engine], training[engine])])
        for base in ("plain", "reference"):
            if base in engines:
                for engine in engines:
                    row[f"{engine}_vs_{base}"] = median([a / b for a, b in zip(later[engine], later[base])])
        if "reference" in engines:
            engine_models = [e for e in engines if e != "reference"]
            if engine_models:  # the same work: the reference ends with the engine's model
                final = torch.load(out / f"{engine_models[0]}-k{k}" / "model.pt")
                row["reference_same_model"] = all(torch.equal(final[key], v) for key, v in reference_state.items())
        rows.append(row)
        report(f"K={k}: " + ", ".join(f"{e} {row[f'{e}_later_round_seconds']:.3f}s/round "
                                      f"({row[f'{e}_later_rest_seconds'] * 1000:.0f} ms besides training)"
                                      for e in engines))
        (out / "overhead.json").write_text(json.dumps({"config": cfg.to_run_config(), "rows": rows}, indent=1))
        (out / "overhead.md").write_text(markdown(rows, engines))
    return rows


def markdown(rows: list[dict[str, Any]], engines: tuple[str, ...]) -> str:
    head = ["clients per round"] + [f"{e} s/round (first)" for e in engines] + [f"{e} s/round (later)" for e in engines]
    head += [f"{e} ms/round besides training" for e in engines]
    if "plain" in engines:
        head += [f"{e} / plain" for e in engines if e != "plain"]
    if "reference" in engines:
        head += [f"{e} / reference" for e in engines if e != "reference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["clients_per_round"])]
        cells += [f"{r[f'{e}_first_round_seconds']:.2f}" for e in engines]
        cells += [f"{r[f'{e}_later_round_seconds']:.3f}" for e in engines]
        cells += [f"{r[f'{e}_later_rest_seconds'] * 1000:.0f}" for e in engines]
        if "plain" in engines:
            cells += [f"{r[f'{e}_vs_plain']:.2f}x" for e in engines if e != "plain"]
        if "reference" in engines:
            cells += [f"{r[f'{e}_vs_reference']:.2f}x" for e in engines if e != "reference"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
