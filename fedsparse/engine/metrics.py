"""The metrics schema: one dataclass per round and one per run.

``metrics.json`` (``RunMetrics.load``), the round line, ``fedsparse sweep``, ``fedsparse
overhead`` and the CLI summary read these classes (a round's clients are ``ClientRecord``s).
String keys remain where data crosses a boundary: the replies' metrics (``fedsparse.protocol``'s
keys, mapped to fields here), ``metrics.json`` as ``fedsparse devices`` reads it (the JSON the
``flwr run`` it started wrote; ``summarize``), and the result rows ``bench``, ``sweep`` and
``overhead`` write. Fields that do not apply to a round are ``None`` (accuracy of a
round that was not evaluated, client metrics nobody sent).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

FAILURE_KINDS = ("error", "invalid", "lost")


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _max(xs: Sequence[float]) -> float | None:
    return float(max(xs)) if xs else None


@dataclass
class RoundMetrics:
    """One training round. ``accuracy``/``loss`` are the full head's on the server's test
    features (None when ``eval-every`` skipped the round)."""

    round: int
    accuracy: float | None
    loss: float | None
    clients: int  # replies used
    examples: int  # their num-examples, summed
    sampled: int
    subnets: int  # distinct groups of arrays sent (IST subnets; 1 for FedAvg)
    failures: int  # failed_error + failed_invalid + failed_lost
    failed_error: int
    failed_invalid: int
    failed_lost: int
    bytes_down_per_client: float
    bytes_up_per_client: float
    bytes_down_total: int
    bytes_up_total: int
    seconds: float  # the round
    elapsed: float  # since the run (or the resumed run) started
    train_loss: float | None = None  # mean over the replies used
    client_train_seconds_max: float | None = None
    client_extract_seconds_max: float | None = None
    client_peak_rss_bytes_max: float | None = None
    client_train_tensor_bytes_max: float | None = None  # accounting.costs.head_train_tensor_bytes
    client_bytes_received_mean: float | None = None  # as measured by the clients
    client_bytes_sent_mean: float | None = None
    feature_cache_hits: int | None = None  # replies whose features came from the cache
    rejected: dict[str, int] = field(default_factory=dict)  # invalid replies by reason
    update_ratio_max: float | None = None  # the largest accepted ||reply - sent|| / ||sent|| (update-bound)
    head_kept: bool = False  # the aggregate was not finite; the previous head was kept
    # the slowest used client's own work (extract + train seconds), and the round's seconds
    # beyond it: what the round costs besides the work (fedsparse.accounting.timeline)
    work_seconds: float | None = None
    overhead_seconds: float | None = None
    pushed_at: float | None = None  # wall clock: when the round's messages were pushed (Flower's Grid)
    # one record per sampled client (client_record), in task order; empty for rounds of more
    # than PER_CLIENT_MAX clients (metrics.json is rewritten every round)
    per_client: list["ClientRecord"] = field(default_factory=list)
    ray_nodes: int | None = None  # how many Ray nodes the round's replies came from (None: not on Ray)
    # CPU seconds of the server's process since the previous round ended (all its threads: on the
    # Simulation Engine the server, Flower's runtime and Ray's driver, no client), and the seconds
    # the used replies' clients spent extracting and training, summed
    server_cpu_seconds: float | None = None
    client_seconds_sum: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The round as ``metrics.json`` holds it (a client record without its unset fields)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rejected"] = dict(self.rejected)
        out["per_client"] = [rec.to_dict() for rec in self.per_client]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundMetrics":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known["per_client"] = [ClientRecord.from_dict(rec) for rec in known.get("per_client", [])]
        return cls(**known)

    def line(self, num_rounds: int) -> str:
        """The one line printed when the round ends."""
        detail = ""
        if self.failures:
            kinds = [f"{getattr(self, 'failed_' + k)} {k}" for k in FAILURE_KINDS if getattr(self, "failed_" + k)]
            detail = f": {', '.join(kinds)}"
        acc = "not evaluated" if self.accuracy is None else f"{self.accuracy:.4f}"
        nodes = f" on {self.ray_nodes} nodes" if self.ray_nodes is not None and self.ray_nodes > 1 else ""
        return (
            f"round {self.round}/{num_rounds} | clients {self.clients}/{self.sampled} done{nodes}, "
            f"{self.failures} failed{detail} | accuracy {acc} | "
            f"{self.bytes_down_per_client / 1e3:.1f} kB down, {self.bytes_up_per_client / 1e3:.1f} kB up per client | "
            f"round {self.seconds:.1f}s, elapsed {self.elapsed:.1f}s"
        )


def client_summary(metrics: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The ``client_*`` fields of a round from the replies' metrics (protocol keys)."""
    from fedsparse import protocol as p

    def vals(key: str) -> list[float]:
        return [m[key] for m in metrics if key in m]

    hits = vals(p.CACHE_HIT_KEY)
    return {
        "train_loss": _mean(vals(p.TRAIN_LOSS_KEY)),
        "client_train_seconds_max": _max(vals(p.TRAIN_SECONDS_KEY)),
        "client_extract_seconds_max": _max(vals(p.EXTRACT_SECONDS_KEY)),
        "client_peak_rss_bytes_max": _max(vals(p.PEAK_RSS_KEY)),
        "client_train_tensor_bytes_max": _max(vals(p.TENSOR_BYTES_KEY)),
        "client_bytes_received_mean": _mean(vals(p.BYTES_RECEIVED_KEY)),
        "client_bytes_sent_mean": _mean(vals(p.BYTES_SENT_KEY)),
        "feature_cache_hits": int(sum(hits)) if hits else None,
        "client_seconds_sum": (sum(vals(p.TRAIN_SECONDS_KEY)) + sum(vals(p.EXTRACT_SECONDS_KEY))
                               if vals(p.TRAIN_SECONDS_KEY) else None),
    }


