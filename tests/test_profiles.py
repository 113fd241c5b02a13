"""Device profiles (fedsparse/profiles.py), slices sized to capacity (model/ist.py, algorithms/ist.py),
the memory budget (accounting/budget.py) and a heterogeneous run through the engine."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import Counter

import pytest
import torch

from fedsparse.accounting.budget import MIB, TIMM_BYTES, MemoryBudgetError, fit_encoder_batch
from fedsparse.algorithms.ist import IST
from fedsparse.config import RunConfig
from fedsparse.model.head import MLPHead
from fedsparse.model.ist import (
    SliceUpdate,
    capacity_groups,
    partition,
    proportional_partition,
    proportional_sizes,
    slice_state,
    stitch,
    worker_indices,
)
from fedsparse.profiles import (
    PROFILES,
    client_budget_mib,
    Profile,
    client_profile,
    fit_profile,
    node_profile,
    parse_profile_spread,
    profile_assignment,
    profile_for,
    spread_counts,
)

SPREAD = "tiny:0.5,small:0.3,large:0.2"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --- profiles, spreads, node configs --------------------------------------------------------------
class TestSpread:
    def test_parses_names_and_shares(self) -> None:
        assert parse_profile_spread(SPREAD) == [("tiny", 0.5), ("small", 0.3), ("large", 0.2)]
        assert parse_profile_spread(" large : 1 ") == [("large", 1.0)]
        assert parse_profile_spread("") == []

    @pytest.mark.parametrize("spec, fragment", [
        ("tiny:0.5", "sum to 1"),
        ("huge:1", "unknown profile 'huge'"),
        ("tiny:0.5,tiny:0.5", "appears twice"),
        ("tiny:x,large:1", "not a number"),
        ("tiny:0,large:1", "must be > 0"),
        ("tiny:-0.5,large:1.5", "must be > 0"),
        ("tiny:nan,large:1", "must be > 0"),
        ("tiny", "not name:share"),
        ("tiny:0.5,,large:0.5", "not name:share"),
    ])
    def test_bad_spreads_are_one_line_errors(self, spec: str, fragment: str) -> None:
        with pytest.raises(ValueError) as err:
            parse_profile_spread(spec)
        assert fragment in one_line(err)

    def test_shares_are_exact_not_drawn(self) -> None:
        names = profile_assignment(SPREAD, 20, seed=0)
        assert Counter(names) == {"tiny": 10, "small": 6, "large": 4}
        assert spread_counts([("a", 0.5), ("b", 0.3), ("c", 0.2)], 7) == [4, 2, 1]  # 3.5, 2.1, 1.4 -> largest remainders
        assert sum(spread_counts([("a", 1 / 3), ("b", 1 / 3), ("c", 1 / 3)], 10)) == 10

    def test_assignment_is_seeded(self) -> None:
        assert profile_assignment(SPREAD, 20, 0) == profile_assignment(SPREAD, 20, 0)
        assert profile_assignment(SPREAD, 20, 0) != profile_assignment(SPREAD, 20, 1)

    def test_profile_for_follows_the_config(self) -> None:
        assert profile_for(RunConfig(), 3) is None  # device-profiles = "": today's behaviour
        cfg = RunConfig(device_profiles=SPREAD)
        names = profile_assignment(SPREAD, cfg.num_clients, cfg.seed)
        assert [profile_for(cfg, i).name for i in range(cfg.num_clients)] == names
        assert profile_for(cfg, 0) is PROFILES[names[0]]

    def test_config_key_is_checked(self) -> None:
        assert RunConfig().device_profiles == ""
        assert RunConfig.from_run_config({"device-profiles": SPREAD}).device_profiles == SPREAD
        with pytest.raises(ValueError) as err:
            RunConfig.from_run_config({"device-profiles": "tiny:0.7,large:0.2"})
        assert "device-profiles" in one_line(err) and "sum to 1" in str(err.value)
        with pytest.raises(ValueError) as err:
            RunConfig.from_run_config({"device-profiles": SPREAD, "ist-overlap": 2.0})
        assert "ist-overlap" in one_line(err)


class TestProfiles:
    def test_shipped_profiles_are_ordered_by_capacity_and_budget(self) -> None:
        tiny, small, large = PROFILES["tiny"], PROFILES["small"], PROFILES["large"]
        assert tiny.width < small.width < large.width == 1.0
        assert tiny.memory_mib < small.memory_mib < large.memory_mib
        assert tiny.mask_ratio >= small.mask_ratio >= large.mask_ratio

    @pytest.mark.parametrize("change, fragment", [
        ({"width": 0.0}, "width"), ({"width": 1.5}, "width"), ({"mask_ratio": 1.0}, "mask"),
        ({"local_steps": 0}, "local-steps"), ({"encoder_dtype": "fp16"}, "encoder-dtype"),
        ({"memory_mib": 0}, "memory-mib"), ({"encoder_batch": 2.5}, "encoder-batch"), ({"threads": True}, "threads"),
    ])
    def test_bad_profiles_are_one_line_errors(self, change: dict, fragment: str) -> None:
        with pytest.raises(ValueError) as err:
            dataclasses.replace(PROFILES["tiny"], **change)
        assert fragment in one_line(err)

    def test_dict_round_trip(self) -> None:
        for p in PROFILES.values():
            assert Profile.from_dict(p.to_dict()) == p
        with pytest.raises(ValueError) as err:
            Profile.from_dict({**PROFILES["tiny"].to_dict(), "colour": "red"})
        assert "colour" in one_line(err)


class TestNodeProfile:
    def test_none_without_a_profile(self) -> None:
        assert node_profile({"partition-id": 0, "num-partitions": 2}) is None

    def test_profile_and_overrides(self) -> None:
        assert node_profile({"profile": "tiny"}) is PROFILES["tiny"]
        p = node_profile({"profile": "tiny", "profile-mask-ratio": 0.6, "profile-memory-mib": "1200",
                          "profile-encoder-dtype": "fp32", "profile-threads": 2.0})
        assert (p.name, p.mask_ratio, p.memory_mib, p.encoder_dtype, p.threads) == ("tiny", 0.6, 1200, "fp32", 2)
        assert p.width == PROFILES["tiny"].width

    @pytest.mark.parametrize("config, fragment", [
        ({"profile": "huge"}, "unknown profile 'huge'"),
        ({"profile": "tiny", "profile-colour": 1}, "profile-colour"),
        ({"profile": "tiny", "profile-name": "x"}, "profile-name"),
        ({"profile": "tiny", "profile-mask-ratio": "lots"}, "mask-ratio"),
        ({"profile": "tiny", "profile-mask-ratio": 1.2}, "mask"),
        ({"profile": "tiny", "profile-memory-mib": 1.5}, "memory-mib"),
        ({"profile": "tiny", "profile-width": 0}, "width"),
        ({"profile-width": 0.5}, "no profile=NAME"),
    ])
    def test_bad_node_configs_are_one_line_errors(self, config: dict, fragment: str) -> None:
        with pytest.raises(ValueError) as err:
            node_profile(config)
        assert fragment in one_line(err)

    def test_client_profile_prefers_the_node_config(self) -> None:
        cfg = RunConfig(device_profiles=SPREAD)
        assert client_profile(cfg, 4, {"profile": "large"}) is PROFILES["large"]
        assert client_profile(cfg, 4, {}) is profile_for(cfg, 4)
        assert client_profile(cfg, None, {}) is None and client_profile(cfg, 99, {}) is None
        assert client_profile(RunConfig(), 4, {}) is None


# --- slices sized to capacity ---------------------------------------------------------------------
def naive_partition_check(hidden, parts, capacities) -> None:
    """Disjoint, covering, non-empty, and sizes within rounding of the proportions."""
    total = sum(capacities)
    for h, layer in zip(hidden, parts):
        seen = torch.cat(layer)
        assert sorted(seen.tolist()) == list(range(h))  # covers every neuron exactly once
        for part, c in zip(layer, capacities):
            assert len(part) >= 1
            assert torch.equal(part, part.sort().values)
            if h * c / total >= 1:  # parts that need no bump to be non-empty
                assert abs(len(part) - h * c / total) < 1 + 1e-9


def naive_stitch(full: dict, updates: list[tuple[list[torch.Tensor], dict]]) -> dict:
    """Write every slice back entry by entry (the definition of stitching, as a loop);
    the output bias is the plain mean (equal example counts)."""
    out = {k: v.clone() for k, v in full.items()}
    n = len(full) // 2
    for index, sub in updates:
        for layer in range(n):
            rows = index[layer].tolist() if layer < n - 1 else list(range(full[f"layers.{layer}.weight"].shape[0]))
            cols = index[layer - 1].tolist() if layer > 0 else list(range(full[f"layers.{layer}.weight"].shape[1]))
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    out[f"layers.{layer}.weight"][r, c] = sub[f"layers.{layer}.weight"][i, j]
                if layer < n - 1:
                    out[f"layers.{layer}.bias"][r] = sub[f"layers.{layer}.bias"][i]
    key = f"layers.{n - 1}.bias"
    out[key] = sum(sub[key] for _, sub in updates) / len(updates)
    return out


class TestProportionalPartition:
    @pytest.mark.parametrize("capacities", [[0.25, 1.0, 0.5, 1.0], [0.25, 0.25, 1.0], [1.0, 0.5], [0.01, 1.0, 1.0]])
    def test_parts_are_disjoint_cover_and_proportional(self, capacities) -> None:
        hidden = [37, 64, 1024]
        naive_partition_check(hidden, proportional_partition(hidden, capacities, seed=5), capacities)

    def test_sizes_use_largest_remainder_and_keep_every_part_non_empty(self) -> None:
        assert proportional_sizes(1024, [0.25, 1.0, 0.5, 1.0]) == [93, 373, 186, 372]
        assert proportional_sizes(10, [1, 1, 1]) == [4, 3, 3]  # as tensor_split
        assert proportional_sizes(4, [0.001, 0.001, 1, 1]) == [1, 1, 1, 1]
        assert proportional_sizes(10, [0.001, 1]) == [1, 9]

    def test_equal_capacities_are_the_plain_partition(self) -> None:
        a, b = partition([50, 33], 3, 9), proportional_partition([50, 33], [0.5, 0.5, 0.5], 9)
        assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))

    def test_seeded_and_rolling_offset_turns_the_order(self) -> None:
        a = proportional_partition([40], [0.25, 1.0], 3)
        assert all(torch.equal(x, y) for x, y in zip(a[0], proportional_partition([40], [0.25, 1.0], 3)[0]))
        b = proportional_partition([40], [0.25, 1.0], 3, offset=1)
        assert [len(p) for p in a[0]] == [len(p) for p in b[0]] and not torch.equal(a[0][0], b[0][0])

    @pytest.mark.parametrize("capacities, fragment", [([], "at least one"), ([1.0, 0.0], "> 0"),
                                                      ([1.0, float("nan")], "> 0"), ([1.0] * 5, "non-empty")])
    def test_bad_capacities_are_one_line_errors(self, capacities, fragment) -> None:
        with pytest.raises(ValueError) as err:
            proportional_partition([4], capacities, 0)
        assert fragment in one_line(err)

    def test_unequal_slices_stitch_back_exactly(self) -> None:
        torch.manual_seed(0)
        full = MLPHead(7, (23, 17), 4).state_dict()
        capacities = [0.25, 1.0, 0.5]
        parts = proportional_partition([23, 17], capacities, seed=11)
        indices = [worker_indices(parts, s) for s in range(3)]
        subs = [slice_state(full, index) for index in indices]
        # identity training: the head comes back unchanged
        back = stitch(full, [SliceUpdate(index, sub, 10) for index, sub in zip(indices, subs)])
        assert all(torch.equal(back[k], full[k]) for k in full if k != "layers.2.bias")
        assert torch.allclose(back["layers.2.bias"], full["layers.2.bias"])  # a mean of three equal vectors
        # changed slices land exactly where a per-index loop puts them
        changed = [{k: v + (s + 1) * torch.randn_like(v) for k, v in sub.items()} for s, sub in enumerate(subs)]
        got = stitch(full, [SliceUpdate(index, sub, 10) for index, sub in zip(indices, changed)])
        want = naive_stitch(full, list(zip(indices, changed)))
        assert all(torch.equal(got[k], want[k]) for k in full if k != "layers.2.bias")
        assert torch.allclose(got["layers.2.bias"], want["layers.2.bias"])
        # the slices are as large as their capacities say: tiny < small < large
        widths = [[len(p) for p in index] for index in indices]
        assert widths[0] < widths[2] < widths[1]


class TestCapacityGroups:
    def test_groups_gather_equal_capacities_and_take_the_weakest(self) -> None:
        group, caps = capacity_groups([1.0, 0.25, 0.5, 0.25, 1.0, 0.5], 3)
        assert group == [2, 0, 1, 0, 2, 1] and caps == [0.25, 0.5, 1.0]
        group, caps = capacity_groups([1.0, 0.25, 0.5], 2)
        assert group == [1, 0, 0] and caps == [0.25, 1.0]  # 0.25 and 0.5 share a subnet sized for 0.25

    def test_one_group_per_client_keeps_each_capacity(self) -> None:
        group, caps = capacity_groups([1.0, 0.25, 0.5], 3)
        assert sorted(group) == [0, 1, 2] and [caps[g] for g in group] == [1.0, 0.25, 0.5]


class TestISTPlan:
    def state(self) -> dict:
        torch.manual_seed(0)
        return MLPHead(12, (64, 64), 3).state_dict()

    @pytest.mark.parametrize("variant", ["authors", "skew"])
    def test_tiny_gets_a_smaller_slice_than_large(self, variant) -> None:
        ist = IST(RunConfig(ist_variant=variant, clients_per_round=3))
        tasks = ist.plan(1, self.state(), [7, 8, 9], capacities=[0.25, 1.0, 0.5])
        widths = [t.arrays["layers.0.weight"].shape[0] for t in tasks]
        assert widths == [10, 36, 18] or (widths[0] < widths[2] < widths[1] and sum(widths) == 64)
        nbytes = [sum(v.numel() for v in t.arrays.values()) for t in tasks]
        assert nbytes[0] < nbytes[2] < nbytes[1]

    def test_equal_capacities_plan_as_without_profiles(self) -> None:
        ist, state = IST(RunConfig(clients_per_round=4, subnets_per_round=2)), self.state()
        a = ist.plan(2, state, [1, 2, 3, 4])
        b = ist.plan(2, state, [1, 2, 3, 4], capacities=[0.5] * 4)
        assert [t.group for t in a] == [t.group for t in b]
        assert all(torch.equal(x.arrays[k], y.arrays[k]) for x, y in zip(a, b) for k in x.arrays)

    def test_groups_of_clients_share_a_slice_sized_for_the_weakest(self) -> None:
        ist = IST(RunConfig(clients_per_round=4, subnets_per_round=2))
        tasks = ist.plan(1, self.state(), [1, 2, 3, 4], capacities=[1.0, 0.25, 1.0, 0.5])
        assert tasks[0].group == tasks[2].group and tasks[1].group == tasks[3].group
        assert tasks[1].arrays["layers.0.weight"].shape[0] == 13  # 64 * 0.25 / 1.25

    def test_overlapping_subnets_with_capacities_are_refused(self) -> None:
        ist = IST(RunConfig(clients_per_round=2, ist_overlap=2.0))
        with pytest.raises(ValueError) as err:
            ist.plan(1, self.state(), [1, 2], capacities=[0.25, 1.0])
        assert "ist-overlap" in one_line(err)

    def test_a_round_of_capacities_aggregates(self) -> None:
        ist, state = IST(RunConfig(ist_variant="authors", clients_per_round=3)), self.state()
        tasks = ist.plan(1, state, [7, 8, 9], capacities=[0.25, 1.0, 0.5])
        from fedsparse.algorithms.base import ClientUpdate

        merged = ist.aggregate(1, state, tasks, [ClientUpdate(t.client, dict(t.arrays), 5) for t in tasks])
        assert all(torch.equal(merged[k], state[k]) for k in state if k != "layers.2.bias")  # identity training
        assert torch.allclose(merged["layers.2.bias"], state["layers.2.bias"])


# --- the memory budget ----------------------------------------------------------------------------
class TestBudget:
    def test_fits_the_batch_asked_for_when_it_fits(self) -> None:
        fit = fit_encoder_batch(1000, 32, lambda b: 500 + b)
        assert (fit.encoder_batch, fit.predicted_peak_bytes, fit.shrunk) == (32, 532, False)

    def test_halves_the_batch_until_it_fits(self) -> None:
        fit = fit_encoder_batch(510, 32, lambda b: 500 + b)
        assert (fit.encoder_batch, fit.predicted_peak_bytes, fit.shrunk) == (8, 508, True)

    def test_refuses_in_one_line_when_one_image_does_not_fit(self) -> None:
        with pytest.raises(MemoryBudgetError) as err:
            fit_encoder_batch(400, 32, lambda b: 500 + b)
        assert "memory budget" in one_line(err) and isinstance(err.value, ValueError)

    def test_fit_profile_shrinks_and_says_so(self, caplog) -> None:
        cfg = RunConfig(encoder="builtin-random")
        dims = (192, 64, 64, 10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            roomy = fit_profile(cfg, dataclasses.replace(PROFILES["tiny"], memory_mib=100_000, encoder_dtype="bf16"),
                                dims, 32)
            one = fit_profile(cfg, dataclasses.replace(PROFILES["tiny"], encoder_batch=1, memory_mib=100_000), dims, 32)
        assert roomy.encoder_batch == 32 and roomy.cfg.mask_ratio == PROFILES["tiny"].mask_ratio
        assert roomy.cfg.encoder_dtype == "bf16" and one.predicted_peak_bytes < roomy.predicted_peak_bytes
        budget = (one.predicted_peak_bytes + roomy.predicted_peak_bytes) // 2 // MIB  # between batch 1 and 32
        with caplog.at_level(logging.INFO, logger="fedsparse"):
            shrunk = fit_profile(cfg, dataclasses.replace(PROFILES["tiny"], memory_mib=int(budget)), dims, 32)
        assert 1 <= shrunk.encoder_batch < 32 and shrunk.predicted_peak_bytes <= budget * MIB
        lines = [r.getMessage() for r in caplog.records if "encoder batch" in r.getMessage()]
        assert len(lines) == 1 and "32 ->" in lines[0]

    def test_cached_features_are_held_to_the_clientapp_share(self) -> None:
        """A round on cached features: no encoder, no extraction in the prediction, held to the
        profile's memory less the SuperNode's processes; a cold cache's extraction to the whole
        memory, with timm's imports only for a hub model."""
        cfg, dims, tiny = RunConfig(encoder="builtin"), (192, 256, 256, 10), PROFILES["tiny"]
        cached = fit_profile(cfg, tiny, dims, 32, cached=True)
        cold = fit_profile(cfg, tiny, dims, 32)
        assert cached.budget_bytes == client_budget_mib(tiny) * MIB < cold.budget_bytes == tiny.memory_mib * MIB
        assert cached.predicted_peak_bytes <= cached.budget_bytes
        assert cached.predicted_peak_bytes < cold.predicted_peak_bytes <= cold.budget_bytes
        from fedsparse.accounting.budget import predict_peak_bytes
        from fedsparse.inputs.encoder import builds_with_timm
        from fedsparse.inputs.features import encoder_ref

        assert not builds_with_timm("builtin") and not builds_with_timm("builtin-random")
        assert builds_with_timm("vit_base_patch16_224.mae") and builds_with_timm("vit_tiny_patch16_224@random")
        ref = encoder_ref("builtin", 32)
        hub, own = (predict_peak_bytes(ref.shape, ref.params, 0.5, 32, dims, 32, timm=t) for t in (True, False))
        assert hub - own == TIMM_BYTES
        with pytest.raises(MemoryBudgetError, match="SuperNode's own processes"):
            fit_profile(cfg, dataclasses.replace(tiny, memory_mib=600), dims, 32, cached=True)

    def test_fit_profile_refuses_a_budget_below_the_library(self) -> None:
        with warnings.catch_warnings(), pytest.raises(MemoryBudgetError) as err:
            warnings.simplefilter("ignore", UserWarning)
            fit_profile(RunConfig(encoder="builtin-random"), dataclasses.replace(PROFILES["tiny"], memory_mib=200),
                        (192, 64, 64, 10), 32)
        assert "profile 'tiny'" in one_line(err) and "200 MiB" in str(err.value)


