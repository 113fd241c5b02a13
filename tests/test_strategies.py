"""The Flower strategies with fake Grids and hand-built replies (no simulation)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsparse.head import MLPHead
from fedsparse.ist import slice_state
from fedsparse.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES_KEY, wire_bytes
from strategies.fedavg import FedAvgBaseline
from strategies.ist import IST


@pytest.fixture(autouse=True)
def task_identity():
    # flwr 1.42 refuses to build a Message outside a run unless a task identity is set
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def head_state(in_dim=12, hidden=(10, 11), classes=3, seed=0):
    torch.manual_seed(seed)
    return MLPHead(in_dim, hidden, classes).state_dict()


def train_config():
    return ConfigRecord({"local-steps": 3, "lr": 1e-3, "batch-size": 8})


def reply_to(msg: Message, state: dict, num_examples: int = 10, **metrics) -> Message:
    content = RecordDict(
        {ARRAYS_KEY: ArrayRecord(state), METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: num_examples, **metrics})}
    )
    return Message(content=content, reply_to=msg)


def perturbed(state: dict, delta: float = 1.0) -> dict:
    return {k: v + delta for k, v in state.items()}


class TestISTConfigure:
    def test_each_client_gets_only_its_slice(self):
        state = head_state()
        strategy = IST(clients_per_round=3, seed=5)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(100, 110))))
        assert len(msgs) == 3
        assert len({m.metadata.dst_node_id for m in msgs}) == 3
        seen_h1 = []
        for m in msgs:
            sub = m.content[ARRAYS_KEY].to_torch_state_dict()
            index = strategy._assigned[m.metadata.dst_node_id]
            expected = slice_state(state, index)
            assert sub.keys() == expected.keys()
            for k in sub:
                assert torch.equal(sub[k], expected[k]), k
            conf = m.content[CONFIG_KEY]
            assert conf["server-round"] == 1 and conf["num-subnets"] == 3 and conf["local-steps"] == 3
            seen_h1.append(index[0])
        allh1 = torch.cat(seen_h1).sort().values
        assert torch.equal(allh1, torch.arange(10))  # disjoint and covering

    @pytest.mark.parametrize("k", [2, 3, 4, 7])
    @pytest.mark.parametrize("dims", [(768, (1024, 1024), 10), (192, (1024, 1024), 10)])
    def test_slice_bytes_at_most_one_kth_of_full_plus_one_percent(self, k, dims):
        in_dim, hidden, classes = dims
        state = MLPHead(in_dim, hidden, classes).state_dict()
        full = wire_bytes(ArrayRecord(state))
        strategy = IST(clients_per_round=k)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(k))))
        for m in msgs:
            received = wire_bytes(m.content[ARRAYS_KEY])
            assert received <= full / k * 1.01, (received, full / k)

    def test_partitions_change_between_rounds_and_repeat_with_seed(self):
        state = head_state()
        a, b = IST(2, seed=1), IST(2, seed=1)
        grid = FakeGrid(range(4))
        a.configure_train(1, ArrayRecord(state), train_config(), grid)
        first = {n: [t.clone() for t in ix] for n, ix in a._assigned.items()}
        b.configure_train(1, ArrayRecord(state), train_config(), grid)
        assert {n: [t.tolist() for t in ix] for n, ix in b._assigned.items()} == {
            n: [t.tolist() for t in ix] for n, ix in first.items()
        }
        a.configure_train(2, ArrayRecord(state), train_config(), grid)
        assert [t.tolist() for ix in a._assigned.values() for t in ix] != [t.tolist() for ix in first.values() for t in ix]


class TestISTAggregate:
    def setup_method(self):
        self.state = head_state()
        self.strategy = IST(clients_per_round=3, seed=2)
        self.msgs = list(
            self.strategy.configure_train(1, ArrayRecord(self.state), train_config(), FakeGrid([11, 22, 33]))
        )

    def sent(self, msg):
        return msg.content[ARRAYS_KEY].to_torch_state_dict()

    def test_stitches_every_reply_back_by_index(self):
        replies = [reply_to(m, perturbed(self.sent(m))) for m in self.msgs]
        arrays, metrics = self.strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        for m in self.msgs:
            index = self.strategy._assigned[m.metadata.dst_node_id]
            got = slice_state(new, index)
            want = perturbed(self.sent(m))
            for k in got:
                if k != "layers.2.bias":
                    assert torch.allclose(got[k], want[k]), k
        assert torch.allclose(new["layers.2.bias"], self.state["layers.2.bias"] + 1)
        assert metrics["replies"] == 3 and metrics["failures"] == 0 and metrics[NUM_EXAMPLES_KEY] == 30

    def test_malformed_and_failed_replies_leave_their_slice_unchanged(self):
        good, bad_shape, failed = self.msgs
        wrong = self.sent(bad_shape)
        wrong["layers.0.weight"] = torch.zeros(1, 1)
        replies = [
            reply_to(good, perturbed(self.sent(good))),
            reply_to(bad_shape, perturbed(wrong)),
            Message(Error(code=1, reason="client crashed"), reply_to=failed),
        ]
        arrays, metrics = self.strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        for m in (bad_shape, failed):
            index = self.strategy._assigned[m.metadata.dst_node_id]
            kept = slice_state(new, index)
            orig = slice_state(self.state, index)
            for k in kept:
                if k != "layers.2.bias":
                    assert torch.equal(kept[k], orig[k]), k
        assert metrics["failures"] == 2 and metrics["replies"] == 1
        assert all(torch.isfinite(v).all() for v in new.values())

    def test_nan_reply_is_dropped(self):
        m = self.msgs[0]
        state = self.sent(m)
        state["layers.1.weight"][0, 0] = float("nan")
        arrays, metrics = self.strategy.aggregate_train(1, [reply_to(m, state)])
        assert metrics["failures"] == 3  # the NaN reply + two that never answered
        assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())

    def test_reply_without_num_examples_is_dropped(self):
        m = self.msgs[0]
        bare = Message(content=RecordDict({ARRAYS_KEY: ArrayRecord(perturbed(self.sent(m)))}), reply_to=m)
        arrays, metrics = self.strategy.aggregate_train(1, [bare])
        assert metrics["replies"] == 0
        for k, v in arrays.to_torch_state_dict().items():
            assert torch.equal(v, self.state[k])

    def test_no_replies_leaves_model_unchanged(self):
        arrays, metrics = self.strategy.aggregate_train(1, [])
        for k, v in arrays.to_torch_state_dict().items():
            assert torch.equal(v, self.state[k])
        assert metrics["failures"] == 3

    def test_bytes_are_recorded(self):
        replies = [reply_to(m, self.sent(m)) for m in self.msgs]
        self.strategy.aggregate_train(1, replies)
        stats = self.strategy.history[-1]
        assert len(stats.bytes_down) == 3 and len(stats.bytes_up) == 3
        assert stats.bytes_down == [wire_bytes(m) for m in self.msgs]


class TestFedAvgBaseline:
    def test_sends_full_model_and_averages(self):
        state = head_state()
        strategy = FedAvgBaseline(clients_per_round=2, seed=0)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid([1, 2, 3])))
        assert len(msgs) == 2
        for m in msgs:
            sent = m.content[ARRAYS_KEY].to_torch_state_dict()
            assert all(torch.equal(sent[k], state[k]) for k in state)
        replies = [reply_to(msgs[0], perturbed(state, 1.0), 10), reply_to(msgs[1], perturbed(state, 4.0), 30)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        for k in state:
            assert torch.allclose(new[k], state[k] + 3.25), k  # (1*10 + 4*30) / 40
        assert metrics["replies"] == 2

    def test_drops_malformed_reply_before_averaging(self):
        state = head_state()
        strategy = FedAvgBaseline(clients_per_round=2)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid([1, 2])))
        broken = dict(state)
        broken.pop("layers.0.bias")
        replies = [reply_to(msgs[0], perturbed(state, 2.0)), reply_to(msgs[1], broken)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        assert all(torch.allclose(new[k], state[k] + 2.0) for k in state)
        assert metrics["failures"] == 1

    def test_ist_sends_fewer_bytes_than_fedavg(self):
        state = MLPHead(768, (1024, 1024), 10).state_dict()
        grid = FakeGrid(range(4))
        ist = list(IST(2).configure_train(1, ArrayRecord(state), train_config(), grid))
        fed = list(FedAvgBaseline(2).configure_train(1, ArrayRecord(state), train_config(), grid))
        assert max(map(wire_bytes, ist)) <= min(map(wire_bytes, fed)) / 2


class TestSampling:
    def test_goes_on_with_connected_clients_after_timeout(self):
        state = head_state()
        strategy = IST(clients_per_round=3, wait_timeout=0.2)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid([7, 8])))
        assert sorted(m.metadata.dst_node_id for m in msgs) == [7, 8]
        assert all(m.content[CONFIG_KEY]["num-subnets"] == 2 for m in msgs)

    def test_no_client_at_all_is_an_error(self):
        with pytest.raises(RuntimeError, match="no client connected"):
            IST(clients_per_round=2, wait_timeout=0.2).configure_train(
                1, ArrayRecord(head_state()), train_config(), FakeGrid([])
            )