PER_CLIENT_MAX = 100  # rounds with more sampled clients keep no per-client records

# reply metric (fedsparse.protocol) -> per-client record field
PER_CLIENT_FIELDS = {
    "train-seconds": "train_seconds", "extract-seconds": "extract_seconds", "peak-rss-bytes": "peak_rss_bytes",
    "bytes-received": "bytes_received", "bytes-sent": "bytes_sent", "feature-cache-hit": "feature_cache_hit",
    "train-loss": "train_loss",
    # a client with a device profile (fedsparse.profiles)
    "predicted-peak-bytes": "predicted_peak_bytes", "memory-budget-bytes": "memory_budget_bytes",
    "encoder-batch": "encoder_batch", "mask-ratio": "mask_ratio", "encoder-macs-per-image": "encoder_macs_per_image",
    "train-tensor-bytes": "train_tensor_bytes",
    "ray-node": "ray_node", "worker-pid": "worker_pid",  # a client in a Ray worker (fedsparse.engine.nodes)
    # server side: the factor the defence multiplied an accepted update by (0 = dropped) and the update's cosine
    # with its group's median update (fedsparse.algorithms.robust)
    "clip-scale": "clip_scale", "direction-cos": "direction_cos",
}


@dataclass
class ClientRecord:
    """One sampled client of a round: ``status`` ``ok`` or its failure kind (``error``,
    ``invalid``, ``lost``) with the ``reason``; the bytes the server sent it; what its reply
    reported (``PER_CLIENT_FIELDS``: seconds extracting and training, peak RSS, bytes as the
    client measured them, ...); and, in a run with device profiles, its profile and slice.
    ``None`` (and an empty reason) = not reported; ``metrics.json`` leaves such fields out."""

    client: int
    status: str
    bytes_down: int | None
    examples: int | None = None
    reason: str = ""
    # what the reply reported (fedsparse.protocol keys, PER_CLIENT_FIELDS)
    train_seconds: float | None = None
    extract_seconds: float | None = None
    peak_rss_bytes: float | None = None
    bytes_received: float | None = None
    bytes_sent: float | None = None
    feature_cache_hit: float | None = None
    train_loss: float | None = None
    predicted_peak_bytes: float | None = None
    memory_budget_bytes: float | None = None
    encoder_batch: float | None = None
    mask_ratio: float | None = None
    encoder_macs_per_image: float | None = None
    train_tensor_bytes: float | None = None
    ray_node: float | None = None  # a client in a Ray worker (fedsparse.engine.nodes)
    worker_pid: float | None = None
    clip_scale: float | None = None  # the factor the defence multiplied the accepted update by (0 = dropped)
    direction_cos: float | None = None  # the update's cosine with its group's median update (min-cosine)
    # the client's stamps as seconds after the round's push (fedsparse.accounting.timeline)
    timeline: dict[str, float] | None = None
    # rounds with device profiles (RoundEngine._add_profile_fields)
    profile: str | None = None
    capacity: float | None = None
    slice_dims: list[int] | None = None
    slice_share: float | None = None
    bytes_up: int | None = None
    local_steps: int | None = None
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and (f.name != "reason" or self.reason)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClientRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