# --- a heterogeneous run through the engine -------------------------------------------------------
@pytest.fixture
def hetero_cfg(tmp_path, make_image_tree):
    root = make_image_tree(tmp_path / "data", {"train": 8, "test": 3}, classes=("a", "b", "c"))
    return RunConfig(dataset="imagefolder", data_dir=str(root), encoder="builtin-random", hidden="24,24",
                     num_clients=6, clients_per_round=3, num_rounds=2, local_steps=2, batch_size=4,
                     device_profiles="tiny:0.5,large:0.5", cache_dir=str(tmp_path / "cache"),
                     out_dir=str(tmp_path / "run"), ist_start="random")  # slices in every round, round 1 included


def run_plain(cfg: RunConfig):
    from fedsparse.engine.plain import PlainTransport
    from fedsparse.engine.rounds import RoundEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        engine = RoundEngine(cfg, report=lambda s: None)
        return engine, engine.run(PlainTransport(cfg))


class TestHeterogeneousRun:
    def test_clients_follow_their_profiles(self, hetero_cfg) -> None:
        engine, metrics = run_plain(hetero_cfg)
        assert metrics.finished and all(r.clients == 3 for r in metrics.rounds)
        records = [rec for r in metrics.rounds for rec in r.per_client]
        assert {rec.profile for rec in records} <= {"tiny", "large"} and len(records) == 6
        for rec in records:
            prof = PROFILES[rec.profile]
            assert rec.profile == profile_for(hetero_cfg, rec.client).name
            assert (rec.local_steps, rec.batch_size) == (prof.local_steps, prof.batch_size)
            assert rec.mask_ratio == prof.mask_ratio and rec.encoder_batch == prof.encoder_batch
            # a round on cached features is held to the ClientApp's share; a first extraction to the device's memory
            assert rec.memory_budget_bytes in (client_budget_mib(prof) * MIB, prof.memory_mib * MIB)
            assert rec.predicted_peak_bytes <= rec.memory_budget_bytes
            assert rec.bytes_up == rec.bytes_down + 3 * 4  # tensor bytes, plus the class counts (label-aware)
        for r in metrics.rounds:
            by = {rec.profile: rec for rec in r.per_client}
            if len(by) == 2:  # a round with both: the tiny slice and its bytes are smaller
                assert by["tiny"].slice_dims[1] < by["large"].slice_dims[1]
                assert by["tiny"].bytes_down < by["large"].bytes_down
            assert sum(rec.slice_dims[1] for rec in r.per_client) == 24  # every neuron in one slice

    def test_a_profile_over_its_budget_is_a_counted_error(self, hetero_cfg, monkeypatch) -> None:
        monkeypatch.setitem(PROFILES, "tiny", dataclasses.replace(PROFILES["tiny"], memory_mib=300))
        _, metrics = run_plain(hetero_cfg.replace(num_rounds=1))
        r = metrics.rounds[0]
        tiny = [rec for rec in r.per_client if rec.profile == "tiny"]
        assert tiny and r.failed_error == len(tiny) and r.clients == 3 - len(tiny)
        assert all(rec.status == "error" and "memory budget" in rec.reason for rec in tiny)

    def test_no_profiles_leaves_records_without_profile_fields(self, hetero_cfg) -> None:
        _, metrics = run_plain(hetero_cfg.replace(device_profiles="", num_rounds=1))
        assert all(rec.profile is None and "profile" not in rec.to_dict() for rec in metrics.rounds[0].per_client)

    def test_in_process_driver_reports_profiles_and_gives_the_same_model(self, hetero_cfg) -> None:
        from strategies.in_process import in_process_run
        from fedsparse.engine.rounds import RoundEngine

        plain_engine, _ = run_plain(hetero_cfg)
        cfg = hetero_cfg.replace(out_dir=hetero_cfg.out_dir + "-ip")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            engine = RoundEngine(cfg, report=lambda s: None)
            metrics = in_process_run(cfg, engine)
        assert all(torch.equal(engine.state[k], plain_engine.state[k]) for k in engine.state)
        assert [rec.profile for r in metrics.rounds for rec in r.per_client] == \
            [profile_for(cfg, rec.client).name for r in metrics.rounds for rec in r.per_client]


