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

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fedsparse.accounting.memory import background_priority
from fedsparse.inputs.features import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
FORMAT = 1

# Keys that do not change what a round computes: where files go, how long to wait, how
# many simulated clients run side by side, how often to evaluate, and resume itself.
RESUME_FREE_KEYS = frozenset({"out-dir", "cache-dir", "round-timeout", "client-cpus", "ray-address", "num-rounds", "eval-every", "save-seconds", "resume",
                              "outlier-pardon"})


@dataclass
class Checkpoint:
    round: int
    state: dict[str, torch.Tensor]
    algorithm: dict[str, Any]
    metrics: dict[str, Any] | str  # RunMetrics.to_dict(), or its JSON text (RunMetrics.json_text(): saved as is)
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
        metrics = data["metrics"]
        if isinstance(metrics, str):
            try:
                metrics = json.loads(metrics)
            except ValueError:
                raise ValueError(f"{path} is not a fedsparse checkpoint (its metrics are not JSON)") from None
        return cls(int(data["round"]), data["state"], data["algorithm"], metrics, data["config"])


class BackgroundWriter:
    """Writes a round's files in a thread while the next rounds run, the newest first.

    ``submit`` never waits. A write in flight is finished; a write still waiting when a newer
    one is submitted is dropped for it (``skipped`` counts them): the files then skip a round,
    and a fast run (a simulated round of 0.1 s against 10-30 ms of writing, on cores its
    clients train on) writes only as often as the disk keeps up. While the run goes on the
    files are at most two rounds behind; ``wait`` returns once the newest write submitted is
    on disk, and re-raises the error of a failed one (a full disk stops the run at the next
    round, not silently; ``submit`` re-raises it too). Every file is written atomically, so a
    run killed during a write keeps the previous complete files, and ``--resume`` goes on from
    them. The thread is not a daemon: a process that exits waits for the writes in flight.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Callable[[], None] | None = None  # the newest write not started
        self._running = False  # a thread is taking writes
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.skipped = 0  # writes dropped for newer ones

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        with self._lock:
            if self._pending is not None:
                self.skipped += 1
            self._pending = job
            if not self._running:
                self._running = True
                self._thread = threading.Thread(target=self._loop, name="fedsparse-writer")
                self._thread.start()

    def _loop(self) -> None:
        background_priority()  # on the cores the simulated clients train on, it waits for idle time
        while True:
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._running = False
                    return
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - re-raised in the engine's thread by wait()
                self._error = self._error or err

    def wait(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
        self._raise()

    def _raise(self) -> None:
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
