"""Run results as files: ``metrics.json`` (rewritten after every round) and ``accuracy.png``."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    """The content of ``metrics.json``.

    ``rounds`` holds one dict per training round with at least: round, accuracy, loss,
    clients (replies used), sampled, subnets, failures (failed_error + failed_invalid +
    failed_lost), bytes_down_per_client, bytes_up_per_client, bytes_down_total,
    bytes_up_total, seconds (the round) and elapsed (since the run started).
    """

    config: dict[str, Any]
    model_params: int
    model_bytes: int
    initial: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "model_params": self.model_params,
            "model_bytes": self.model_bytes,
            "initial": self.initial,
            "rounds": self.rounds,
            **self.extra,
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``metrics.json`` atomically, so a crash mid-run leaves the last complete round."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".metrics-", dir=out)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, out / "metrics.json")
        return out / "metrics.json"


def plot_accuracy(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of test accuracy per round (round 0 = the initial head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in report["rounds"]]
    acc = [report["initial"].get("accuracy", float("nan"))] + [r["accuracy"] for r in report["rounds"]]
    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, acc, marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        f"{cfg.get('strategy', '?').upper()} on {cfg.get('dataset', '?')}, mask ratio {cfg.get('mask-ratio', '?')}, "
        f"{cfg.get('clients-per-round', '?')}/{cfg.get('num-clients', '?')} clients",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
