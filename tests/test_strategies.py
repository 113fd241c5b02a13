"""The Flower side of the round engine: ``AlgorithmStrategy`` (identity query, tasks as
Messages, decoded and checked replies, bytes) over in-process Grids, with hand-built replies
(no simulation), and the progress shown while a round waits.

The algorithms themselves (``fedsparse.algorithms``) are Flower-free; here they are driven
through the adapter the ServerApp uses, with a real ``RoundEngine`` on tiny image features.
"""

from __future__ import annotations

import io
import itertools
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict

from fedsparse.algorithms import make_algorithm
from fedsparse.config import RunConfig
from fedsparse.engine.metrics import RoundMetrics, RunMetrics
from fedsparse.engine.rounds import RoundEngine, sample_clients
from fedsparse.model.head import MLPHead
from fedsparse.model.ist import slice_state
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, wire_bytes
from strategies.adapter import AlgorithmStrategy
from strategies.flower_internals import set_task_identity
from strategies.in_process import LocalGrid, in_process_run

pytestmark = pytest.mark.filterwarnings("ignore:encoder 'builtin-random' has random weights:UserWarning")

OUTPUT_BIAS = "layers.2.bias"  # of a head with two hidden layers: averaged over every reply, never sliced


@pytest.fixture(autouse=True)
def task_identity():
    # flwr 1.42 refuses to build a Message outside a run unless a task identity is set
    set_task_identity()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny image tree (3 classes, train/ and test/) and a feature cache, once per module."""
    from PIL import Image

    root = tmp_path_factory.mktemp("strategies-data")
    rng = np.random.default_rng(0)
    for split, per_class in {"train": 10, "test": 2}.items():
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / c / f"{i:03d}.png")
    return root, tmp_path_factory.mktemp("strategies-cache")


@pytest.fixture
def make_cfg(data, tmp_path):
    """``make_cfg(**changes)``: a tiny run (head 192 -> 10 -> 11 -> 3), each in its own out-dir."""
    root, cache = data
    counter = itertools.count()

    def make(**changes) -> RunConfig:
        # The authors' IST (its stitching is what these tests check; the skew variant's merge is
        # tested in test_algorithms.py), and no update bound: hand-built replies move every weight
        # by 1.0, far more than training does (the bound is tested in test_engine/test_hostile).
        base = dict(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="10,11",
                    num_clients=10, clients_per_round=3, num_rounds=3, local_steps=3, batch_size=4,
                    cache_dir=str(cache), out_dir=str(tmp_path / f"run{next(counter)}"),
                    ist_variant="authors", update_bound=0.0)
        base.update(changes)
        return RunConfig(**base)

    return make


def started(cfg: RunConfig, grid=None, state: dict | None = None, **kw):
    """(engine, strategy, grid) after ``engine.start``; ``state`` replaces the head (for
    configure-only checks on heads of other sizes)."""
    engine = RoundEngine(cfg, report=lambda s: None)
    grid = grid if grid is not None else LocalGrid(cfg)
    strategy = AlgorithmStrategy(engine, grid, "test", **kw)
    engine.start(strategy)
    if state is not None:
        engine.state = state
    return engine, strategy, grid


def configure(strategy: AlgorithmStrategy, server_round: int = 1) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(strategy.engine.state), ConfigRecord(),
                                         strategy.grid))


def tasks_of(strategy: AlgorithmStrategy, msgs: list[Message]):
    """The round's tasks, in message order (each checked to go to its client's node)."""
    tasks = list(strategy._tasks)
    assert [m.metadata.dst_node_id for m in msgs] == [strategy.node_of[t.client] for t in tasks]
    return tasks


def big_head(in_dim: int) -> dict:
    return MLPHead(in_dim, (1024, 1024), 10).state_dict()


def reply_to(msg: Message, state: dict, num_examples: int = 10, **metrics) -> Message:
    content = RecordDict(
        {ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: num_examples, **metrics})}
    )
    return Message(content=content, reply_to=msg)


def sent(msg: Message) -> dict:
    return msg.content[ARRAYS_KEY].to_torch_state_dict()


def perturbed(state: dict, delta: float = 1.0) -> dict:
    return {k: v + delta for k, v in state.items()}


def last_round(engine: RoundEngine) -> RoundMetrics:
    return engine.metrics.rounds[-1]


class TestIdentity:
    def test_nodes_are_paired_with_clients_by_partition_id_not_node_id(self, make_cfg):
        cfg = make_cfg()
        engine, strategy, grid = started(cfg)
        clients = strategy.clients(cfg.clients_per_round)
        assert clients == list(range(cfg.num_clients))
        assert strategy.client_of == grid.partition_of
        assert all(node != client for node, client in strategy.client_of.items())
        assert {c: n for n, c in strategy.client_of.items()} == strategy.node_of

    def test_a_node_that_cannot_say_is_refused_and_one_that_claims_a_taken_id_is_known_by_its_node_id(self, make_cfg):
        cfg = make_cfg()
        odd = 2**40

        class OddGrid(LocalGrid):
            """Node odd answers its query with an error; node odd + 1 claims partition 0 too (both
            ids sort after every LocalGrid node, so partition 0's own node answers first)."""

            def get_node_ids(self):
                return [*super().get_node_ids(), odd, odd + 1]

            def send_and_receive(self, messages, *, timeout=None):
                out = []
                for m in messages:
                    node = m.metadata.dst_node_id
                    if node == odd:
                        out.append(Message(Error(code=2, reason="no partition-id"), reply_to=m))
                    elif node == odd + 1:
                        out.append(Message(RecordDict({METRICS_KEY: MetricRecord({"partition-id": 0})}), reply_to=m))
                    else:
                        out.append(self.client_app(m, self.context(node)))
                return out

        engine, strategy, grid = started(cfg, OddGrid(cfg))
        clients = strategy.clients(cfg.clients_per_round)
        assert odd not in strategy.client_of and "no partition-id" in strategy.refused[odd]
        engine.finish()  # the refusal is in metrics.json, with its reason
        refused = RunMetrics.load(cfg.out_dir).refused_nodes
        assert list(refused) == [str(odd)] and "no partition-id" in refused[str(odd)]
        assert odd not in clients and strategy.client_of[odd + 1] == odd + 1 and odd + 1 in clients
        assert grid.partition_of[strategy.node_of[0]] == 0


class TestISTConfigure:
    def test_each_client_gets_only_its_slice(self, make_cfg):
        engine, strategy, grid = started(make_cfg(clients_per_round=3, seed=5, local_steps=3))
        state = engine.state
        msgs = configure(strategy)
        assert len(msgs) == 3
        assert len({m.metadata.dst_node_id for m in msgs}) == 3
        seen_h1 = []
        for task, m in zip(tasks_of(strategy, msgs), msgs):
            assert grid.partition_of[m.metadata.dst_node_id] == task.client  # its node, paired by partition
            sub = sent(m)
            expected = slice_state(state, task.meta)
            assert sub.keys() == expected.keys()
            for k in sub:
                assert torch.equal(sub[k], expected[k]), k
            conf = m.content[CONFIG_KEY]
            assert conf["server-round"] == 1 and conf["num-subnets"] == 3 and conf["local-steps"] == 3
            assert conf["subnet"] == task.group
            seen_h1.append(task.meta[0])
        allh1 = torch.cat(seen_h1).sort().values
        assert torch.equal(allh1, torch.arange(10))  # disjoint and covering

    @pytest.mark.parametrize("k", [2, 3, 4, 7])
    @pytest.mark.parametrize("in_dim", [768, 192])
    def test_slice_bytes_at_most_one_kth_of_full_plus_one_percent(self, make_cfg, k, in_dim):
        state = big_head(in_dim)
        full = wire_bytes(ArrayRecord(state))
        _, strategy, _ = started(make_cfg(num_clients=k, clients_per_round=k), state=state)
        msgs = configure(strategy)
        assert len(msgs) == k
        for m in msgs:
            received = wire_bytes(m.content[ARRAYS_KEY])
            assert received <= full / k * 1.01, (received, full / k)

    def test_partitions_change_between_rounds_and_repeat_with_seed(self, make_cfg):
        cfg = make_cfg(num_clients=4, clients_per_round=2, seed=1)
        a, b = started(cfg)[0], started(cfg.replace(out_dir=cfg.out_dir + "-b"))[0]

        def plan(engine, server_round):
            return [(t.client, [ix.tolist() for ix in t.meta]) for t in engine.plan_round(server_round, range(4))]

        first = plan(a, 1)
        assert plan(b, 1) == first  # same seed, same round: same clients, same partition
        second = plan(a, 2)
        assert [ix for _, ixs in second for ix in ixs] != [ix for _, ixs in first for ix in ixs]
        assert [c for c, _ in first] == sample_clients(1, 1, range(4), 2)  # sampling is the engine's, by seed


class TestISTAggregate:
    @pytest.fixture(autouse=True)
    def round_one(self, make_cfg):
        self.engine, self.strategy, self.grid = started(make_cfg(num_clients=3, clients_per_round=3, seed=2))
        self.state = {k: v.clone() for k, v in self.engine.state.items()}
        self.msgs = configure(self.strategy)
        self.tasks = tasks_of(self.strategy, self.msgs)

    def test_stitches_every_reply_back_by_index(self):
        replies = [reply_to(m, perturbed(sent(m))) for m in self.msgs]
        arrays, metrics = self.strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        assert all(torch.equal(new[k], self.engine.state[k]) for k in new)  # what the engine now holds
        for task, m in zip(self.tasks, self.msgs):
            got = slice_state(new, task.meta)
            want = perturbed(sent(m))
            for k in got:
                if k != OUTPUT_BIAS:
                    assert torch.allclose(got[k], want[k]), k
        assert torch.allclose(new[OUTPUT_BIAS], self.state[OUTPUT_BIAS] + 1)
        entry = last_round(self.engine)
        assert entry.clients == 3 and entry.failures == 0 and entry.sampled == 3 and entry.subnets == 3
        assert metrics["failures"] == 0

    def test_round_metric_record_counts_the_examples_used(self):
        # Flower's Strategy API returns the round's MetricRecord; num-examples means examples
        replies = [reply_to(m, perturbed(sent(m)), 10) for m in self.msgs]
        _, metrics = self.strategy.aggregate_train(1, replies)
        assert metrics[NUM_EXAMPLES_KEY] == 30, dict(metrics)

    def test_malformed_and_failed_replies_leave_their_slice_unchanged(self):
        good, bad_shape, failed = self.msgs
        wrong = sent(bad_shape)
        wrong["layers.0.weight"] = torch.zeros(1, 1)
        replies = [
            reply_to(good, perturbed(sent(good))),
            reply_to(bad_shape, perturbed(wrong)),
            Message(Error(code=1, reason="client crashed"), reply_to=failed),
        ]
        arrays, metrics = self.strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        for task in self.tasks[1:]:
            kept = slice_state(new, task.meta)
            orig = slice_state(self.state, task.meta)
            for k in kept:
                if k != OUTPUT_BIAS:
                    assert torch.equal(kept[k], orig[k]), k
        entry = last_round(self.engine)
        assert entry.failures == 2 and entry.clients == 1 and metrics["failures"] == 2
        assert entry.failed_invalid == 1 and entry.failed_error == 1 and entry.rejected == {"shape": 1}
        assert all(torch.isfinite(v).all() for v in new.values())

    def test_nan_reply_is_dropped(self):
        m = self.msgs[0]
        state = sent(m)
        state["layers.1.weight"][0, 0] = float("nan")
        arrays, metrics = self.strategy.aggregate_train(1, [reply_to(m, state)])
        entry = last_round(self.engine)
        assert entry.failures == 3 and metrics["failures"] == 3  # the NaN reply + two that never answered
        assert entry.failed_invalid == 1 and entry.failed_lost == 2 and entry.rejected == {"non-finite": 1}
        assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())

    def test_reply_without_num_examples_is_dropped(self):
        m = self.msgs[0]
        bare = Message(content=RecordDict({ARRAYS_KEY: ArrayRecord(perturbed(sent(m)))}), reply_to=m)
        arrays, _ = self.strategy.aggregate_train(1, [bare])
        entry = last_round(self.engine)
        assert entry.clients == 0 and entry.rejected == {"num-examples": 1}
        for k, v in arrays.to_torch_state_dict().items():
            assert torch.equal(v, self.state[k])

    def test_no_replies_leaves_model_unchanged(self):
        arrays, metrics = self.strategy.aggregate_train(1, [])
        for k, v in arrays.to_torch_state_dict().items():
            assert torch.equal(v, self.state[k])
        assert metrics["failures"] == 3 and last_round(self.engine).failed_lost == 3

    def test_bytes_are_recorded(self):
        replies = [reply_to(m, sent(m)) for m in self.msgs]
        exchange = self.strategy.outcomes(self.tasks, replies)
        assert len(exchange.bytes_down) == 3 and len(exchange.bytes_up) == 3
        assert exchange.bytes_down == [wire_bytes(m) for m in self.msgs]
        assert exchange.bytes_up == [wire_bytes(r) for r in replies]
        self.strategy.aggregate_train(1, replies)
        entry = last_round(self.engine)
        assert entry.bytes_down_total == sum(exchange.bytes_down) and entry.bytes_up_total == sum(exchange.bytes_up)
        assert entry.bytes_down_per_client == pytest.approx(sum(exchange.bytes_down) / 3)

    def test_replies_from_nodes_without_a_task_are_ignored(self):
        stranger = Message(RecordDict(), dst_node_id=424242, message_type=MessageType.TRAIN)
        replies = [reply_to(m, perturbed(sent(m))) for m in self.msgs]
        replies.append(reply_to(stranger, perturbed(sent(self.msgs[0]))))
        replies.append(reply_to(self.msgs[0], perturbed(sent(self.msgs[0]), 5.0)))  # a second reply of one node
        self.strategy.aggregate_train(1, replies)
        entry = last_round(self.engine)
        assert entry.clients == 3 and entry.failures == 0
        assert torch.allclose(self.engine.state[OUTPUT_BIAS], self.state[OUTPUT_BIAS] + 1)  # the first reply counts


