"""fedsparse.protocol.wire_bytes: the size of a message as Flower's transport sends it, computed
without deflating and hashing it, equals Flower's own computation on every kind of message;
``array_record`` and ``torch_state`` encode and decode arrays exactly as Flower does."""

import numpy as np
import pytest
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord,
                      RecordDict)

from fedsparse.protocol import array_record, torch_state, wire_bytes, wire_bytes_flower
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


# --- array_record / torch_state: Flower's encoding, byte for byte, in fewer copies ----------------
def tensors() -> dict[str, object]:
    g = torch.Generator().manual_seed(2)
    return {"c-order": torch.randn(5, 7, generator=g), "transposed (Fortran order)": torch.randn(5, 7, generator=g).t(),
            "strided view": torch.randn(6, 8, generator=g)[::2, 1::3], "0-d": torch.tensor(3.5),
            "empty": torch.zeros(0, 4), "int64": torch.arange(10), "bool": torch.tensor([True, False, True]),
            "float16": torch.randn(3, 2, generator=g).half(), "uint8": torch.arange(7, dtype=torch.uint8),
            "permuted 3-d": torch.randn(2, 3, 4, generator=g).permute(2, 0, 1), "a slice": torch.randn(384, 768, generator=g),
            "numpy float64": np.arange(6, dtype=np.float64).reshape(2, 3)}


@pytest.mark.parametrize("name", list(tensors()))
def test_array_record_is_flowers_record_byte_for_byte(name):
    value = tensors()[name]
    mine = array_record({name: value})[name]
    theirs = Array(value) if isinstance(value, np.ndarray) else ArrayRecord({name: value})[name]
    assert (mine.dtype, mine.shape, mine.stype, mine.data) == (theirs.dtype, theirs.shape, theirs.stype, theirs.data)
    assert mine.object_id == theirs.object_id  # the same object on the wire


def test_array_record_leaves_what_it_cannot_encode_to_flower():
    with pytest.raises(TypeError, match="BFloat16"):  # Flower's own error
        array_record({"x": torch.randn(2).bfloat16()})


def test_torch_state_is_flowers_state_dict():
    record = ArrayRecord({k: v for k, v in tensors().items() if isinstance(v, torch.Tensor)})
    mine, theirs = torch_state(record), record.to_torch_state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and mine[key].shape == theirs[key].shape, key
        assert torch.equal(mine[key], theirs[key]) and mine[key].stride() == theirs[key].stride(), key
    again = torch_state(record)  # headers now come from the cache: same tensors, own memory
    assert all(torch.equal(again[k], mine[k]) and again[k].data_ptr() != mine[k].data_ptr() for k in mine if mine[k].numel())
    mine["a slice"].add_(1.0)  # writable, and not the message's bytes
    assert torch.equal(torch_state(record)["a slice"], theirs["a slice"])


@pytest.mark.parametrize("data, error", [
    ("short", "EOF: reading array data"),
    (b"\x93NUMPY\x01\x00\x05\x00{{{{{", ""),  # a header that is not a dict literal
    (b"hello", "pickled"),  # no .npy magic: Flower's reader
    ("object", "Object arrays cannot be loaded"),
])
def test_torch_state_fails_on_malformed_arrays_as_flower_does(data, error):
    import io

    if data == "short":
        data = ArrayRecord({"x": torch.randn(10)})["x"].data[:-8]
    elif data == "object":
        buf = io.BytesIO()
        np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
        data = buf.getvalue()
    record = ArrayRecord({"x": Array(dtype="float32", shape=(10,), stype="numpy.ndarray", data=data)})
    with pytest.raises(Exception, match=error or None) as mine:  # "": Flower's message is empty too
        torch_state(record)
    with pytest.raises(Exception) as theirs:
        record.to_torch_state_dict()
    assert type(mine.value) is type(theirs.value)
