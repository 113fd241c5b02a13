"""The ServerApp: the round engine over the run's Grid, through ``AlgorithmStrategy``.

``flwr run .`` (simulation or deployment) and ``fedsparse run`` both land in ``serve``.
A bad run config ends the ServerApp with one line naming the key.
"""

from __future__ import annotations

from logging import ERROR, INFO, WARNING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RunMetrics
from fedsparse.engine.rounds import RoundEngine
from fedsparse.errors import USER_ERRORS, one_line
from fedsparse.processes import exit_without_final_collection
from strategies.adapter import AlgorithmStrategy
from strategies.progress import RoundLine

exit_without_final_collection()  # the flwr-serverapp process ends with the run
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Check the run config, and what it names (folders, data, encoder), before any round.
    A problem is logged as one line, ``fedsparse: error: ...`` (``flwr run --stream``,
    ``flwr log``), and ends the ServerApp with an exception, not ``SystemExit``: Flower then
    records the run as ``finished:failed`` with that line as its details (a ``SystemExit``
    in the simulation's ServerApp thread ends it silently, as ``finished:completed``).
    Unknown keys never get here: the SuperLink refuses them ("Invalid run configuration.")
    and names them only in its own log; ``fedsparse check`` names them."""
    from fedsparse.task import preflight

    try:
        cfg = RunConfig.from_run_config(context.run_config)
        preflight(cfg, partitions=engine_name(grid) == "simulation")
    except USER_ERRORS as err:
        line = one_line(err)
        log(ERROR, "fedsparse: error: %s", line)
        raise ValueError(f"fedsparse: error: {line}") from None
    serve(grid, cfg)


def engine_name(grid: Grid) -> str:
    """``simulation`` on Flower's in-memory Grid, ``deployment`` on a SuperLink's."""
    return "simulation" if "InMemory" in type(grid).__name__ else "deployment"


def serve(grid: Grid, cfg: RunConfig, name: str | None = None, engine: RoundEngine | None = None) -> RunMetrics:
    """Run (or resume) ``cfg`` over ``grid``; metrics.json, checkpoint.pt, model.pt and
    accuracy.png go to ``cfg.out_dir`` after every round."""
    line = RoundLine(cfg.num_rounds)
    engine = engine if engine is not None else RoundEngine(cfg, report=line.say)
    if engine_name(grid) == "simulation":  # the clients train on this machine's cores (RoundEngine.round_threads)
        engine.round_threads = 1
    log(INFO, "fedsparse: %s, %s, encoder %s, mask ratio %s; writing to %s",
        engine.algorithm.describe(), cfg.dataset, cfg.encoder, cfg.mask_ratio, engine.out.resolve())
    if cfg.fault_rate > 0:
        log(WARNING, "fault injection: each client fails with probability %.2f per round (mode %s)",
            cfg.fault_rate, cfg.fault_mode)
    strategy = AlgorithmStrategy(engine, grid, name or engine_name(grid), on_replies=line.replies,
                                 clients_are_partitions=engine_name(grid) == "simulation")
    try:
        metrics = engine.run(strategy)
    finally:
        line.clear()
    log(INFO, "fedsparse: %s; files in %s", metrics.summary(), engine.out)
    return metrics
