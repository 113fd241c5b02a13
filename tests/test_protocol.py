"""fedsparse.protocol.wire_bytes: the size of a message as Flower's transport sends it, computed
without deflating and hashing it, equals Flower's own computation on every kind of message."""

import pytest
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord,
                      RecordDict)

from fedsparse.protocol import wire_bytes, wire_bytes_flower
from strategies.flower_internals import set_task_identity

set_task_identity()


def head(zero_biases: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bias = (lambda n: torch.zeros(n)) if zero_biases else (lambda n: torch.randn(n, generator=g))
    return {"w0": torch.randn(64, 24, generator=g), "b0": bias(64), "w1": torch.randn(64, 64, generator=g),
            "b1": bias(64), "w2": torch.randn(10, 64, generator=g), "b2": bias(10)}


def train_message(content: RecordDict) -> Message:
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def cases() -> dict[str, object]:
    state = head()
    sent = train_message(RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"lr": 0.1, "subnet": 2})}))
    return {
        "array record, two identical zero biases": ArrayRecord(state),
        "array record, all arrays distinct": ArrayRecord(head(zero_biases=False)),
        "record dict with every record kind": RecordDict({"arrays": ArrayRecord(state),
                                                          "config": ConfigRecord({"a": 1, "b": "x", "c": [1.5, 2.5]}),
                                                          "metrics": MetricRecord({"k": 1.5, "n": 3})}),
        "training message": sent,
        "reply with metrics": Message(RecordDict({"arrays": ArrayRecord(head(False)),
                                                  "metrics": MetricRecord({"num-examples": 10})}), reply_to=sent),
        "error reply (no content)": Message(Error(code=3, reason="client raised"), reply_to=sent),
        "empty message": train_message(RecordDict()),
        "the same array record twice": RecordDict({"a": ArrayRecord(state), "b": ArrayRecord(state)}),
        "two equal config records": RecordDict({"c1": ConfigRecord({"a": 1}), "c2": ConfigRecord({"a": 1})}),
        "empty array": ArrayRecord({"x": torch.zeros(0)}),
        "one array": Array(torch.randn(5, 3).numpy()),
        "int and bool arrays": ArrayRecord({"i": torch.arange(12), "b": torch.ones(12, dtype=torch.bool)}),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_wire_bytes_is_flowers_size(name):
    obj = cases()[name]
    assert wire_bytes(obj) == wire_bytes_flower(obj)


@pytest.mark.parametrize("chunk", [100, 256, 1000])
def test_wire_bytes_counts_chunks_as_flower_cuts_them(monkeypatch, chunk):
    """Arrays over Flower's chunk size are cut into chunks; identical chunks (runs of zeros) are
    sent once, and ones of equal length but different bytes each."""
    from flwr.app.message import array as array_module

    monkeypatch.setattr(array_module, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", chunk)
    g = torch.Generator().manual_seed(1)
    objs = [ArrayRecord(head()), ArrayRecord({"z": torch.zeros(3000), "r": torch.randn(777, generator=g),
                                              "s": torch.randn(777, generator=g)}),
            train_message(RecordDict({"arrays": ArrayRecord({"z": torch.zeros(1000), "y": torch.zeros(250)})}))]
    for obj in objs:
        assert wire_bytes(obj) == wire_bytes_flower(obj)
    few = ArrayRecord({"z": torch.zeros(3000)})  # 12,000 zero bytes: all full chunks are one object
    assert wire_bytes(few) < 12_000 // chunk * chunk
