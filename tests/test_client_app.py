"""The ClientApp called directly with hand-built Messages (no simulation engine)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app
from fedsparse.config import RunConfig
from fedsparse.model.ist import partition, slice_state, worker_indices
from fedsparse.protocol import (
    ARRAYS_KEY,
    BYTES_RECEIVED_KEY,
    BYTES_SENT_KEY,
    CACHE_HIT_KEY,
    CONFIG_KEY,
    EXTRACT_SECONDS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    PEAK_RSS_KEY,
    TRAIN_LOSS_KEY,
    wire_bytes,
)
from fedsparse.task import initial_head


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.fixture
def cfg(tmp_path):
    return RunConfig(hidden="32,32", cache_dir=str(tmp_path / "cache"), local_steps=5, num_clients=50, clients_per_round=2)


def context(cfg: RunConfig, partition_id: int = 3, num_partitions: int = 50) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def train_message(state: dict, server_round: int = 1) -> Message:
    conf = ConfigRecord({"server-round": server_round, "local-steps": 5, "lr": 1e-3, "batch-size": 16})
    content = RecordDict({ARRAYS_KEY: ArrayRecord(state), CONFIG_KEY: conf})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def test_client_trains_its_slice_and_reports(cfg):
    full = initial_head(cfg, 192, 10).state_dict()
    index = worker_indices(partition([32, 32], 2, seed=0), 1)
    sub = slice_state(full, index)
    msg = train_message(sub)
    reply = app(msg, context(cfg))
    assert not reply.has_error(), reply.error
    got = reply.content[ARRAYS_KEY].to_torch_state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in sub.items()}
    assert any(not torch.equal(got[k], sub[k]) for k in sub), "local training changed nothing"
    m = reply.content[METRICS_KEY]
    assert m[NUM_EXAMPLES_KEY] == 200  # 10,000 bundled training images / 50 partitions
    assert m[TRAIN_LOSS_KEY] > 0
    assert m[CACHE_HIT_KEY] == 0 and m[EXTRACT_SECONDS_KEY] > 0
    assert m[PEAK_RSS_KEY] > 10_000_000
    assert m[BYTES_RECEIVED_KEY] == wire_bytes(msg)
    assert m[BYTES_SENT_KEY] >= wire_bytes(reply.content[ARRAYS_KEY])

    # a second round of the same client reads its features from the cache
    again = app(train_message(sub, server_round=2), context(cfg))
    assert again.content[METRICS_KEY][CACHE_HIT_KEY] == 1
    assert again.content[METRICS_KEY][EXTRACT_SECONDS_KEY] == 0.0


def test_client_without_partition_config_names_the_missing_key(cfg):
    # The SuperNode turns this exception into an error reply; the server then counts a failure.
    full = initial_head(cfg, 192, 10).state_dict()
    ctx = context(cfg)
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        app(train_message(full), ctx)
