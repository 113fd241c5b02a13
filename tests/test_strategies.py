"""The Flower strategies with fake Grids and hand-built replies (no simulation)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsparse.model.head import MLPHead
from fedsparse.model.ist import slice_state
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


class TestISTWidthScaling:
    def test_slices_go_out_scaled_and_come_back_unscaled(self):
        state = head_state()
        strategy = IST(clients_per_round=2, seed=3, scaling="width")
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid([7, 8])))
        for m in msgs:
            index = strategy._assigned[m.metadata.dst_node_id]
            sub = m.content[ARRAYS_KEY].to_torch_state_dict()
            want = slice_state(state, index, "width")
            assert all(torch.equal(sub[k], want[k]) for k in sub)
            assert torch.allclose(sub["layers.1.weight"], slice_state(state, index)["layers.1.weight"] * 10 / len(index[0]))
        # clients that return what they got leave the head unchanged
        arrays, _ = strategy.aggregate_train(1, [reply_to(m, m.content[ARRAYS_KEY].to_torch_state_dict()) for m in msgs])
        new = arrays.to_torch_state_dict()
        assert all(torch.allclose(new[k], state[k], atol=1e-6) for k in state)

    def test_unknown_scaling_is_rejected(self):
        with pytest.raises(ValueError, match="ist-scaling must be one of none, width"):
            IST(clients_per_round=2, scaling="dropout")


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


class TestSubnetsPerRound:
    def test_group_members_get_the_same_slice_and_groups_cover_the_hidden_layer(self):
        state = head_state()
        strategy = IST(clients_per_round=6, seed=1, subnets_per_round=2)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(10))))
        assert len(msgs) == 6
        by_subnet = {}
        for m in msgs:
            conf = m.content[CONFIG_KEY]
            assert conf["num-subnets"] == 2
            by_subnet.setdefault(conf["subnet"], []).append(m)
        assert sorted(len(v) for v in by_subnet.values()) == [3, 3]
        for members in by_subnet.values():
            first = members[0].content[ARRAYS_KEY].to_torch_state_dict()
            for m in members[1:]:
                other = m.content[ARRAYS_KEY].to_torch_state_dict()
                assert all(torch.equal(first[k], other[k]) for k in first)
        h1 = torch.cat([strategy._assigned[ms[0].metadata.dst_node_id][0] for ms in by_subnet.values()])
        assert torch.equal(h1.sort().values, torch.arange(10))

    @pytest.mark.parametrize("k, g", [(8, 1), (8, 2), (8, 4), (8, 8)])
    def test_bytes_per_client_follow_the_subnet_size(self, k, g):
        state = MLPHead(192, (1024, 1024), 10).state_dict()
        full = wire_bytes(ArrayRecord(state))
        strategy = IST(clients_per_round=k, subnets_per_round=g)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(k))))
        for m in msgs:
            assert wire_bytes(m.content[ARRAYS_KEY]) <= full / g * 1.01
        if g > 1:  # and not much less: the slice of one subnet out of g
            assert min(wire_bytes(m.content[ARRAYS_KEY]) for m in msgs) >= full / g**2
        assert strategy.history[-1].bytes_down == [wire_bytes(m) for m in msgs]

    def test_default_is_one_subnet_per_client_and_identical_to_plain_ist(self):
        state = head_state()
        a, b = IST(3, seed=4), IST(3, seed=4, subnets_per_round=3)
        ma = list(a.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(5))))
        mb = list(b.configure_train(1, ArrayRecord(state), train_config(), FakeGrid(range(5))))
        assert [m.content[CONFIG_KEY]["subnet"] for m in ma] == [0, 1, 2]
        for x, y in zip(ma, mb):
            assert x.metadata.dst_node_id == y.metadata.dst_node_id
            sx, sy = x.content[ARRAYS_KEY].to_torch_state_dict(), y.content[ARRAYS_KEY].to_torch_state_dict()
            assert all(torch.equal(sx[k], sy[k]) for k in sx)

    def test_one_subnet_aggregates_like_the_fedavg_baseline(self):
        state = head_state()
        ist = IST(clients_per_round=3, seed=0, subnets_per_round=1)
        fed = FedAvgBaseline(clients_per_round=3, seed=0)
        grid = FakeGrid([5, 6, 7])
        mi = list(ist.configure_train(1, ArrayRecord(state), train_config(), grid))
        mf = list(fed.configure_train(1, ArrayRecord(state), train_config(), grid))
        assert [m.metadata.dst_node_id for m in mi] == [m.metadata.dst_node_id for m in mf]
        for m in mi:  # the "slice" of the only subnet is the whole head
            sent = m.content[ARRAYS_KEY].to_torch_state_dict()
            assert all(torch.equal(sent[k], state[k]) for k in state)
        gen = torch.Generator().manual_seed(0)
        trained = [{k: v + torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(3)]
        examples = [10, 25, 5]
        ai, _ = ist.aggregate_train(1, [reply_to(m, s, n) for m, s, n in zip(mi, trained, examples)])
        af, _ = fed.aggregate_train(1, [reply_to(m, s, n) for m, s, n in zip(mf, trained, examples)])
        si, sf = ai.to_torch_state_dict(), af.to_torch_state_dict()
        for k in state:
            assert torch.allclose(si[k], sf[k], atol=1e-6), k

    def test_a_whole_failed_group_leaves_its_subnet_unchanged(self):
        state = head_state()
        strategy = IST(clients_per_round=4, seed=3, subnets_per_round=2)
        msgs = list(strategy.configure_train(1, ArrayRecord(state), train_config(), FakeGrid([1, 2, 3, 4])))
        subnet = {m.metadata.dst_node_id: m.content[CONFIG_KEY]["subnet"] for m in msgs}
        replies, raised = [], False
        for m in msgs:
            sent = m.content[ARRAYS_KEY].to_torch_state_dict()
            if subnet[m.metadata.dst_node_id] == 0:
                replies.append(reply_to(m, perturbed(sent, 2.0)))
            elif not raised:  # subnet 1: one member raised ...
                replies.append(Message(Error(code=1, reason="boom"), reply_to=m))
                raised = True
            else:  # ... and the other sent NaN
                replies.append(reply_to(m, perturbed(sent, float("nan"))))
        arrays, metrics = strategy.aggregate_train(1, replies)
        new = arrays.to_torch_state_dict()
        assert metrics["failures"] == 2 and metrics["replies"] == 2
        for node, s in subnet.items():
            got, orig = slice_state(new, strategy._assigned[node]), slice_state(state, strategy._assigned[node])
            for k in got:
                if k != "layers.2.bias":
                    assert torch.allclose(got[k], orig[k] + (2.0 if s == 0 else 0.0)), (node, k)
        assert all(torch.isfinite(v).all() for v in new.values())

    def test_subnets_beyond_clients_are_rejected(self):
        with pytest.raises(ValueError, match="subnets-per-round"):
            IST(clients_per_round=2, subnets_per_round=3)


class QueueGrid(FakeGrid):
    """A Grid with push/pull: each pull releases at most ``per_pull`` replies; nodes in
    ``silent`` never answer; ``reply`` builds a node's reply."""

    def __init__(self, nodes, reply, per_pull=1, silent=()):
        super().__init__(nodes)
        self.reply, self.per_pull, self.silent = reply, per_pull, set(silent)
        self.ready, self.pulls = [], 0

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.ready)}-{i}-{id(m)}"
            ids.append(m.metadata.message_id)
            if m.metadata.dst_node_id not in self.silent:
                self.ready.append(self.reply(m))
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        out = [r for r in self.ready if r.metadata.reply_to_message_id in wanted][: self.per_pull]
        for r in out:
            self.ready.remove(r)
        return out