class TestISTWidthScaling:
    def test_slices_go_out_scaled_and_come_back_unscaled(self, make_cfg):
        engine, strategy, _ = started(make_cfg(num_clients=2, clients_per_round=2, seed=3, ist_scaling="width"))
        state = {k: v.clone() for k, v in engine.state.items()}
        msgs = configure(strategy)
        for task, m in zip(tasks_of(strategy, msgs), msgs):
            index = task.meta
            sub = sent(m)
            want = slice_state(state, index, "width")
            assert all(torch.equal(sub[k], want[k]) for k in sub)
            assert torch.allclose(sub["layers.1.weight"], slice_state(state, index)["layers.1.weight"] * 10 / len(index[0]))
        # clients that return what they got leave the head unchanged
        arrays, _ = strategy.aggregate_train(1, [reply_to(m, sent(m)) for m in msgs])
        new = arrays.to_torch_state_dict()
        assert all(torch.allclose(new[k], state[k], atol=1e-6) for k in state)

    def test_unknown_scaling_is_rejected(self, make_cfg):
        with pytest.raises(ValueError, match="ist-scaling 'dropout'; valid choices: none, width"):
            make_cfg(ist_scaling="dropout")


class TestFedAvg:
    def test_sends_full_model_and_averages(self, make_cfg):
        engine, strategy, _ = started(make_cfg(strategy="fedavg", num_clients=3, clients_per_round=2, seed=0))
        state = {k: v.clone() for k, v in engine.state.items()}
        msgs = configure(strategy)
        assert len(msgs) == 2
        for m in msgs:
            got = sent(m)
            assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
        assert msgs[0].content is msgs[1].content  # one RecordDict for every client of the group
        replies = [reply_to(msgs[0], perturbed(state, 1.0), 10), reply_to(msgs[1], perturbed(state, 4.0), 30)]
        arrays, _ = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        for k in state:
            assert torch.allclose(new[k], state[k] + 3.25), k  # (1*10 + 4*30) / 40
        assert last_round(engine).clients == 2 and last_round(engine).subnets == 1

    def test_drops_malformed_reply_before_averaging(self, make_cfg):
        engine, strategy, _ = started(make_cfg(strategy="fedavg", num_clients=2, clients_per_round=2))
        state = {k: v.clone() for k, v in engine.state.items()}
        msgs = configure(strategy)
        broken = dict(state)
        broken.pop("layers.0.bias")
        replies = [reply_to(msgs[0], perturbed(state, 2.0)), reply_to(msgs[1], broken)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        assert all(torch.allclose(new[k], state[k] + 2.0) for k in state)
        assert metrics["failures"] == 1 and last_round(engine).rejected == {"arrays": 1}

    def test_ist_sends_fewer_bytes_than_fedavg(self, make_cfg):
        state = big_head(768)
        ist = configure(started(make_cfg(num_clients=4, clients_per_round=2), state=state)[1])
        fed = configure(started(make_cfg(strategy="fedavg", num_clients=4, clients_per_round=2), state=state)[1])
        assert max(map(wire_bytes, ist)) <= min(map(wire_bytes, fed)) / 2


class TestSampling:
    def test_goes_on_with_connected_clients_after_timeout(self, make_cfg):
        cfg = make_cfg(num_clients=3, clients_per_round=3, round_timeout=0.2)
        grid = LocalGrid(cfg)
        grid.partition_of = dict(list(grid.partition_of.items())[:2])  # only two nodes connect
        _, strategy, _ = started(cfg, grid)
        msgs = configure(strategy)
        assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(grid.partition_of)
        assert all(m.content[CONFIG_KEY]["num-subnets"] == 2 for m in msgs)

    def test_no_client_at_all_is_an_error(self, make_cfg):
        cfg = make_cfg(num_clients=2, clients_per_round=2, round_timeout=0.2)
        grid = LocalGrid(cfg)
        grid.partition_of = {}
        _, strategy, _ = started(cfg, grid)
        with pytest.raises(RuntimeError, match="no client connected"):
            configure(strategy)
        with pytest.raises(RuntimeError, match="no client is available"):
            strategy.engine.plan_round(1, [])


class TestSubnetsPerRound:
    def test_group_members_get_the_same_slice_and_groups_cover_the_hidden_layer(self, make_cfg):
        _, strategy, _ = started(make_cfg(clients_per_round=6, seed=1, subnets_per_round=2))
        msgs = configure(strategy)
        tasks = tasks_of(strategy, msgs)
        assert len(msgs) == 6
        by_subnet: dict[int, list] = {}
        for task, m in zip(tasks, msgs):
            conf = m.content[CONFIG_KEY]
            assert conf["num-subnets"] == 2
            by_subnet.setdefault(conf["subnet"], []).append((task, m))
        assert sorted(len(v) for v in by_subnet.values()) == [3, 3]
        for members in by_subnet.values():
            first = sent(members[0][1])
            for _, m in members[1:]:
                other = sent(m)
                assert all(torch.equal(first[k], other[k]) for k in first)
                assert m.content is members[0][1].content  # built once per group
        h1 = torch.cat([ms[0][0].meta[0] for ms in by_subnet.values()])
        assert torch.equal(h1.sort().values, torch.arange(10))

    @pytest.mark.parametrize("k, g", [(8, 1), (8, 2), (8, 4), (8, 8)])
    def test_bytes_per_client_follow_the_subnet_size(self, make_cfg, k, g):
        state = big_head(192)
        full = wire_bytes(ArrayRecord(state))
        _, strategy, _ = started(make_cfg(num_clients=k, clients_per_round=k, subnets_per_round=g), state=state)
        msgs = configure(strategy)
        for m in msgs:
            assert wire_bytes(m.content[ARRAYS_KEY]) <= full / g * 1.01
        if g > 1:  # and not much less: the slice of one subnet out of g
            assert min(wire_bytes(m.content[ARRAYS_KEY]) for m in msgs) >= full / g**2
        assert strategy.outcomes(tasks_of(strategy, msgs), []).bytes_down == [wire_bytes(m) for m in msgs]

    def test_default_is_one_subnet_per_client_and_identical_to_plain_ist(self, make_cfg):
        cfg = make_cfg(num_clients=5, clients_per_round=3, seed=4)
        ma = configure(started(cfg)[1])
        mb = configure(started(cfg.replace(subnets_per_round=3, out_dir=cfg.out_dir + "-b"))[1])
        assert [m.content[CONFIG_KEY]["subnet"] for m in ma] == [0, 1, 2]
        for x, y in zip(ma, mb):
            assert x.metadata.dst_node_id == y.metadata.dst_node_id
            sx, sy = sent(x), sent(y)
            assert all(torch.equal(sx[k], sy[k]) for k in sx)

    def test_one_subnet_aggregates_like_fedavg(self, make_cfg):
        cfg = make_cfg(num_clients=3, clients_per_round=3, seed=0)
        ist_engine, ist, _ = started(cfg.replace(subnets_per_round=1))
        fed_engine, fed, _ = started(cfg.replace(strategy="fedavg", out_dir=cfg.out_dir + "-fedavg"))
        state = {k: v.clone() for k, v in ist_engine.state.items()}
        assert all(torch.equal(state[k], fed_engine.state[k]) for k in state)  # the same initial head
        mi, mf = configure(ist), configure(fed)
        assert [m.metadata.dst_node_id for m in mi] == [m.metadata.dst_node_id for m in mf]
        for m in mi:  # the "slice" of the only subnet is the whole head
            got = sent(m)
            assert all(torch.equal(got[k], state[k]) for k in state)
        gen = torch.Generator().manual_seed(0)
        trained = [{k: v + torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(3)]
        examples = [10, 25, 5]
        ai, _ = ist.aggregate_train(1, [reply_to(m, s, n) for m, s, n in zip(mi, trained, examples)])
        af, _ = fed.aggregate_train(1, [reply_to(m, s, n) for m, s, n in zip(mf, trained, examples)])
        si, sf = ai.to_torch_state_dict(), af.to_torch_state_dict()
        for k in state:
            assert torch.allclose(si[k], sf[k], atol=1e-6), k

    def test_a_whole_failed_group_leaves_its_subnet_unchanged(self, make_cfg):
        engine, strategy, _ = started(make_cfg(num_clients=4, clients_per_round=4, seed=3, subnets_per_round=2))
        state = {k: v.clone() for k, v in engine.state.items()}
        msgs = configure(strategy)
        tasks = tasks_of(strategy, msgs)
        replies, raised = [], False
        for task, m in zip(tasks, msgs):
            if m.content[CONFIG_KEY]["subnet"] == 0:
                replies.append(reply_to(m, perturbed(sent(m), 2.0)))
            elif not raised:  # subnet 1: one member raised ...
                replies.append(Message(Error(code=1, reason="boom"), reply_to=m))
                raised = True
            else:  # ... and the other sent NaN
                replies.append(reply_to(m, perturbed(sent(m), float("nan"))))
        arrays, metrics = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        entry = last_round(engine)
        assert metrics["failures"] == 2 and entry.failures == 2 and entry.clients == 2
        assert entry.failed_error == 1 and entry.failed_invalid == 1
        for task in tasks:
            got, orig = slice_state(new, task.meta), slice_state(state, task.meta)
            for k in got:
                if k != OUTPUT_BIAS:
                    assert torch.allclose(got[k], orig[k] + (2.0 if task.group == 0 else 0.0)), (task.client, k)
        assert all(torch.isfinite(v).all() for v in new.values())

    def test_subnets_beyond_clients_are_rejected(self, make_cfg):
        with pytest.raises(ValueError, match="subnets-per-round"):
            make_cfg(clients_per_round=2, subnets_per_round=3)

    def test_subnets_are_capped_at_the_clients_of_the_round(self, make_cfg):
        ist = make_algorithm(make_cfg(clients_per_round=4, subnets_per_round=4))
        tasks = ist.plan(1, MLPHead(12, (10, 11), 3).state_dict(), [7, 8])
        assert [t.config["num-subnets"] for t in tasks] == [2, 2] and [t.group for t in tasks] == [0, 1]


class QueueGrid:
    """A Grid with push/pull: each pull releases at most ``per_pull`` replies; nodes in
    ``silent`` never answer; ``reply`` builds a node's reply. Identity queries are answered
    by the real ClientApp (node ``nodes[i]`` is partition ``i``)."""

    def __init__(self, nodes, reply, per_pull=1, silent=()):
        self.nodes = list(nodes)
        self.reply, self.per_pull, self.silent = reply, per_pull, set(silent)
        self.ready, self.pulls = [], 0

    def get_node_ids(self):
        return list(self.nodes)

    def answer_query(self, m):
        from clients.client_app import app

        node = m.metadata.dst_node_id
        ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                      node_config={"partition-id": self.nodes.index(node), "num-partitions": len(self.nodes)})
        return app(m, ctx)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY, "train messages go through push/pull"
            out.append(self.answer_query(m))
        return out

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.ready)}-{i}-{id(m)}"
            ids.append(m.metadata.message_id)
            if m.metadata.message_type == MessageType.QUERY:
                self.ready.append(self.answer_query(m))
            elif m.metadata.dst_node_id not in self.silent:
                self.ready.append(self.reply(m))
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        out = [r for r in self.ready if r.metadata.reply_to_message_id in wanted][: self.per_pull]
        for r in out:
            self.ready.remove(r)
        return out


