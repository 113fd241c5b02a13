"""The ServerApp: test features, initial head, the chosen strategy, and the run's files."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.logger import FLOWER_LOGGER

from fedsparse.config import RunConfig
from fedsparse.head import MLPHead, count_params, evaluate
from fedsparse.protocol import (
    BYTES_RECEIVED_KEY,
    BYTES_SENT_KEY,
    EXTRACT_SECONDS_KEY,
    PEAK_RSS_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    wire_bytes,
)
from fedsparse.report import RunReport, plot_accuracy
from fedsparse.task import initial_head, test_features
from strategies.common import RoundStats
from strategies.fedavg import FedAvgBaseline
from strategies.ist import IST
from strategies.progress import QuietFlowerRounds, RoundLine

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, RunConfig.from_run_config(context.run_config))


def train_config_record(cfg: RunConfig) -> ConfigRecord:
    """What every training message carries besides the arrays: local steps, lr, batch size."""
    return ConfigRecord({"local-steps": cfg.local_steps, "lr": cfg.lr, "batch-size": cfg.batch_size})


def make_strategy(cfg: RunConfig) -> IST | FedAvgBaseline:
    if cfg.strategy == "ist":
        return IST(cfg.clients_per_round, cfg.seed, wait_timeout=cfg.round_timeout,
                   subnets_per_round=cfg.subnets_per_round, scaling=cfg.ist_scaling)
    return FedAvgBaseline(cfg.clients_per_round, cfg.seed, wait_timeout=cfg.round_timeout)


def _round_entry(stats: RoundStats, accuracy: float, loss: float, elapsed: float) -> dict:
    def mean(xs: list[int]) -> float:
        return float(sum(xs) / len(xs)) if xs else 0.0

    return {
        "round": stats.round,
        "accuracy": accuracy,
        "loss": loss,
        "clients": stats.replies,  # replies used
        "sampled": stats.sent,
        "subnets": stats.subnets,
        "failures": stats.failures,
        "failed_error": stats.errors,
        "failed_invalid": stats.invalid,
        "failed_lost": stats.lost,
        "bytes_down_per_client": mean(stats.bytes_down),
        "bytes_up_per_client": mean(stats.bytes_up),
        "bytes_down_total": sum(stats.bytes_down),
        "bytes_up_total": sum(stats.bytes_up),
        "seconds": time.perf_counter() - stats.started,
        "elapsed": elapsed,  # since the run started
        "train_loss": stats.mean_metric(TRAIN_LOSS_KEY),
        "client_train_seconds_max": stats.max_metric(TRAIN_SECONDS_KEY),
        "client_extract_seconds_max": stats.max_metric(EXTRACT_SECONDS_KEY),
        "client_peak_rss_bytes_max": stats.max_metric(PEAK_RSS_KEY),
        "client_bytes_received_mean": stats.mean_metric(BYTES_RECEIVED_KEY),  # as measured by the clients
        "client_bytes_sent_mean": stats.mean_metric(BYTES_SENT_KEY),
    }


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    """Train for ``cfg.num_rounds`` rounds; write metrics.json, model.pt and accuracy.png to ``cfg.out_dir``."""
    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(INFO, "fedsparse: %s, %s, encoder %s, mask ratio %s; writing to %s",
        cfg.strategy, cfg.dataset, cfg.encoder, cfg.mask_ratio, out.resolve())
    if cfg.fault_rate > 0:
        log(WARNING, "fault injection: each client fails with probability %.2f per round (mode %s)",
            cfg.fault_rate, cfg.fault_mode)
    test, n_classes = test_features(cfg)
    log(INFO, "test features: %d x %d (%s, %.1fs)", *test.x.shape,
        "cached" if test.cache_hit else "extracted", test.seconds)
    head = initial_head(cfg, test.x.shape[1], n_classes)
    initial = ArrayRecord(head.state_dict())
    report = RunReport(
        config=cfg.to_run_config(),
        model_params=count_params(head.dims),
        model_bytes=wire_bytes(initial),
        extra={"num_classes": n_classes, "test_examples": len(test.y), "head_dims": list(head.dims)},
    )
    strategy = make_strategy(cfg)
    line = RoundLine(cfg.num_rounds, started=t_start)
    strategy.on_replies = line.replies

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = MLPHead.from_state_dict(arrays.to_torch_state_dict())
        accuracy, loss = evaluate(model, test.x, test.y)
        if server_round == 0:
            report.initial = {"accuracy": accuracy, "loss": loss}
            log(INFO, "round 0/%d: accuracy %.4f (initial head)", cfg.num_rounds, accuracy)
        else:
            entry = _round_entry(strategy.history[-1], accuracy, loss, time.perf_counter() - t_start)
            report.rounds.append(entry)
            line.round_done(entry)
        report.extra["wall_seconds"] = time.perf_counter() - t_start
        report.write(out)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    train_config = train_config_record(cfg)
    quiet = QuietFlowerRounds()  # our round line replaces Flower's five per round
    FLOWER_LOGGER.addFilter(quiet)
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
        )
    finally:
        FLOWER_LOGGER.removeFilter(quiet)
        line.clear()
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    report.extra["wall_seconds"] = time.perf_counter() - t_start
    report.write(out)
    plot_accuracy(report.to_dict(), out / "accuracy.png")
    log(INFO, "wrote %s", ", ".join(str(out / f) for f in ("metrics.json", "model.pt", "accuracy.png")))
    return report.to_dict()
