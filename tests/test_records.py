"""Per-client results are typed records (``ClientRecord``), and ``metrics.json`` holds them
as before: only the fields a client reported."""

from __future__ import annotations

import json

from fedsparse.engine.metrics import PER_CLIENT_FIELDS, ClientRecord, RoundMetrics, RunMetrics, client_record


def _round(records: list[ClientRecord]) -> RoundMetrics:
    return RoundMetrics(round=1, accuracy=0.5, loss=1.0, clients=1, examples=4, sampled=2, subnets=2, failures=1,
                        failed_error=1, failed_invalid=0, failed_lost=0, bytes_down_per_client=10.0,
                        bytes_up_per_client=8.0, bytes_down_total=20, bytes_up_total=8, seconds=0.1, elapsed=0.1,
                        per_client=records)


def test_a_reply_maps_to_fields_and_unknown_metrics_are_left_out() -> None:
    metrics = {key: float(i) for i, key in enumerate(PER_CLIENT_FIELDS)} | {"not-a-field": 9.0}
    rec = client_record(3, "ok", 100, metrics, examples=4)
    assert (rec.client, rec.status, rec.bytes_down, rec.examples, rec.reason) == (3, "ok", 100, 4, "")
    assert {name: getattr(rec, name) for name in PER_CLIENT_FIELDS.values()} == \
        {name: float(i) for i, name in enumerate(PER_CLIENT_FIELDS.values())}
    failed = client_record(4, "error", None, None, reason="boom")
    assert failed.to_dict() == {"client": 4, "status": "error", "reason": "boom"}


def test_metrics_json_holds_only_what_was_reported_and_loads_back_typed(tmp_path) -> None:
    ok = client_record(0, "ok", 100, {"train-seconds": 0.5, "peak-rss-bytes": 2.0**20}, examples=4)
    ok.profile, ok.slice_dims = "tiny", [32, 8, 10]
    lost = client_record(1, "lost", 100, reason="no reply in time")
    run = RunMetrics(config={}, engine="plain", model_params=1, model_bytes=4, num_classes=10, test_examples=1,
                     head_dims=[32, 10], rounds=[_round([ok, lost])])
    run.write(tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["rounds"][0]["per_client"] == [
        {"client": 0, "status": "ok", "bytes_down": 100, "examples": 4, "train_seconds": 0.5,
         "peak_rss_bytes": 2.0**20, "profile": "tiny", "slice_dims": [32, 8, 10]},
        {"client": 1, "status": "lost", "bytes_down": 100, "reason": "no reply in time"},
    ]
    assert saved == run.to_dict()
    loaded = RunMetrics.load(tmp_path)
    assert loaded.rounds[0].per_client == [ok, lost]
    assert all(isinstance(r, ClientRecord) for r in loaded.rounds[0].per_client)


def test_round_settings_cross_the_message_as_config_keys() -> None:
    import pytest

    from fedsparse.protocol import RoundSettings

    settings = RoundSettings(server_round=3, local_steps=5, lr=0.01, batch_size=32)
    config = settings.to_config()
    assert config == {"server-round": 3, "local-steps": 5, "lr": 0.01, "batch-size": 32}
    assert RoundSettings.from_config({**config, "subnet": 1}) == settings  # an algorithm's own keys pass by
    with pytest.raises(ValueError, match="lacks 'lr'"):
        RoundSettings.from_config({k: v for k, v in config.items() if k != "lr"})