def _any_reply(m):
    return reply_to(m, {"w": torch.zeros(2)})


class TestPollingGrid:
    def test_replies_are_reported_as_they_arrive(self):
        from strategies.progress import PollingGrid

        calls = []
        grid = QueueGrid([1, 2, 3], _any_reply)
        polling = PollingGrid(grid, lambda *a: calls.append(a), poll=0.001)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
        replies = list(polling.send_and_receive(msgs, timeout=5))
        assert len(replies) == 3
        assert calls == [(0, 3, 0, False), (1, 3, 0, False), (2, 3, 0, False), (3, 3, 0, False), (3, 3, 0, True)]
        assert list(polling.get_node_ids()) == [1, 2, 3]

    def test_timeout_returns_what_arrived_and_counts_errors(self):
        from strategies.progress import PollingGrid

        calls = []

        def reply(m):
            return Message(Error(code=1, reason="x"), reply_to=m)

        grid = QueueGrid([1, 2, 3], reply, per_pull=5, silent={3})
        polling = PollingGrid(grid, lambda *a: calls.append(a), poll=0.01, max_poll=0.01)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
        replies = list(polling.send_and_receive(msgs, timeout=0.2))
        assert len(replies) == 2 and calls[:2] == [(0, 3, 0, False), (2, 3, 2, False)] and calls[-1] == (2, 3, 2, True)
        assert grid.pulls >= 5  # it kept polling until the deadline

    def test_the_wait_between_pulls_doubles_while_nothing_arrives(self, monkeypatch):
        """In deployment nothing wakes the wait: it doubles from ``poll`` to ``max_poll`` while
        nothing arrives and starts again from ``poll`` after a reply, so a round waiting for slow
        devices pulls from the SuperLink a few times a second, not 100."""
        from strategies import progress
        from strategies.progress import PollingGrid

        grid = QueueGrid([1, 2], _any_reply, silent={1, 2})
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
        waits = []

        class Recorder:  # never set: records each wait instead of sleeping it
            def clear(self):
                pass

            def wait(self, seconds):
                waits.append(round(seconds, 9))
                if len(waits) in (7, 9):  # a reply is there for the 8th pull, the other for the 10th
                    grid.ready.append(_any_reply(msgs[len(waits) == 9]))

        monkeypatch.setattr(progress, "REPLY_STORED", Recorder())
        replies = list(PollingGrid(grid, poll=0.01, max_poll=0.08).send_and_receive(msgs, timeout=None))
        assert len(replies) == 2 and grid.pulls == 10
        assert waits == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.08, 0.01, 0.02]

    def test_nothing_to_send_returns_at_once(self):
        from strategies.progress import PollingGrid

        calls = []
        assert list(PollingGrid(QueueGrid([], None), lambda *a: calls.append(a)).send_and_receive([], timeout=9)) == []
        assert calls == []

    def test_a_stopping_run_stops_waiting(self):
        from strategies.progress import PollingGrid

        calls, stop = [], threading.Event()
        grid = QueueGrid([1, 2], _any_reply, silent={2})
        polling = PollingGrid(grid, lambda *a: (calls.append(a), stop.set()), poll=0.01, stop=stop)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)]
        t0 = time.monotonic()
        replies = list(polling.send_and_receive(msgs, timeout=30))
        assert time.monotonic() - t0 < 5 and len(replies) == 1 and calls[-1] == (1, 2, 0, True)


    def test_a_stored_reply_wakes_the_wait_at_once(self):
        """With a poll of 60 s, only REPLY_STORED (set by the simulation's LinkState when it
        stores a reply) can end the wait within seconds."""
        from strategies.progress import REPLY_STORED, PollingGrid

        grid = QueueGrid([1], _any_reply, silent={1})
        polling = PollingGrid(grid, poll=60.0)
        msg = Message(RecordDict(), dst_node_id=1, message_type="train")

        def answer_later():
            time.sleep(0.3)
            grid.ready.append(_any_reply(msg))
            REPLY_STORED.set()

        t = threading.Thread(target=answer_later)
        t.start()
        t0 = time.monotonic()
        replies = list(polling.send_and_receive([msg], timeout=120))
        t.join()
        assert len(replies) == 1 and time.monotonic() - t0 < 30

    def test_with_the_stored_replies_feed_a_pull_asks_only_for_the_replies_stored(self, monkeypatch):
        """Flower's pull_messages checks every id it is asked about: asking for all K pending ids
        at every reply cost O(K^2) per round. Fed the ids the LinkState stored, the first pull
        asks for all, the others only for what arrived."""
        from strategies import progress
        from strategies.progress import PollingGrid, StoredReplies

        feed = StoredReplies()
        feed.active = True
        monkeypatch.setattr(progress, "STORED_REPLIES", feed)
        monkeypatch.setattr(progress, "TICK_SECONDS", 600.0)  # no periodic full pull in this test
        nodes = list(range(1, 7))
        grid = QueueGrid(nodes, _any_reply, per_pull=6, silent=set(nodes))
        asked, pull = [], grid.pull_messages
        grid.pull_messages = lambda ids: (asked.append(set(ids)), pull(ids))[1]
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]

        def answer():
            time.sleep(0.2)  # after the push
            for m in msgs:
                grid.ready.append(_any_reply(m))
                feed.add(m.metadata.message_id)
                progress.REPLY_STORED.set()
                time.sleep(0.02)

        t = threading.Thread(target=answer)
        t.start()
        replies = list(PollingGrid(grid, poll=60.0).send_and_receive(msgs, timeout=60))
        t.join()
        assert len(replies) == 6
        assert len(asked[0]) == 6 and sum(len(a) for a in asked[1:]) == 6  # each stored reply asked for once


