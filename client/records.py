"""Named arrays <-> Flower ArrayRecord. numpy + Flower only: the server imports this without torch."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays travel under their names, in schema order (never as an unnamed list)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}
