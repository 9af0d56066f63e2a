"""`fedpeft export --merge`: an adapter merged into a plain Hugging Face model folder.

Onto which base is the choice that matters. A device runs the adapter on the quantized base, whose
rounding the adapter partly learned to offset; a user of the merged model runs transformers alone.
QLoRA's practice (Dettmers et al., NeurIPS 2023) merges onto the full-precision weights, which is the
default here (`--merge-onto full`): on the default model it scored better than the device's own NF4 model
(benchmarks/README.md, "Quantization"; docs/single-device.md, "Merged models"). `--merge-onto quantized`
reproduces the device's model instead: the quantized weights dequantized, the adapter merged into them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Literal

import torch

from fedpeft.atomic import atomic_dir
from fedpeft.config.tree import BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import AdapterFiles, check_fingerprint, inject, load_adapter_state
from fedpeft.model.base import Base, load_base
from fedpeft.model.quant import dequantize_linears

MergeOnto = Literal["full", "quantized"]


def merge_base(files: AdapterFiles, onto: MergeOnto, model: str, cache_dir: str | None) -> Base:
    """The base to merge onto, as plain fp32 layers. The adapter's own (quantized) base is loaded first
    and its fingerprint checked: that proves `model` is the file the adapter was trained on, which the
    full-precision base (a different fingerprint) could not prove alone."""
    kind = files.adapter_config.kind
    if files.adapter_config.prompt_learning:
        raise FedpeftError(
            f"a {kind} tuning adapter has no weights to merge into the base (its virtual tokens run in front of "
            "the input): export it without --merge and load it with peft"
        )
    quant = files.meta["quant"]
    # on the CPU wherever a GPU is: the exported weights must not depend on the machine that merged them
    # fp32 compute: a merge multiplies nothing at speed, and widens the weights to fp32 anyway
    own = load_base(
        BaseConfig(model=model, quant=quant, cache_dir=cache_dir, device="cpu", compute_dtype="fp32")
    )
    check_fingerprint(files.fingerprint, own, f"adapter {files.path}")
    if onto == "full" and quant != "none":
        del own
        gc.collect()
        return load_base(
            BaseConfig(model=model, quant="none", cache_dir=cache_dir, device="cpu", compute_dtype="fp32")
        )
    dequantize_linears(own.model)  # nf4/int8 weights exactly as the device multiplies them, in fp32
    own.model.float()  # bf16 values are exact in fp32; merging in fp32 keeps small deltas
    return own


def merged_model(base: Base, files: AdapterFiles) -> torch.nn.Module:
    """The adapter merged into `base`'s weights (any adapter type: the layers are plain fp32 Linear)."""
    model = inject(base, files.adapter_config)
    load_adapter_state(model, files.arrays, what=f"adapter {files.path}")
    return model.merge_and_unload()


def export_merged(base: Base, files: AdapterFiles, dest: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `files` merged into `base` (from merge_base) as a folder that
    `AutoModelForCausalLM.from_pretrained` loads alone; atomic."""
    merged = merged_model(base, files).to(dtype)
    with atomic_dir(Path(dest)) as tmp:
        merged.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
    return Path(dest)
