"""federation/wire.py: adapters travel packed, and a packed record from the other side is checked first."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpeft.federation.wire import PACKED, SCHEMA, arrays_to_record, record_to_arrays


def _arrays(n: int = 120) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"layers.{i}.lora_A": rng.standard_normal((8, 5 + i % 3), dtype=np.float32) for i in range(n)}
    out["scalar"] = np.array(3.5, dtype=np.float64)
    out["empty"] = np.zeros((0, 4), dtype=np.float16)
    out["counts"] = np.arange(7, dtype=np.int64)
    return out


def test_round_trip_keeps_names_dtypes_shapes_and_values() -> None:
    arrays = _arrays()
    back = record_to_arrays(arrays_to_record(arrays))
    assert sorted(back) == sorted(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape
        np.testing.assert_array_equal(back[k], a)
        assert back[k].flags.writeable and back[k].flags.c_contiguous


def test_a_message_has_a_handful_of_objects_whatever_the_adapter_size() -> None:
    """What the packing is for: Flower moves each Array (and each chunk) as its own object."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as in a SuperNode's process
    msg = Message(RecordDict({"arrays": arrays_to_record(_arrays(120))}), dst_node_id=1, message_type="train")
    packed = len(get_all_nested_objects(msg))
    one_each = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in _arrays(120).items()})
    unpacked = len(
        get_all_nested_objects(Message(RecordDict({"arrays": one_each}), dst_node_id=1, message_type="train"))
    )
    assert packed <= 7 < 200 < unpacked  # message, its records, 2 arrays, 2 chunks


def _tampered(schema: object = None, packed: np.ndarray | None = None, extra: bool = False) -> ArrayRecord:
    good = arrays_to_record({"a": np.ones((2, 3), np.float32)})
    text = good[SCHEMA].numpy() if schema is None else np.frombuffer(json.dumps(schema).encode(), np.uint8)
    record = {PACKED: Array(good[PACKED].numpy() if packed is None else packed), SCHEMA: Array(text)}
    if extra:
        record["b"] = Array(np.ones(1, np.float32))
    return ArrayRecord(record)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (lambda: _tampered(extra=True), "expected the records"),
        (lambda: ArrayRecord({"a": Array(np.ones(2, np.float32))}), "expected the records"),
        (lambda: _tampered([["a", "object", [2, 3]]]), "malformed schema entry"),
        (lambda: _tampered([["a", "float32", [2, -3]]]), "bad shape"),
        (lambda: _tampered([["a", "float32", [2, 4]]]), "describes 32 bytes, 24 arrived"),
        (lambda: _tampered([["a", "float32", [3]], ["a", "float32", [3]]]), "appears twice"),
        (lambda: _tampered({"a": 1}), "malformed schema entry"),
        (lambda: _tampered([["a", "float32", [2, True]]]), "bad shape"),
        (lambda: _tampered(packed=np.ones(6, np.float32)), "malformed packed bytes"),
    ],
)
def test_malformed_records_are_refused_with_a_reason(record, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_to_arrays(record())


def test_a_schema_that_is_not_json_is_refused() -> None:
    good = arrays_to_record({"a": np.ones(2, np.float32)})
    bad = ArrayRecord({PACKED: good[PACKED], SCHEMA: Array(np.frombuffer(b"[[not json", np.uint8))})
    with pytest.raises(ValueError, match="not JSON"):
        record_to_arrays(bad)


def test_dtypes_that_cannot_travel_are_refused_when_packing() -> None:
    with pytest.raises(ValueError, match="cannot travel"):
        arrays_to_record({"a": np.array(["x"], dtype=object)})
