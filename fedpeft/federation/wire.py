"""Named arrays <-> Flower ArrayRecord. numpy + Flower only: the server imports this without torch.

An adapter travels as ONE packed byte array plus its schema (names, dtypes, shapes as JSON), not one
Array per tensor. Flower stores and moves every Array (and its chunk) as a separate object: a LoRA
adapter of the default model is 120 tensors, ~240 objects per message, and each object pull from the
SuperLink costs several SQLite queries there (run status, traffic, token cleanup; flwr 1.42
fleet_handlers.pull_object). Profiled on a deployed round, the SuperLink sat at 100% of a core serving
them; packed, a message has five objects whatever the adapter.

The schema comes from the other side, so it is checked before any byte is read: known dtypes, sane
shapes, sizes that add up to exactly the packed bytes, unique names.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED, SCHEMA = "packed", "schema"
DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint32", "uint8")
MAX_SCHEMA_BYTES = 1 << 20
MAX_NDIM = 8


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays, in name order, packed into one byte array with their schema."""
    names = sorted(arrays)
    parts = [np.require(arrays[k], requirements="C") for k in names]  # keeps 0-d arrays 0-d
    for k, a in zip(names, parts, strict=True):
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {k!r}: dtype {a.dtype.name} cannot travel (one of {', '.join(DTYPES)})")
    schema = [[k, a.dtype.name, list(a.shape)] for k, a in zip(names, parts, strict=True)]
    packed = np.concatenate([a.reshape(-1).view(np.uint8) for a in parts]) if parts else np.zeros(0, np.uint8)
    text = np.frombuffer(json.dumps(schema).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(packed), SCHEMA: Array(text)})


def _schema(record: ArrayRecord) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    if set(record) != {PACKED, SCHEMA}:
        raise ValueError(f"arrays: expected the records {PACKED!r} and {SCHEMA!r}, got {sorted(record)[:5]}")
    raw = record[SCHEMA].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_SCHEMA_BYTES:
        raise ValueError("arrays: malformed schema")
    try:
        rows = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"arrays: schema is not JSON ({e})") from None
    out, seen = [], set()
    for row in rows if isinstance(rows, list) else [None]:
        ok = isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and row[1] in DTYPES
        shape = row[2] if ok else None
        if not ok or not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise ValueError(f"arrays: malformed schema entry {str(row)[:80]}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
            raise ValueError(f"arrays: bad shape for {row[0]!r}: {str(shape)[:80]}")
        if row[0] in seen:
            raise ValueError(f"arrays: {row[0]!r} appears twice")
        seen.add(row[0])
        out.append((row[0], np.dtype(row[1]), tuple(shape)))
    return out


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of a packed record (writable copies). Raises ValueError on anything malformed."""
    schema = _schema(record)
    packed = record[PACKED].numpy()
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError("arrays: malformed packed bytes")
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in schema]
    if sum(sizes) != packed.size:
        raise ValueError(f"arrays: the schema describes {sum(sizes)} bytes, {packed.size} arrived")
    out, at = {}, 0
    for (name, dtype, shape), size in zip(schema, sizes, strict=True):
        out[name] = packed[at : at + size].view(dtype).reshape(shape).copy()
        at += size
    return out