assert set(PER_CLIENT_FIELDS.values()) <= {f.name for f in dataclasses.fields(ClientRecord)}


def client_record(client: int, status: str, bytes_down: int | None, metrics: dict[str, float] | None = None,
                  examples: int | None = None, reason: str = "") -> ClientRecord:
    """A ``ClientRecord`` from a reply's metrics (protocol keys)."""
    reported = {name: metrics[key] for key, name in PER_CLIENT_FIELDS.items() if metrics and key in metrics}
    return ClientRecord(client, status, bytes_down, examples, reason, **reported)


@dataclass
class RunMetrics:
    """The content of ``metrics.json``."""

    config: dict[str, Any]
    engine: str  # plain, in-process, simulation, deployment
    model_params: int
    model_bytes: int  # the full head's serialized size (tensor bytes for the plain engine)
    num_classes: int
    test_examples: int
    head_dims: list[int]
    algorithm: str = ""
    initial: dict[str, float] = field(default_factory=dict)  # accuracy, loss of the initial head
    rounds: list[RoundMetrics] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # rounds after which a run was resumed
    finished: bool = False
    wall_seconds: float = 0.0  # of this process's part of the run
    memory: dict[str, Any] = field(default_factory=dict)  # simulation: process-tree RSS/PSS
    # node id -> why the server never used it (its identity query failed: a bad node config,
    # a malformed device profile); such a node is asked once and never sampled
    refused_nodes: dict[str, str] = field(default_factory=dict)
    # simulation: the Ray nodes the clients ran on, one dict each (fedsparse.engine.nodes.NodeTable.rows:
    # node, address, tasks, workers, peak_rss_bytes_sum, peak_rss_bytes_max; fedsparse run adds node_id, cpus)
    ray_nodes: list[dict[str, Any]] = field(default_factory=list)
    # the outlier record (fedsparse.engine.outliers): client -> strikes, client -> the round of its ban
    outliers: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # --- derived --------------------------------------------------------------------
    def evaluated(self) -> list[RoundMetrics]:
        return [r for r in self.rounds if r.accuracy is not None]

    @property
    def final_accuracy(self) -> float | None:
        ev = self.evaluated()
        return ev[-1].accuracy if ev else None

    @property
    def best_accuracy(self) -> float | None:
        ev = self.evaluated()
        return max(r.accuracy for r in ev) if ev else None  # type: ignore[type-var]

    def mean_bytes_down_ratio(self) -> float | None:
        """Mean bytes a client receives per round, as a fraction of the full head."""
        if not self.rounds or not self.model_bytes:
            return None
        return sum(r.bytes_down_per_client for r in self.rounds) / len(self.rounds) / self.model_bytes

    def summary(self) -> str:
        """The CLI's closing line."""
        if not self.rounds:
            return "no round finished"
        init = self.initial.get("accuracy")
        parts = [f"final accuracy {self.final_accuracy:.4f}" if self.final_accuracy is not None else "not evaluated"]
        if init is not None and self.best_accuracy is not None:
            parts.append(f"(initial {init:.4f}, best {self.best_accuracy:.4f})")
        ratio = self.mean_bytes_down_ratio()
        if ratio is not None:
            parts.append(f"bytes down per client = {ratio:.3f} x full model")
        return f"{len(self.rounds)} rounds: " + " ".join(parts[:2]) + ("; " + parts[2] if len(parts) > 2 else "")

    # --- files ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = self._head()
        out["rounds"] = [r.to_dict() for r in self.rounds]
        out.update(self.extra)
        return out

    def _head(self) -> dict[str, Any]:
        """Every field but ``rounds`` and ``extra``, copied (as ``dataclasses.asdict`` copies)."""
        import copy

        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("rounds", "extra")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunMetrics":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rounds"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "rounds"}
        rounds = [RoundMetrics.from_dict(r) for r in data.get("rounds", [])]
        return cls(**known, rounds=rounds, extra=extra)

    def json_text(self) -> str:
        """``metrics.json``'s text: ``to_dict()`` as JSON, indented, ``rounds`` last. Each round's
        text is made once and kept on its entry (entries do not change once appended), so a
        run that writes this after every round pays for its new round, not for its whole
        history (150 rounds: 18 ms for ``json.dump(to_dict())``, well under 1 ms this way)."""
        head = {**self._head(), **self.extra}
        text = json.dumps(head, indent=2)
        rounds = ",\n".join(_round_json(r) for r in self.rounds)
        body = f'"rounds": [\n{rounds}\n  ]' if rounds else '"rounds": []'
        return f"{text[:-2]},\n  {body}\n}}" if head else f"{{\n  {body}\n}}"

    def snapshot(self) -> "RunMetrics":
        """A copy whose lists and dicts are its own (the rounds themselves are shared: a round's
        entry is not changed once appended): what a background write reads while the run goes on."""
        return dataclasses.replace(self, initial=dict(self.initial), rounds=list(self.rounds),
                                   resumed_at=list(self.resumed_at), memory=dict(self.memory), extra=dict(self.extra),
                                   refused_nodes=dict(self.refused_nodes), ray_nodes=list(self.ray_nodes),
                                   outliers={k: dict(v) for k, v in self.outliers.items()})

    def write(self, out_dir: str | Path, text: str | None = None) -> Path:
        """Write ``metrics.json`` atomically (a crash leaves the previous complete file);
        ``text``: ``json_text()`` when the caller has it already."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".metrics-", dir=out)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.json_text() if text is None else text)
        os.replace(tmp, out / "metrics.json")
        return out / "metrics.json"

    @classmethod
    def load(cls, path: str | Path) -> "RunMetrics":
        p = Path(path)
        if p.is_dir():
            p = p / "metrics.json"
        return cls.from_dict(json.loads(p.read_text()))


def _round_json(entry: RoundMetrics) -> str:
    """``entry`` as JSON indented to sit in ``rounds``, made once per entry (see ``json_text``)."""
    text = entry.__dict__.get("_json")
    if text is None:
        text = "    " + json.dumps(entry.to_dict(), indent=2).replace("\n", "\n    ")
        entry.__dict__["_json"] = text
    return text


def plot_accuracy(metrics: RunMetrics, path: str | Path) -> Path:
    """PNG of test accuracy per evaluated round (round 0 = the initial head)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = metrics.evaluated()
    rounds = [0] + [r.round for r in ev]
    acc = [metrics.initial.get("accuracy", float("nan"))] + [r.accuracy for r in ev]
    cfg = metrics.config
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, acc, marker="o" if len(rounds) < 60 else None)
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
