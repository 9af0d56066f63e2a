"""How the shared base is stored: the --quant modes (none, bf16, bitsandbytes int8 and nf4), `auto`
resolved by the model's size, a folder loaded quantized and frozen, and bitsandbytes' layers undone."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedpeft.config.tree import QUANTS
from fedpeft.errors import FedpeftError

# `--quant auto` (the default): NF4 from this many parameters up, bf16 below. On the default 135M model NF4
# cost the base a large part of its held-out perplexity and the federation most of its gain against the fp32
# base, to save a small part of a device's memory (benchmarks/README.md, "Quantization"). Small models lose
# the most to 4-bit rounding; where NF4's saving is gigabytes (QLoRA: 7B-65B) it is the way to fit at all.
# The 1B line itself is a judgment: only the 135M model was measured.
AUTO_NF4_PARAMS = 1_000_000_000


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
    from transformers import BitsAndBytesConfig  # transformers: only the bitsandbytes modes need it

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


def parameter_count(path: Path) -> int:
    """Parameters in a model folder's safetensors files, from their headers (no tensor is read)."""
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


def quiet_base_libraries() -> None:
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


def load_model(path: Path, quant: str) -> Any:
    """The base from its full-precision folder, quantized (nf4/int8) or cast (bf16/none) while loading."""
    # transformers (and through it bitsandbytes, which logs at import): only after quiet_base_libraries
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, **quantization_kwargs(quant))
    except Exception as e:  # corrupt/truncated safetensors, bad config.json, unsupported architecture
        raise FedpeftError(f"cannot load base model from {path}: {first_line(e)}") from None
    return freeze(model, quant)


def freeze(model: Any, quant: str) -> Any:
    if quant == "nf4":
        disable_cpu_4bit_packing(model)
    model.eval()
    model.requires_grad_(False)
    return model


def disable_cpu_4bit_packing(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel, in place.

    On AVX512-BF16 CPUs a Linear4bit run in eval mode without grad repacks its weight for a fast
    gemv kernel (bitsandbytes 0.49+, `packing_format_for_cpu`) and keeps it packed. That is lossy
    (absmax is cast to bf16) and its inverse does not restore absmax unless double-quantized, and a
    later training forward through the packed kernel has no autograd formula: gradients reaching
    earlier adapter layers came out 89% wrong here (tests/training/test_train.py). The shared base must stay
    bit-identical to its fingerprint, so the standard dequantize-then-matmul path is used always.
    """
    import bitsandbytes as bnb  # bitsandbytes logs at import: only once quiet_base_libraries has run

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def dequantize_linears(model: Any) -> None:
    """Replace every bitsandbytes layer by a plain nn.Linear holding its dequantized weight, in place.

    transformers' own `model.dequantize()` gives wrong logits on CPU for nf4 here (seen with bnb 0.50.2),
    so we dequantize layer by layer with peft's helper, which calls bitsandbytes directly.
    """
    # bitsandbytes (it logs at import) and peft: only merging a quantized base needs them
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


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
