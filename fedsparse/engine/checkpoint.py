"""What a run writes after every round, atomically, so that a killed run can go on.

``checkpoint.pt`` holds everything the next round depends on: the head, the round, the
algorithm's own state (a server optimizer's moments, ...) and the history (``RunMetrics``).
The samplers, partitions and batches need no state: each is drawn from a seed derived from
the run's ``seed`` and the round (``fedsparse.seeds``). ``model.pt`` (the latest head) and
``metrics.json`` are written beside it after every round.

A resume must use the same config as the checkpoint; keys that only steer how the run is
carried out (``RESUME_FREE_KEYS``) may differ, and ``num-rounds`` may grow to extend a run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fedsparse.inputs.features import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
FORMAT = 1

# Keys that do not change what a round computes: where files go, how long to wait, how
# many simulated clients run side by side, how often to evaluate, and resume itself.
RESUME_FREE_KEYS = frozenset({"out-dir", "cache-dir", "round-timeout", "client-cpus", "num-rounds", "eval-every", "resume"})


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    algorithm: dict[str, Any]
    metrics: dict[str, Any]  # RunMetrics.to_dict()
    config: dict[str, Any]  # the run config (kebab-case)

    def save(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": FORMAT, "round": self.round, "state": self.state, "algorithm": self.algorithm,
                           "metrics": self.metrics, "config": self.config}, path)
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> "Checkpoint":
        path = Path(out_dir) / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: no {CHECKPOINT} in {Path(out_dir)}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
            from fedsparse.inputs.encoder import load_failure_reason

            raise ValueError(f"cannot read {path}: {load_failure_reason(err)}") from None
        keys = ("round", "state", "algorithm", "metrics", "config")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not all(k in data for k in keys):
            raise ValueError(f"{path} is not a fedsparse checkpoint (format {FORMAT})")
        if not isinstance(data["config"], dict) or not isinstance(data["state"], dict):
            raise ValueError(f"{path} is not a fedsparse checkpoint (format {FORMAT})")
        return cls(int(data["round"]), data["state"], data["algorithm"], data["metrics"], data["config"])


class BackgroundWriter:
    """Writes a round's files in a thread while the next round runs (they cost 15-20 ms a round,
    as much as a tenth of a simulated round), one write at a time, in order.

    ``submit`` waits for the write before it; ``wait`` returns once the last one is on disk and
    re-raises its error, if it failed (a full disk stops the run at the next round, not
    silently). Every file is written atomically, so a run killed during a write keeps the
    previous round's complete files, and ``--resume`` goes on from them. The thread is not a
    daemon: a process that exits waits for the write in flight.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="fedsparse-writer")
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as err:  # noqa: BLE001 - re-raised in the engine's thread by wait()
            self._error = err

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between a checkpoint's config and the current one (ignoring
    ``RESUME_FREE_KEYS``), each as ``key (saved -> current)``."""
    keys = sorted((set(saved) | set(current)) - RESUME_FREE_KEYS)
    return [f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def check_resumable(ckpt: Checkpoint, current: Mapping[str, Any]) -> None:
    """One-line ``ValueError`` naming the keys a resume may not change, or a lowered num-rounds."""
    diff = config_differences(ckpt.config, current)
    if diff:
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {', '.join(diff)}")
    if int(current["num-rounds"]) < ckpt.round:
        raise ValueError(f"cannot resume: num-rounds {current['num-rounds']} is below the {ckpt.round} rounds already done")