class TestProgress:
    def _run(self, make_cfg, nodes, rounds=2, **kw):
        grid_kw = {k: kw.pop(k) for k in ("per_pull", "silent") if k in kw}
        cfg = make_cfg(num_clients=len(nodes), num_rounds=rounds, round_timeout=0.3, **kw)
        grid = QueueGrid(nodes, lambda m: reply_to(m, perturbed(sent(m), 0.1)), **grid_kw)
        seen = []
        engine = RoundEngine(cfg, report=lambda s: None)
        metrics = engine.run(AlgorithmStrategy(engine, grid, "test", on_replies=lambda *a: seen.append(a)))
        return seen, metrics

    def test_run_reports_replies_per_round_through_the_polling_grid(self, make_cfg):
        seen, metrics = self._run(make_cfg, [1, 2, 3, 4], clients_per_round=3, seed=0)
        assert [a for a in seen if a[-1]] == [(1, 3, 3, 0, True), (2, 3, 3, 0, True)]
        assert [a[:3] for a in seen if not a[-1]] == [(r, d, 3) for r in (1, 2) for d in range(4)]
        assert [r.clients for r in metrics.rounds] == [3, 3] and metrics.finished

    def test_fedavg_reports_too_and_lost_clients_time_out(self, make_cfg):
        seen, metrics = self._run(make_cfg, [1, 2], rounds=1, silent={2}, strategy="fedavg", clients_per_round=2)
        assert seen[-1] == (1, 1, 2, 0, True)
        assert metrics.rounds[-1].failed_lost == 1 and metrics.rounds[-1].failures == 1

    def test_replies_are_decoded_and_checked_as_they_arrive_with_the_same_outcome(self, make_cfg, monkeypatch):
        """Each reply is sized, decoded and checked while the round waits for the others; a round
        that handles them only at its end gives the same failures and the same head."""
        def reply(m):  # node 2 answers NaN (rejected), node 3 with a wrong example count (rejected)
            node, state = m.metadata.dst_node_id, perturbed(sent(m), 0.1)
            if node == 2:
                state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
            return reply_to(m, state, num_examples=0 if node == 3 else 10)

        def run(early: bool):
            cfg = make_cfg(num_clients=4, num_rounds=2, clients_per_round=4, seed=0,
                           out_dir=str(Path(make_cfg().out_dir) / ("early" if early else "late")))
            engine = RoundEngine(cfg, report=lambda s: None)
            grid = QueueGrid([1, 2, 3, 4], reply, per_pull=1)
            push, grid.pushed = grid.push_messages, []
            grid.push_messages = lambda ms: (grid.pushed.append(list(ms)), push(grid.pushed[-1]))[1]
            strategy = AlgorithmStrategy(engine, grid, "test")
            checks, check = [], engine.check
            engine.check = lambda task, r: (checks.append(len(strategy._early)), check(task, r))[1]
            if not early:
                strategy.early = lambda tasks: (lambda message: None)
            metrics = engine.run(strategy)
            # bytes down, measured once the messages were pushed: the messages' sizes
            trains = [ms for ms in grid.pushed if ms[0].metadata.message_type == MessageType.TRAIN]
            assert [r.bytes_down_total for r in metrics.rounds] == [sum(wire_bytes(m) for m in ms) for ms in trains]
            return metrics, engine.state, checks

        (early, early_state, early_checks), (late, late_state, late_checks) = run(True), run(False)
        assert len(early_checks) == len(late_checks) == 8  # every reply checked once
        assert early_checks[:4] == [0, 1, 2, 3]  # during the wait, one more handled each time
        assert late_checks[:4] == [0, 0, 0, 0]  # at the round's end
        for e, l in zip(early.rounds, late.rounds):
            assert (e.failed_invalid, e.rejected, e.clients, e.bytes_up_total) == (l.failed_invalid, l.rejected, l.clients,
                                                                                   l.bytes_up_total)
        assert early.rounds[0].rejected == {"non-finite": 1, "num-examples": 1}
        assert all(torch.equal(early_state[k], late_state[k]) for k in early_state)

    def test_round_line_is_one_line_and_live_only_on_a_tty(self):
        from strategies.progress import RoundLine

        entry = RoundMetrics(round=3, accuracy=0.4567, loss=1.0, clients=3, examples=30, sampled=4, subnets=4, failures=1,
                             failed_error=0, failed_invalid=1, failed_lost=0, bytes_down_per_client=12345.0,
                             bytes_up_per_client=12400.0, bytes_down_total=49380, bytes_up_total=37200,
                             seconds=1.25, elapsed=30.5)
        text = entry.line(10)
        assert "\n" not in text
        for part in ("round 3/10", "clients 3/4 done", "1 failed: 1 invalid", "accuracy 0.4567", "12.3 kB down",
                     "elapsed 30.5s"):
            assert part in text, text
        assert "accuracy not evaluated" in RoundMetrics(**{**entry.__dict__, "accuracy": None}).line(10)
        piped = io.StringIO()
        RoundLine(10, stream=piped).replies(3, 1, 4, 0, False)
        assert piped.getvalue() == ""  # not a TTY: no live line
        tty = io.StringIO()
        line = RoundLine(10, stream=tty, live=True)
        line.replies(3, 1, 4, 0, False)
        line.replies(3, 2, 4, 1, False)
        line.replies(3, 2, 4, 1, True)
        out = tty.getvalue()
        assert "\n" not in out and out.count("\r") == 3 and "clients 2/4 done (1 failed)" in out
        assert out.endswith("\r\x1b[2K")  # wiped before the round's log lines

    def test_say_wipes_the_live_line_and_logs_one_line(self, caplog):
        from strategies.progress import RoundLine

        tty = io.StringIO()
        line = RoundLine(10, stream=tty, live=True)
        line.replies(1, 1, 2, 0, False)
        with caplog.at_level(logging.INFO, logger="flwr"):
            line.say("round 1/10 | done")
        assert tty.getvalue().endswith("\r\x1b[2K")
        assert any(r.getMessage() == "round 1/10 | done" for r in caplog.records)


class TestFlowerStrategyApi:
    def test_strategy_start_runs_the_same_rounds_as_the_engine_loop(self, make_cfg):
        """A ServerApp of one's own: ``engine.start(strategy)``, then Flower's ``Strategy.start``."""
        cfg = make_cfg(num_clients=4, clients_per_round=2, num_rounds=2, subnets_per_round=0)
        reference = RoundEngine(cfg.replace(out_dir=cfg.out_dir + "-loop"), report=lambda s: None)
        in_process_run(reference.cfg, reference)
        engine = RoundEngine(cfg, report=lambda s: None)
        grid = LocalGrid(cfg)
        strategy = AlgorithmStrategy(engine, grid, "in-process", clients_are_partitions=True)
        engine.start(strategy)
        result = strategy.start(grid, ArrayRecord(engine.state), num_rounds=cfg.num_rounds, timeout=cfg.round_timeout)
        final = result.arrays.to_torch_state_dict()
        assert engine.done == 2 and final.keys() == reference.state.keys()
        assert all(torch.equal(final[k], reference.state[k]) for k in final)
        assert [r.accuracy for r in engine.metrics.rounds] == [r.accuracy for r in reference.metrics.rounds]
        assert result.train_metrics_clientapp[2]["failures"] == 0
