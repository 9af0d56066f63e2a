"""Run folders of adapters with random (non-zero) weights, laid out as a federation writes them: RUN/global
and RUN/personal/<user>/{personal,global,choice.json}. Serving does not care how an adapter was trained, and
random LoRA B makes every adapter's outputs differ from the base's and from each other's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config.tree import AdapterConfig
from fedpeft.model.adapters import adapter_state, inject, load_adapter_state, peft_config_dict, save_adapter
from fedpeft.model.base import Base
from fedpeft.personal.store import PersonalStore


def random_arrays(model: Any, seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in adapter_state(model).items():
        if ".lora_B." in k or ".ia3_" in k or k == "prompt_embeddings":
            v = v + rng.normal(0, scale, v.shape).astype(v.dtype)
        out[k] = v
    return out


def write_run(
    root: Path,
    base: Base,
    users: list[str],
    cfg: AdapterConfig | None = None,
    scale: float = 0.02,
    seed: int = 0,
) -> Any:
    """Write the run folder; returns the peft model (holding the last adapter written) for reference outputs."""
    cfg = cfg or AdapterConfig()
    model = inject(base, cfg)
    load_adapter_state(model, random_arrays(model, seed, scale))
    save_adapter(model, base, cfg, root / "global", extra={"round": 3})
    doc = base.doc() | {"path": str(base.path)}  # as fedpeft.device.runtime saves a store
    for i, user in enumerate(users):
        store = PersonalStore(root / "personal", user)
        arrays = random_arrays(model, seed + 1 + i, scale)
        for which in ("personal", "global"):
            store.save(which, arrays, peft_config_dict(model), doc, cfg, 3, "finetune")
        store.save_choice({"use": "personal", "global_round": 3, "note": ""})
    return model


def peft_generate(engine: Any, name: str, prompt: str, tokens: int) -> list[int]:
    """Greedy token ids peft's own generate() gives `prompt` with the served adapter `name` active (or none for
    the base), end-of-text tokens left out: what a served request must match."""
    enc = engine.tokenizer(prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=engine.pad)
    if engine.multi is not None:  # the served model is our operator: peft's reference is a model of its own
        return _peft_reference(engine, name, enc, kwargs)
    if name == "base":
        with engine.model.disable_adapter():
            out = engine.model.generate(**enc, **kwargs)
    else:
        engine.model.set_adapter(engine._internal[name])
        out = engine.model.generate(**enc, **kwargs)
    return [t for t in out[0, enc["input_ids"].shape[1] :].tolist() if t not in engine.eos]


def peft_model_for(engine: Any, name: str) -> Any:
    """A fresh base with the served adapter `name` applied by peft (its files re-read from disk), or the plain
    base for "base"."""
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.adapters import apply_adapter, read_adapter
    from fedpeft.model.base import load_base

    base = load_base(BaseConfig(model=str(engine.base.path), quant="none"))
    if name == "base":
        return base.model
    return apply_adapter(base, read_adapter(engine.entries[name].files.path))


def _peft_reference(engine: Any, name: str, enc: Any, kwargs: dict[str, Any]) -> list[int]:
    out = peft_model_for(engine, name).generate(**enc, **kwargs)
    return [t for t in out[0, enc["input_ids"].shape[1] :].tolist() if t not in engine.eos]
