"""A catalogue of hostile replies: none of them may stop the honest clients from training.

One client (partition 1) answers every round with a hostile reply, built from the honest
reply it would have sent, through the real ClientApp, the Strategy adapter and the engine.
Each case must end with the accuracy of the same run in which that client simply failed
(an error reply), and with a finite head; the server counts what it refused.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedsparse.config import RunConfig
from fedsparse.engine.rounds import RoundEngine
from fedsparse.model.ist import all_finite
from fedsparse.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES_KEY
from strategies.adapter import AlgorithmStrategy
from strategies.flower_internals import set_task_identity
from strategies.in_process import LocalGrid, node_id_of
from test_faults import _color_images

HOSTILE = 1  # the partition that misbehaves


def _state(reply: Message) -> dict[str, torch.Tensor]:
    return reply.content[ARRAYS_KEY].to_torch_state_dict()


def _metrics(reply: Message) -> dict:
    return dict(reply.content[METRICS_KEY])


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict | None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    if metrics is not None:
        content[METRICS_KEY] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


def mutate_arrays(fn, **metrics):
    """A hostile reply whose arrays are ``fn(state)`` (and metrics overridden by ``metrics``)."""
    def make(msg: Message, honest: Message) -> Message:
        return _reply(msg, ArrayRecord(fn(_state(honest))), {**_metrics(honest), **metrics})
    return make


def raw_arrays(fn):
    """A hostile reply whose arrays are numpy arrays ``fn(state)`` (any dtype Flower carries)."""
    def make(msg: Message, honest: Message) -> Message:
        arrays = {k: Array(v) for k, v in fn(_state(honest)).items()}
        return _reply(msg, ArrayRecord(arrays), _metrics(honest))
    return make


def first_key(state):
    return next(iter(state))


def last_bias(state):
    return [k for k in state if k.endswith("bias")][-1]


HOSTILE_REPLIES = {
    "all weights 1e38": mutate_arrays(lambda s: {k: torch.full_like(v, 1e38) for k, v in s.items()}),
    "output bias + 1e6, 10 examples": mutate_arrays(
        lambda s: {**s, last_bias(s): s[last_bias(s)] + torch.eye(len(s[last_bias(s)]))[0] * 1e6}, **{NUM_EXAMPLES_KEY: 10}),
    "negated weights, 10**12 examples": mutate_arrays(lambda s: {k: -v for k, v in s.items()}, **{NUM_EXAMPLES_KEY: 10**12}),
    "weights x 100": mutate_arrays(lambda s: {k: v * 100 for k, v in s.items()}),
    "a NaN": mutate_arrays(lambda s: {**s, first_key(s): s[first_key(s)].index_put((torch.tensor([0]),), torch.tensor(float("nan")))}),
    "an Inf": mutate_arrays(lambda s: {**s, first_key(s): s[first_key(s)].index_put((torch.tensor([0]),), torch.tensor(float("inf")))}),
    "float64 arrays": raw_arrays(lambda s: {k: v.double().numpy() for k, v in s.items()}),
    "float16 arrays": raw_arrays(lambda s: {k: v.half().numpy() for k, v in s.items()}),
    "bool arrays": raw_arrays(lambda s: {k: (v > 0).numpy() for k, v in s.items()}),
    "int64 arrays": raw_arrays(lambda s: {k: v.long().numpy() for k, v in s.items()}),
    "a transposed weight": mutate_arrays(lambda s: {**s, first_key(s): s[first_key(s)].T.contiguous()}),
    "an array missing": mutate_arrays(lambda s: {k: v for k, v in s.items() if k != first_key(s)}),
    "an extra array": mutate_arrays(lambda s: {**s, "layers.9.weight": torch.ones(3, 3)}),
    "0 examples": mutate_arrays(lambda s: s, **{NUM_EXAMPLES_KEY: 0}),
    "-5 examples": mutate_arrays(lambda s: s, **{NUM_EXAMPLES_KEY: -5}),
    "10**12 examples": mutate_arrays(lambda s: s, **{NUM_EXAMPLES_KEY: 10**12}),
    "3.5 examples": mutate_arrays(lambda s: s, **{NUM_EXAMPLES_KEY: 3.5}),
    "no metrics record": lambda msg, honest: _reply(msg, honest.content[ARRAYS_KEY], None),
    "no arrays record": lambda msg, honest: _reply(msg, None, _metrics(honest)),
}
FAILED = "failed"  # the reference: the client answers an error instead


class HostileGrid(LocalGrid):
    """The real ClientApp answers; partition ``HOSTILE``'s training replies are replaced."""

    def __init__(self, cfg: RunConfig, hostile) -> None:
        super().__init__(cfg)
        self.hostile = hostile

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        out = []
        for msg, reply in zip(self.sent, replies):
            if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == node_id_of(HOSTILE):
                reply = (Message(Error(code=2, reason="failed"), reply_to=msg) if self.hostile == FAILED
                         else self.hostile(msg, reply))
            out.append(reply)
        self.replies = out
        return out


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory) -> RunConfig:
    root = tmp_path_factory.mktemp("hostile-data")
    _color_images(root, per_class=24, colors={"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
                                              "gray": (128, 128, 128)})
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="32,32",
                     num_clients=4, clients_per_round=4, num_rounds=5, local_steps=5, batch_size=16, lr=0.01,
                     cache_dir=str(tmp_path_factory.mktemp("hostile-cache")))


