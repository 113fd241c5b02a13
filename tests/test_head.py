"""Tests for fedsparse/head.py: the MLP head, its batch order and its training loop."""

from __future__ import annotations

import pytest
import torch

from fedsparse.model.head import MLPHead, batch_order, count_params, evaluate, parse_hidden, train_steps


def seeded_head(in_dim: int = 4, hidden=(6, 5), classes: int = 3, seed: int = 0) -> MLPHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPHead(in_dim, hidden, classes)


class TestParseHidden:
    @pytest.mark.parametrize(
        "text, expected",
        [("1024,1024", (1024, 1024)), (" 512 , 256 ", (512, 256)), ("7", (7,)), ("8,", (8,)), ((3, 4), (3, 4))],
    )
    def test_parses_comma_separated_widths(self, text, expected) -> None:
        assert parse_hidden(text) == expected

    @pytest.mark.parametrize("bad", ["", ",", "a,b", "1.5", "0", "4,-1", ()])
    def test_rejects_empty_or_non_positive(self, bad) -> None:
        with pytest.raises(ValueError, match="hidden"):
            parse_hidden(bad)


class TestMLPHead:
    def test_layer_shapes_follow_dims(self) -> None:
        head = seeded_head(4, (6, 5), 3)
        shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert shapes == {
            "layers.0.weight": (6, 4), "layers.0.bias": (6,),
            "layers.1.weight": (5, 6), "layers.1.bias": (5,),
            "layers.2.weight": (3, 5), "layers.2.bias": (3,),
        }
        assert head.dims == (4, 6, 5, 3)

    def test_forward_is_linear_relu_linear_relu_linear(self) -> None:
        head = seeded_head()
        x = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))
        s = head.state_dict()
        h = torch.relu(x @ s["layers.0.weight"].T + s["layers.0.bias"])
        h = torch.relu(h @ s["layers.1.weight"].T + s["layers.1.bias"])
        expected = h @ s["layers.2.weight"].T + s["layers.2.bias"]  # no ReLU on the logits
        with torch.no_grad():
            assert torch.allclose(head(x), expected, atol=1e-6)

    def test_from_state_dict_round_trips(self) -> None:
        head = seeded_head(4, (6, 5), 3)
        copy = MLPHead.from_state_dict(head.state_dict())
        assert copy.dims == head.dims
        assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), head.state_dict().values()))

    def test_from_state_dict_rejects_missing_bias(self) -> None:
        s = seeded_head().state_dict()
        del s["layers.1.bias"]
        with pytest.raises(ValueError, match="layers.1.bias"):
            MLPHead.from_state_dict(s)

    def test_from_state_dict_rejects_mismatched_widths(self) -> None:
        s = seeded_head().state_dict()
        s["layers.1.weight"] = torch.zeros(5, 7)
        with pytest.raises(ValueError, match="layers.1.weight"):
            MLPHead.from_state_dict(s)

    def test_from_state_dict_rejects_empty_state(self) -> None:
        with pytest.raises(ValueError):
            MLPHead.from_state_dict({})

    @pytest.mark.parametrize("dims", [(4, 3), (4, 6, 3), (768, 1024, 1024, 10)])
    def test_count_params_equals_module_numel(self, dims) -> None:
        head = MLPHead(dims[0], dims[1:-1], dims[-1])
        assert count_params(dims) == sum(p.numel() for p in head.parameters())


class TestBatchOrder:
    def test_returns_exactly_steps_batches(self) -> None:
        assert len(batch_order(10, 7, 4, torch.Generator().manual_seed(0))) == 7

    def test_batches_never_span_epochs(self) -> None:
        # n = 10, batch 4: each epoch is [4, 4, 2]; together each epoch's batches are a permutation
        batches = batch_order(10, 6, 4, torch.Generator().manual_seed(0))
        assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
        for epoch in (batches[:3], batches[3:]):
            assert sorted(torch.cat(epoch).tolist()) == list(range(10))

    def test_same_generator_seed_gives_same_batches(self) -> None:
        a = batch_order(10, 5, 3, torch.Generator().manual_seed(4))
        b = batch_order(10, 5, 3, torch.Generator().manual_seed(4))
        c = batch_order(10, 5, 3, torch.Generator().manual_seed(5))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert any(not torch.equal(x, y) for x, y in zip(a, c))

    def test_empty_data_raises(self) -> None:
        with pytest.raises(ValueError):
            batch_order(0, 1, 4, torch.Generator())


class TestTrainEvaluate:
    def _toy(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(60, 4, generator=gen)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes, learnable
        return x, y

    def test_training_lowers_the_loss(self) -> None:
        x, y = self._toy()
        head = seeded_head(4, (16,), 3)
        _, before = evaluate(head, x, y)
        batches = batch_order(60, 60, 16, torch.Generator().manual_seed(0))
        train_steps(head, x, y, batches, lr=0.01)
        _, after = evaluate(head, x, y)
        assert after < 0.7 * before

    def test_train_steps_returns_mean_batch_loss(self) -> None:
        x, y = self._toy()
        head = seeded_head(4, (16,), 3)
        batches = [torch.arange(0, 30)]
        with torch.no_grad():
            expected = float(torch.nn.functional.cross_entropy(head(x[:30]), y[:30]))
        assert train_steps(head, x, y, batches, lr=0.01) == pytest.approx(expected, rel=1e-6)

    def test_evaluate_matches_hand_computation_across_batches(self) -> None:
        x, y = self._toy()
        head = seeded_head(4, (8,), 3)
        with torch.no_grad():
            logits = head(x)
        acc_ref = float((logits.argmax(1) == y).float().mean())
        loss_ref = float(torch.nn.functional.cross_entropy(logits, y))
        acc, loss = evaluate(head, x, y, batch_size=7)  # 60 = 8 * 7 + 4: a ragged last batch
        assert acc == pytest.approx(acc_ref) and loss == pytest.approx(loss_ref, rel=1e-5)

    def test_evaluate_on_empty_set_raises(self) -> None:
        with pytest.raises(ValueError):
            evaluate(seeded_head(), torch.empty(0, 4), torch.empty(0, dtype=torch.long))


@pytest.mark.parametrize("label_aware", [False, True])
def test_fused_adam_steps_as_torch_fused_adam(label_aware: bool) -> None:
    """``train_steps``' own optimizer (torch's fused Adam kernel without torch.optim, whose first
    use imports torch._dynamo) gives bitwise the model and loss of ``torch.optim.Adam(fused=True)``."""
    def run(optimizer_of):
        torch.manual_seed(0)
        model = MLPHead(24, [16, 8], 5)
        x, y = torch.randn(60, 24), torch.randint(0, 5, (60,))
        batches = batch_order(60, 12, 8, torch.Generator().manual_seed(1))
        classes = torch.tensor([0, 2, 3, 4]) if label_aware else None
        if classes is not None:
            y = classes[y % 4]
        loss = train_steps(model, x, y, batches, 3e-3, optimizer=optimizer_of(model), classes=classes)
        return model.state_dict(), loss

    ours, ours_loss = run(lambda m: None)
    theirs, theirs_loss = run(lambda m: torch.optim.Adam(m.parameters(), lr=3e-3, fused=True))
    assert ours_loss == theirs_loss
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
