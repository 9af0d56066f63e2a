"""The base cache: each base once in full precision, and a pre-quantized copy per bitsandbytes mode.

The cache (--cache-dir, $FEDPEFT_CACHE or ~/.cache/fedpeft) holds each base once in full precision
(a plain Hugging Face folder: a GGUF file converted to bf16, or the tiny model) and, per bitsandbytes
mode (nf4, int8), a pre-quantized copy written the first time the base is loaded with that mode:

  <cache>/SmolLM2-135M-Instruct.Q4_1-<sha>/        bf16 (Base.path, PEFT's base_model_name_or_path)
  <cache>/SmolLM2-135M-Instruct.Q4_1-<sha>.nf4/    the same base quantized, + quantized.json
  <cache>/quantized/<name>-<sha of its path>.int8/ a copy of a --model FOLDER given by the user
                                                   (never written into the user's folder)

A later load reads the pre-quantized copy directly (no bf16 copy in memory first) and checks it:
quantized.json names the fingerprint it must give and the source files it was made from (size and
mtime); a copy that fails to load, gives another fingerprint or is older than its source is
rebuilt from the full-precision folder, never used. A read-only cache quantizes at every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_dir
from fedpeft.errors import FedpeftError
from fedpeft.model.fingerprint import fingerprint
from fedpeft.model.quant import (
    first_line,
    freeze,
    load_model,
    quant_settings,
    quantization_kwargs,
    quiet_base_libraries,
)

log = logging.getLogger(__name__)

PREQUANTIZED = ("nf4", "int8")  # the modes a pre-quantized copy is kept for; bf16/none load the folder as is
QUANTIZED_META = "quantized.json"
QUANTIZED_VERSION = 1


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft"
    return Path(root).expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise FedpeftError(f"cannot read model file {path}: {e.strerror}") from None
    return h.hexdigest()


def quantized_dir(path: Path, quant: str, cache_dir: str | None = None) -> Path:
    """Where the cache keeps `path`'s base pre-quantized with `quant`.

    Beside the folder when the folder is one of the cache's own (a converted GGUF, the tiny model);
    for any other folder under <cache>/quantized/, keyed by its absolute path (the source files' sizes
    and mtimes in quantized.json tell when it changed): nothing is ever written into a user's folder.
    """
    path = Path(path).resolve()
    root = cache_root(cache_dir).resolve()
    if path.parent == root:
        return root / f"{path.name}.{quant}"
    key = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return root / "quantized" / f"{path.name}-{key}.{quant}"


def _source_files(path: Path) -> dict[str, list[int]]:
    """(size, mtime in ns) of each file in the full-precision folder: a rewrite of any changes it."""
    out = {}
    for p in sorted(Path(path).iterdir()):
        if p.is_file():
            st = p.stat()
            out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def _small_files(folder: Path) -> dict[str, str]:
    """sha256 of the pre-quantized copy's files other than the tensors (config.json above all: it holds
    the bitsandbytes settings); the tensors are checked through the fingerprint once loaded."""
    return {
        p.name: file_sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix != ".safetensors" and p.name != QUANTIZED_META
    }


def _quantized_meta(qdir: Path, path: Path, quant: str) -> tuple[dict[str, Any] | None, str]:
    """The copy's quantized.json when the copy may be loaded (then its fingerprint is checked), else
    (None, why not)."""
    try:
        meta = json.loads((qdir / QUANTIZED_META).read_text())
        recorded = tuple(meta[k] for k in ("version", "quant", "settings", "source", "files"))
        if not isinstance(meta["fingerprint"], str):
            raise TypeError
    except FileNotFoundError:
        return None, f"no {QUANTIZED_META}"
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{QUANTIZED_META} is unreadable"
    if recorded[:3] != (QUANTIZED_VERSION, quant, _jsonable(quant_settings(quant))):
        return None, "it was written with other quantization settings"
    try:
        if recorded[3] != _source_files(path):
            return None, f"{path} changed since it was written"
        if recorded[4] != _small_files(qdir):
            return None, "its files do not match their sha256"
    except (OSError, FedpeftError):
        return None, "its files cannot be read"
    return meta, ""


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def load_prequantized(qdir: Path, path: Path, quant: str) -> tuple[Any, str] | None:
    """The pre-quantized base and its fingerprint, or None when there is no valid copy (the caller then
    quantizes at load and rewrites it). Never returns a copy whose fingerprint differs from the one
    recorded when it was written."""
    from transformers import AutoModelForCausalLM  # transformers: only loading needs it, not resolving a base

    if not qdir.exists():
        return None
    meta, problem = _quantized_meta(qdir, path, quant)
    if meta is not None:
        try:
            # the bitsandbytes settings come from the copy's config.json (its sha256 checked above);
            # passing ours as well only makes transformers warn and use the file's
            model = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16, device_map="cpu")
        except Exception as e:  # truncated or corrupt safetensors, unreadable files
            problem = f"it does not load ({first_line(e)})"
        else:
            model = freeze(model, quant)
            config = getattr(model.config, "quantization_config", None)
            ours = quantization_kwargs(quant)["quantization_config"]
            fp = fingerprint(model, quant)
            if config is None or _bnb_settings(config) != _bnb_settings(ours):
                problem = "its quantization settings differ"
            elif fp != meta["fingerprint"]:
                problem = "its tensors give another fingerprint than recorded"
            else:
                # everything downstream sees the full-precision folder, as when quantizing at load
                model.name_or_path = model.config._name_or_path = str(path)
                return model, fp
    log.warning("not using the pre-quantized base %s: %s; rebuilding it from %s", qdir, problem, path)
    return None


def _bnb_settings(config: Any) -> dict[str, str]:
    return {k: str(v) for k, v in sorted(config.to_dict().items())}


def store_quantized(model: Any, quant: str, fp: str, qdir: Path, path: Path) -> bool:
    """Write the loaded, quantized base to `qdir` with its quantized.json, atomically. False when the
    cache cannot be written (read-only, full, or another process swapped a copy in at the same time:
    the copy that is there is then theirs, as good as ours)."""
    tmp_dir: Path | None = None
    try:
        with atomic_dir(qdir) as tmp:
            tmp_dir = tmp
            model.save_pretrained(tmp)
            meta = {
                "version": QUANTIZED_VERSION,
                "quant": quant,
                "settings": quant_settings(quant),
                "fingerprint": fp,
                "source": _source_files(path),
                "files": _small_files(tmp),
            }
            (tmp / QUANTIZED_META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    except Exception as e:  # OSError above all; a save bitsandbytes cannot serialize must not stop a load
        if tmp_dir is not None:  # atomic_dir removes it itself unless its final rename failed
            shutil.rmtree(tmp_dir, ignore_errors=True)
        log.warning(
            "cannot write the pre-quantized base to %s (%s); quantizing at every load", qdir, first_line(e)
        )
        return False
    log.info("wrote the pre-quantized base to %s", qdir)
    return True


def prepare_quantized(path: Path, quant: str, cache_dir: str | None = None) -> Path | None:
    """Make sure the cache holds a valid pre-quantized copy of the folder `path` for `quant` (nf4/int8);
    returns it, or None when the cache cannot be written."""
    if quant not in PREQUANTIZED:
        raise FedpeftError(f"no pre-quantized copy for --quant {quant}; only for {', '.join(PREQUANTIZED)}")
    qdir = quantized_dir(path, quant, cache_dir)
    meta, _ = _quantized_meta(qdir, path, quant)
    if meta is not None:  # not loaded here: load_base checks the fingerprint at every load anyway
        return qdir
    quiet_base_libraries()
    model = load_model(path, quant)
    return qdir if store_quantized(model, quant, fingerprint(model, quant), qdir, path) else None