# --- deployment: node configs name profiles, the server plans by what nodes report ------------------
class TestNodeConfigProfiles:
    """The real ClientApp and Strategy in this process, nodes with ``profile=...`` in their node config."""

    @pytest.fixture(autouse=True)
    def _task_identity(self) -> None:
        from strategies.flower_internals import set_task_identity

        set_task_identity()  # Flower's Messages need a run id outside a SuperNode

    def grid(self, cfg, profiles: dict[int, dict]):
        from strategies.in_process import LocalGrid

        class ProfileGrid(LocalGrid):
            def context(self, node):
                ctx = super().context(node)
                ctx.node_config = {**ctx.node_config, **profiles.get(self.partition_of[node], {})}
                return ctx

            def send_and_receive(self, messages, *, timeout=None):
                from flwr.app import Error, Message

                out = []
                for m in messages:  # a ClientApp that raises answers with an error, as under a SuperNode
                    try:
                        out.append(self.client_app(m, self.context(m.metadata.dst_node_id)))
                    except Exception as err:  # noqa: BLE001
                        out.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m))
                return out

        return ProfileGrid(cfg)

    def started(self, cfg, profiles):
        from fedsparse.engine.rounds import RoundEngine
        from strategies.adapter import AlgorithmStrategy

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            engine = RoundEngine(cfg, report=lambda s: None)
            strategy = AlgorithmStrategy(engine, self.grid(cfg, profiles), "test")
            engine.start(strategy)
        return engine, strategy

    def test_identity_reply_carries_the_profile_and_the_server_plans_by_it(self, hetero_cfg) -> None:
        cfg = hetero_cfg.replace(device_profiles="", clients_per_round=6, num_clients=6)
        profiles = {0: {"profile": "tiny"}, 1: {"profile": "large", "profile-local-steps": 3}, 2: {"profile": "small"}}
        engine, strategy = self.started(cfg, profiles)
        clients = strategy.clients(6)
        assert strategy.profiles[0] == PROFILES["tiny"] and strategy.profiles[3] is None
        assert strategy.profiles[1] == dataclasses.replace(PROFILES["large"], local_steps=3)
        tasks = {t.client: t for t in engine.plan_round(1, clients)}
        width = {c: t.arrays["layers.0.weight"].shape[0] for c, t in tasks.items()}
        assert width[0] < width[2] < width[1] and sum(width.values()) == 24  # no profile counts as width 1
        assert tasks[1].config["local-steps"] == 3 and tasks[0].config["batch-size"] == PROFILES["tiny"].batch_size
        assert tasks[4].config["local-steps"] == cfg.local_steps  # a node without a profile: the run's keys

    def test_a_bad_node_profile_is_refused_in_one_line(self, hetero_cfg) -> None:
        cfg = hetero_cfg.replace(device_profiles="")
        engine, strategy = self.started(cfg, {0: {"profile": "huge"}, 1: {"profile": "tiny", "profile-width": 2}})
        clients = strategy.clients(cfg.clients_per_round)
        assert 0 not in clients and 1 not in clients and len(clients) == cfg.num_clients - 2
        reasons = sorted(strategy.refused.values())
        assert any("unknown profile 'huge'" in r for r in reasons) and any("width" in r for r in reasons)
        assert all("\n" not in r for r in reasons)

    def test_a_malformed_reported_profile_is_refused(self) -> None:
        from flwr.app import ConfigRecord, Message, RecordDict

        from strategies.adapter import reported_profile

        good = Message(RecordDict({"profile": ConfigRecord(PROFILES["tiny"].to_dict())}), dst_node_id=1,
                       message_type="query")
        assert reported_profile(good) == PROFILES["tiny"]
        bad = Message(RecordDict({"profile": ConfigRecord({**PROFILES["tiny"].to_dict(), "width": 3.0})}),
                      dst_node_id=1, message_type="query")
        with pytest.raises(ValueError) as err:
            reported_profile(bad)
        assert "width" in one_line(err)