class TestPollingGrid:
    def test_replies_are_reported_as_they_arrive(self):
        from strategies.progress import PollingGrid

        state = head_state()
        calls = []
        grid = QueueGrid([1, 2, 3], lambda m: reply_to(m, state))
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
        polling = PollingGrid(grid, lambda *a: calls.append(a), poll=0.01)
        msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
        replies = list(polling.send_and_receive(msgs, timeout=0.2))
        assert len(replies) == 2 and calls[:2] == [(0, 3, 0, False), (2, 3, 2, False)] and calls[-1] == (2, 3, 2, True)
        assert grid.pulls >= 5  # it kept polling until the deadline

    def test_nothing_to_send_returns_at_once(self):
        from strategies.progress import PollingGrid

        calls = []
        assert list(PollingGrid(QueueGrid([], None), lambda *a: calls.append(a)).send_and_receive([], timeout=9)) == []
        assert calls == []


class TestProgress:
    def _run(self, strategy, nodes, rounds=2, **grid_kw):
        state = head_state()
        grid = QueueGrid(nodes, lambda m: reply_to(m, perturbed(m.content[ARRAYS_KEY].to_torch_state_dict(), 0.1)), **grid_kw)
        seen = []
        strategy.on_replies = lambda *a: seen.append(a)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=rounds, timeout=0.3)
        return seen

    def test_start_reports_replies_per_round_through_the_polling_grid(self):
        seen = self._run(IST(clients_per_round=3, seed=0), [1, 2, 3, 4])
        assert [a for a in seen if a[-1]] == [(1, 3, 3, 0, True), (2, 3, 3, 0, True)]
        assert [a[:3] for a in seen if not a[-1]] == [(r, d, 3) for r in (1, 2) for d in range(4)]

    def test_fedavg_reports_too_and_lost_clients_time_out(self):
        strategy = FedAvgBaseline(clients_per_round=2, seed=0)
        seen = self._run(strategy, [1, 2], rounds=1, silent={2})
        assert seen[-1] == (1, 1, 2, 0, True)
        assert strategy.history[-1].lost == 1 and strategy.history[-1].failures == 1

    def test_round_line_is_one_line_and_live_only_on_a_tty(self, caplog):
        import io

        from strategies.progress import RoundLine, format_round

        entry = {"round": 3, "clients": 3, "sampled": 4, "failures": 1, "failed_error": 0, "failed_invalid": 1,
                 "failed_lost": 0, "accuracy": 0.4567, "bytes_down_per_client": 12345.0,
                 "bytes_up_per_client": 12400.0, "seconds": 1.25, "elapsed": 30.5}
        text = format_round(entry, 10)
        assert "\n" not in text
        for part in ("round 3/10", "clients 3/4 done", "1 failed: 1 invalid", "accuracy 0.4567", "12.3 kB down",
                     "elapsed 30.5s"):
            assert part in text, text
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

    def test_quiet_filter_drops_only_flowers_per_round_lines(self):
        import logging

        from strategies.progress import QuietFlowerRounds

        f = QuietFlowerRounds()

        def rec(msg, level=logging.INFO):
            return logging.LogRecord("flwr", level, __file__, 1, msg, None, None)

        assert not f.filter(rec("[ROUND %s/%s]"))
        assert not f.filter(rec("Global evaluation"))
        assert f.filter(rec("round %d: %d client(s) did not reply in time", logging.WARNING))
        assert f.filter(rec("%s"))
        assert f.filter(rec("", logging.WARNING))
