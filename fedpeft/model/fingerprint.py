"""The base's fingerprints: what makes "every client runs the same frozen base" checkable.

`fingerprint`: a sha256 over the quantized tensors' names, shapes, dtypes and bytes plus the quantization
settings, the exact bytes a device computes with. `source_fingerprint`: the full-precision weights those
were made from, the same for NF4, int8 and bf16 of them. A federation is keyed by the source (devices of
different quantizations of one base join it, each reporting its own) unless a run pins the exact one
(--base-fingerprint); adapter deltas from clients whose source weights differ do not add up.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_write_json, sha256_file
from fedpeft.errors import FedpeftError
from fedpeft.model.quant import quant_settings

FINGERPRINT_VERSION = 1


def unique_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each storage once: tied weights (embeddings = lm_head) appear under two names."""
    seen: set[tuple[int, int]] = set()
    out = []
    for t in state.values():
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def fingerprint(model: Any, quant: str) -> str:
    """sha256 over (name, shape, dtype, bytes) of every base tensor, sorted by name, plus quant settings.

    Computed on the quantized tensors, so the same checkpoint under nf4 and int8 gives two fingerprints,
    and bitsandbytes' quant-state tensors (absmax, quant_map) are covered too.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINGERPRINT_VERSION, **quant_settings(quant)}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


SOURCE_VERSION = 1
# in the cache: (folder, its files' sizes and mtimes) -> fingerprint
SOURCES_FILE = "source-fingerprints.json"


def source_fingerprint(path: Path, cache: Path | None = None) -> str:
    """sha256 of the full-precision weights a base is quantized from, whatever the quantization: what lets
    NF4, int8 and bf16 devices of the same weights join one federation (each device's own quantization is
    reported beside it). Over each safetensors tensor's (name, shape, dtype, bytes), so a re-saved or
    re-sharded copy of the same weights agrees; other weight files by their bytes. Kept in `cache`, keyed
    by the folder and its files' sizes and mtimes, so a load hashes the weights once, not every time."""
    path = Path(path).resolve()
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()}
    known = _read_sources(cache)
    entry = known.get(str(path))
    if isinstance(entry, dict) and entry.get("files") == files and entry.get("v") == SOURCE_VERSION:
        return str(entry["fingerprint"])
    fp = _hash_source(path)
    if cache is not None:
        known[str(path)] = {"v": SOURCE_VERSION, "files": files, "fingerprint": fp}
        _write_sources(cache, known)
    return fp


def _hash_source(path: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256(f"source-v{SOURCE_VERSION}|".encode())
    tensors = sorted(path.glob("*.safetensors"))
    if tensors:
        handles = [safe_open(str(p), framework="pt") for p in tensors]
        names = sorted((name, i) for i, f in enumerate(handles) for name in f.keys())  # noqa: SIM118
        for name, i in names:
            t = handles[i].get_tensor(name).contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    if not weights:
        raise FedpeftError(f"no weight files (*.safetensors, *.bin) in the model folder {path}")
    for p in weights:
        h.update(f"{p.name}|{sha256_file(p)}|".encode())
    return h.hexdigest()


def _read_sources(cache: Path | None) -> dict[str, Any]:
    if cache is None:
        return {}
    try:
        doc = json.loads((cache / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_sources(cache: Path, known: dict[str, Any]) -> None:
    """Atomically (a concurrent reader sees the old file or the new); a cache that cannot be written
    only means hashing again at the next load."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache / SOURCES_FILE, known)
    except OSError:
        pass
