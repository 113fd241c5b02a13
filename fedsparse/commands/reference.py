"""A minimal IST trainer in bare PyTorch: the yardstick for what a fedsparse round costs.

What a hand-written trainer does, and nothing else: K worker processes (one torch thread
each) hold their clients' cached features; every round the main process partitions the
hidden neurons, sends each worker its slice through a pipe, the workers train at the same
time (the same ``train_slice`` on the same batches as a fedsparse client), and the main
process stitches the slices back. No Flower, no messages, no checkpoints, no per-round
evaluation (the head is evaluated once, after the last round, outside the timing). Pure IST
(one subnet per client), the setting of the paper and of ``fedsparse overhead``.

The model it ends with is the one ``RoundEngine`` gives for the same config (same seeds,
same order of aggregation), which ``fedsparse overhead`` checks, so the two time the same work.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import torch

from fedsparse.config import RunConfig
from fedsparse.engine.rounds import sample_clients
from fedsparse.model.head import MLPHead, evaluate
from fedsparse.model.ist import SliceUpdate, hidden_sizes, partition, slice_state, stitch, worker_indices
from fedsparse.seeds import derive_seed


def _worker(conn: Any, run_config: dict[str, Any]) -> None:
    """A worker process: train every slice it is sent on its client's cached features."""
    torch.set_num_threads(1)
    from fedsparse.task import client_features, train_slice

    cfg = RunConfig.from_run_config(run_config)
    while (job := conn.recv()) is not None:
        server_round, pid, state = job
        feats = client_features(cfg, pid, cfg.num_clients, server_round)
        t0 = time.perf_counter()  # what a fedsparse client reports as its training seconds
        trained, _ = train_slice(cfg, state, feats, server_round, pid)
        conn.send((trained, len(feats.y), time.perf_counter() - t0))


def supports(cfg: RunConfig) -> bool:
    """Whether ``cfg`` is what the reference implements: the authors' IST, one subnet per client."""
    return cfg.strategy == "ist" and cfg.ist_variant == "authors" and cfg.num_subnets == cfg.clients_per_round


def reference_rounds(cfg: RunConfig, workers: int | None = None) -> dict[str, Any]:
    """``cfg.num_rounds`` pure-IST rounds with ``min(K, workers)`` worker processes; returns
    the seconds of every round, the seconds of its slowest worker's training in every round
    (``train_seconds``), the final state and its test accuracy."""
    if not supports(cfg):
        raise ValueError("the bare-PyTorch reference runs the authors' pure IST "
                         "(strategy = ist, ist-variant = authors, one subnet per client)")
    from fedsparse.task import initial_head, test_features

    test, n_classes = test_features(cfg)
    state = initial_head(cfg, test.x.shape[1], n_classes).state_dict()
    k = cfg.clients_per_round
    n_workers = max(1, min(k, workers or k))
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(n_workers):
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(there, cfg.to_run_config()), daemon=True)
        proc.start()
        pipes.append(here)
        procs.append(proc)
    seconds, train_seconds = [], []
    try:
        for server_round in range(1, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            clients = sample_clients(cfg.seed, server_round, range(cfg.num_clients), k)
            parts = partition(hidden_sizes(state), k, derive_seed("partition", cfg.seed, server_round))
            indices = [worker_indices(parts, i) for i in range(k)]
            updates, trained_for = [], []
            for start in range(0, k, n_workers):  # K <= workers: one wave, all workers at once
                wave = list(range(start, min(k, start + n_workers)))
                for w, i in enumerate(wave):
                    pipes[w].send((server_round, clients[i], slice_state(state, indices[i], cfg.ist_scaling)))
                for w, i in enumerate(wave):
                    trained, n, train_s = pipes[w].recv()
                    updates.append(SliceUpdate(indices[i], trained, n))
                    trained_for.append(train_s)
            state = stitch(state, updates, cfg.ist_scaling)
            seconds.append(time.perf_counter() - t0)
            train_seconds.append(max(trained_for))
    finally:
        for pipe in pipes:
            pipe.send(None)
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    accuracy, _ = evaluate(MLPHead.from_state_dict(state), test.x, test.y)
    return {"seconds": seconds, "train_seconds": train_seconds, "state": state, "accuracy": accuracy, "workers": n_workers}
