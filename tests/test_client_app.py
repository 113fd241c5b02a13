"""The ClientApp called directly with hand-built Messages (no simulation engine): the
identity query, and training tasks as the round engine sends them."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.client_app import app
from fedsparse.config import RunConfig
from fedsparse.engine.client import run_task
from fedsparse.model.ist import partition, slice_state, worker_indices
from fedsparse.protocol import (
    ARRAYS_KEY,
    BYTES_RECEIVED_KEY,
    BYTES_SENT_KEY,
    CACHE_HIT_KEY,
    CLIENT_ID_KEY,
    CLIENT_TASK_KEY,
    CONFIG_KEY,
    EXTRACT_SECONDS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PEAK_RSS_KEY,
    TRAIN_LOSS_KEY,
    wire_bytes,
)
from fedsparse.task import initial_head
from strategies.flower_internals import set_task_identity


@pytest.fixture(autouse=True)
def task_identity():
    set_task_identity()


@pytest.fixture
def cfg(tmp_path):
    return RunConfig(hidden="32,32", cache_dir=str(tmp_path / "cache"), local_steps=5, num_clients=50, clients_per_round=2)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """A feature cache the tests below share (partition 5 is extracted once)."""
    return str(tmp_path_factory.mktemp("client-app-cache"))


def context(cfg: RunConfig, partition_id: int = 3, num_partitions: int = 50) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=cfg.to_run_config(),
    )


def round_config(server_round: int = 1) -> dict:
    """The per-round settings the round engine puts in every training task."""
    return {"server-round": server_round, "local-steps": 5, "lr": 1e-3, "batch-size": 16}


def train_message(state: dict, server_round: int = 1, **changes) -> Message:
    conf = ConfigRecord({k: v for k, v in {**round_config(server_round), **changes}.items() if v is not None})
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


def test_client_answers_the_identity_query_with_its_partition(cfg):
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    reply = app(query, context(cfg, partition_id=3, num_partitions=50))
    assert not reply.has_error(), reply.error
    m = reply.content[METRICS_KEY]
    assert m[CLIENT_ID_KEY] == 3 and m[NUM_PARTITIONS_KEY] == 50  # its partition, not its node id (7)
    assert reply.metadata.src_node_id == 7 and reply.metadata.reply_to_message_id == query.metadata.message_id


def test_client_without_partition_config_cannot_identify(cfg):
    ctx = context(cfg)
    ctx.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        app(Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY), ctx)


def test_client_app_is_the_engines_client_task_on_its_partition(cfg, shared_cache):
    # the same task run by the plain driver (run_task) gives the same arrays, bit for bit
    cfg = cfg.replace(cache_dir=shared_cache)
    full = initial_head(cfg, 192, 10).state_dict()
    sub = slice_state(full, worker_indices(partition([32, 32], 2, seed=0), 0))
    reply = app(train_message(sub, server_round=3), context(cfg, partition_id=5))
    got = reply.content[ARRAYS_KEY].to_torch_state_dict()
    want, n, metrics = run_task(cfg, 5, 50, sub, round_config(3))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] == n
    assert reply.content[METRICS_KEY][TRAIN_LOSS_KEY] == metrics[TRAIN_LOSS_KEY]


def test_a_task_reports_its_own_peak_memory_not_the_processs(cfg, shared_cache):
    """A simulated actor runs client after client in one process: the peak RSS a task reports is
    the one reached during that task (VmHWM reset when it starts), not an earlier client's."""
    from fedsparse.processes import peak_rss_bytes, rss

    cfg = cfg.replace(cache_dir=shared_cache)
    full = initial_head(cfg, 192, 10).state_dict()
    sub = slice_state(full, worker_indices(partition([32, 32], 2, seed=0), 0))
    run_task(cfg, 5, 50, sub, round_config(3))  # features cached, imports done
    big = bytearray(600 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # an earlier client's 600 MB, touched, then freed
    del big
    assert peak_rss_bytes() >= rss() + 500 * 2**20
    _, _, metrics = run_task(cfg, 5, 50, sub, round_config(3))
    assert metrics[PEAK_RSS_KEY] < rss() + 300 * 2**20


def test_round_settings_come_from_the_message(cfg, shared_cache):
    cfg = cfg.replace(cache_dir=shared_cache)
    full = initial_head(cfg, 192, 10).state_dict()
    with pytest.raises(ValueError, match="lacks 'lr'"):
        app(train_message(full, lr=None), context(cfg))
    with pytest.raises(ValueError, match="unknown client task 'evaluate'"):
        app(train_message(full, **{CLIENT_TASK_KEY: "evaluate"}), context(cfg))
    # local-steps from the message, not the run config (cfg has 5): 0 steps leave the head as sent
    reply = app(train_message(full, **{"local-steps": 0}), context(cfg, partition_id=5))
    got = reply.content[ARRAYS_KEY].to_torch_state_dict()
    assert all(torch.equal(got[k], full[k]) for k in full)


# --- a node with its own images (node config data-dir) ------------------------------


def own_context(cfg: RunConfig, node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_run_config())


def test_node_with_its_own_images_identifies_and_trains(cfg, tmp_path, make_image_tree):
    from fedsparse.protocol import OWN_DATA_KEY
    from fedsparse.task import client_images

    data = make_image_tree(tmp_path / "camera", {"": 3}, classes=("dog", "cat"))  # 2 of the run's 10 classes
    node = {"data-dir": str(data), "client-id": 4}
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    m = app(query, own_context(cfg, node)).content[METRICS_KEY]
    assert m[CLIENT_ID_KEY] == 4 and m[OWN_DATA_KEY] == 1
    anonymous = app(query, own_context(cfg, {"data-dir": str(data)})).content[METRICS_KEY]
    assert CLIENT_ID_KEY not in anonymous and anonymous[OWN_DATA_KEY] == 1  # the server knows it by its node id

    mine = client_images(cfg, 0, 1, str(data))
    assert mine.classes[:4] == ("airplane", "automobile", "bird", "cat")  # the bundled sample's class list
    assert sorted(set(mine.labels.tolist())) == [3, 5]  # cat and dog at the run's indices, not 0 and 1
    full = initial_head(cfg, 192, 10).state_dict()
    reply = app(train_message(full), own_context(cfg, node))
    assert not reply.has_error(), reply.error
    assert reply.content[METRICS_KEY][NUM_EXAMPLES_KEY] == 6
    got = reply.content[ARRAYS_KEY].to_torch_state_dict()
    want, _, _ = run_task(cfg, 4, 1, full, round_config(1), data_dir=str(data))
    assert all(torch.equal(got[k], want[k]) for k in want)
    # without a client-id its batches are seeded by its data: the same images give the same arrays
    a = app(train_message(full), own_context(cfg, {"data-dir": str(data)})).content[ARRAYS_KEY].to_torch_state_dict()
    b, _, _ = run_task(cfg, None, 1, full, round_config(1), data_dir=str(data))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_node_with_an_unknown_class_folder_fails_in_one_line(cfg, tmp_path, make_image_tree):
    # Flower turns the exception into an error reply, which the server counts as failed_error
    # (tests/test_faults.py: a raising ClientApp in the simulation)
    data = make_image_tree(tmp_path / "camera", {"": 1}, classes=("cat", "zebra"))
    full = initial_head(cfg, 192, 10).state_dict()
    with pytest.raises(ValueError, match="class folder 'zebra', which is not one of the run's 10 classes") as err:
        app(train_message(full), own_context(cfg, {"data-dir": str(data), "client-id": 1}))
    assert "\n" not in str(err.value)
