"""How SecAgg+'s values travel in Flower records, the same on both sides (server_stages, client_stages):
id lists as text, {id: bytes} maps as ConfigRecords, an adapter's arrays as one flat float64 vector."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord


def flatten(arrays: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel() for k in keys]).astype(np.float64)


def unflatten(vector: np.ndarray, schema: list[list[Any]], keys: list[str]) -> dict[str, np.ndarray]:
    shapes = {n: tuple(s) for n, s, _ in schema}
    out, at = {}, 0
    for k in keys:
        size = int(np.prod(shapes[k]))
        out[k] = vector[at : at + size].reshape(shapes[k]).astype(np.float32)
        at += size
    return out


def ints(values: list[int]) -> str:
    """Lists of ids travel as text: Flower records cannot hold an empty list."""
    return ",".join(str(v) for v in values)


def parse_ints(text: Any) -> list[int]:
    return [int(v) for v in str(text).split(",") if v]


def bytes_record(d: dict[int, bytes]) -> ConfigRecord:
    return ConfigRecord({str(k): v for k, v in d.items()})


def from_bytes_record(r: ConfigRecord) -> dict[int, bytes]:
    return {int(k): bytes(v) for k, v in r.items()}