def run(cfg: RunConfig, hostile):
    set_task_identity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            engine = RoundEngine(cfg, report=lambda s: None)
            metrics = engine.run(AlgorithmStrategy(engine, HostileGrid(cfg, hostile), "in-process",
                                                   clients_are_partitions=True))
    finally:
        torch.set_num_threads(threads)
    return metrics, engine


# the MLP's own IST: its replies are slices of the head (the closed-form start's first replies are
# statistics, checked for plausibility: tests/test_residual.py::TestImplausibleStatistics)
ALGORITHMS = {"ist": dict(strategy="ist", ist_start="random"),
              "grouped-ist": dict(strategy="ist", subnets_per_round=2, ist_start="random"),
              "fedavg": dict(strategy="fedavg")}
_reference: dict[str, float] = {}


@pytest.mark.parametrize("case", list(HOSTILE_REPLIES))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_hostile_reply_leaves_the_accuracy_of_a_failed_client(base_cfg, tmp_path, algorithm, case):
    cfg = base_cfg.replace(**ALGORITHMS[algorithm])
    if algorithm not in _reference:
        ref, _ = run(cfg.replace(out_dir=str(tmp_path / "failed")), FAILED)
        assert ref.final_accuracy > ref.initial["accuracy"] + 0.2  # the honest clients learn
        _reference[algorithm] = ref.final_accuracy
    metrics, engine = run(cfg.replace(out_dir=str(tmp_path / "hostile")), HOSTILE_REPLIES[case])
    assert all_finite(engine.state)
    assert metrics.final_accuracy >= _reference[algorithm] - 0.02, (metrics.final_accuracy, _reference[algorithm])
    assert all(r.failures == 1 and r.clients == 3 for r in metrics.rounds)  # refused every round, counted
    assert all(sum(r.rejected.values()) == r.failed_invalid for r in metrics.rounds)


def test_a_reply_with_other_metric_keys_is_used_not_fatal(base_cfg, tmp_path):
    """Flower's FedAvg aborted the run when one reply carried a different set of metric keys."""
    extra_key = mutate_arrays(lambda s: s, evil=1.0)
    metrics, engine = run(base_cfg.replace(strategy="fedavg", out_dir=str(tmp_path / "run")), extra_key)
    assert metrics.finished and all(r.clients == 4 and r.failures == 0 for r in metrics.rounds)
