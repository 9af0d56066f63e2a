"""Adapters on the frozen base, through peft: inject LoRA/IA3, the adapter schema, named arrays, files.

The adapter schema (sorted names, shapes, dtypes) is the contract between clients and the server:
what travels and what gets aggregated is a dict of named numpy arrays in exactly that order, with
PEFT's own file keys (`...q_proj.lora_A.weight`, `...k_proj.ia3_l`), so names are never lost and a
saved adapter is a folder Hugging Face PEFT loads as it is.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

from fedpeft.atomic import atomic_dir
from fedpeft.config.tree import AdapterConfig
from fedpeft.errors import FedpeftError
from fedpeft.model import fed_sb
from fedpeft.model.adapter_files import (  # re-exported: the model-free half of this module
    CONFIG_FILE,
    FORMAT_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    Schema,
    _jsonable,
    adapter_meta,
    names_base,
    schema_from_json,
    schema_of,
    trains,
    write_adapter_dir,
)
from fedpeft.model.base import Base
from fedpeft.model.placement import model_device
from fedpeft.model.precision import autocast


def _peft_config(cfg: AdapterConfig) -> Any:
    # peft imports bitsandbytes, which logs at import: only once load_base has quieted it
    from peft import IA3Config, LoraConfig

    if cfg.kind in ("lora", "dora"):
        return LoraConfig(
            r=cfg.rank,
            use_dora=cfg.kind == "dora",
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.targets()),
            bias="none",
            task_type="CAUSAL_LM",
        )
    if cfg.kind == "ia3":
        return IA3Config(
            target_modules=list(cfg.targets()),
            feedforward_modules=[m for m in cfg.feedforward_modules if m in cfg.targets()],
            task_type="CAUSAL_LM",
        )
    if cfg.kind == "prompt":
        from peft import PromptTuningConfig  # peft: see _peft_config

        return PromptTuningConfig(
            num_virtual_tokens=cfg.virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB", task_type="CAUSAL_LM"
        )
    if cfg.kind == "prefix":
        from peft import PrefixTuningConfig  # peft: see _peft_config

        return PrefixTuningConfig(num_virtual_tokens=cfg.virtual_tokens, task_type="CAUSAL_LM")
    if cfg.kind == "vera":
        from peft import VeraConfig  # peft: see _peft_config

        # the shared random matrices are drawn from the federation's seed, so every client draws the same ones
        return VeraConfig(
            r=cfg.rank,
            target_modules=list(cfg.targets()),
            projection_prng_key=cfg.seed,
            vera_dropout=cfg.dropout,
            task_type="CAUSAL_LM",
        )
    raise FedpeftError(f"unknown adapter {cfg.kind!r}; choose lora, ia3, prompt, prefix, vera or dora")


def check_targets(model: Any, targets: tuple[str, ...]) -> None:
    """peft matches target names against module-name suffixes; fail early and clearly on a typo."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if len(missing) == len(targets):
        raise FedpeftError(f"the base model has none of the target modules: {', '.join(targets)}")
    if missing:
        raise FedpeftError(f"target modules not in the base model: {', '.join(missing)}")


def inject(base: Base, cfg: AdapterConfig) -> Any:
    """Wrap the frozen base with a fresh adapter. The init is seeded, so every client that uses the
    same seed builds the same LoRA A (what FFA-LoRA relies on). Returns a peft PeftModel."""
    from peft import get_peft_model  # peft: see _peft_config

    if not cfg.prompt_learning:
        check_targets(base.model, cfg.targets())
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base.model, _peft_config(cfg))
    if cfg.kind == "prefix":
        _init_prefix(model, base.compute, cfg)
    if cfg.lora_sb:
        fed_sb.attach(model, cfg.rank)
    # a name a user elsewhere can resolve (the public id when known), not a path into this machine's cache
    model.peft_config["default"].base_model_name_or_path = base.public_id or str(base.path)
    set_trainable(model, cfg)
    return model


def prefix_init_ids(vocab: int, cfg: AdapterConfig) -> torch.Tensor:
    """The vocabulary tokens prefix tuning starts from: seeded, so every client draws the same ones."""
    return torch.randint(0, vocab, (1, cfg.virtual_tokens), generator=torch.Generator().manual_seed(cfg.seed))


@torch.no_grad()
def _init_prefix(model: Any, compute: str, cfg: AdapterConfig) -> None:
    """Prefix tuning's keys and values start as the base's own for `prefix_init_ids`, as if those tokens came
    before the text (as prompt tuning starts from their embeddings; Li and Liang, 2021, found initializing
    from real words' activations better). peft's default, N(0, 1) values, swamps the real keys and values:
    on the default model the main command's federation went from held-out ppl 31.46 to 732 in its first
    round (benchmarks/federation.py adapters)."""
    hf = model.get_base_model()
    device = model_device(hf)
    ids = prefix_init_ids(hf.get_input_embeddings().weight.shape[0], cfg).to(device)
    with autocast(compute, device.type):
        out = hf(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    n = cfg.virtual_tokens
    # peft reads row i as [layer 0 keys, layer 0 values, layer 1 keys, ...], each (heads x head_dim)
    parts = [
        t[0].permute(1, 0, 2).reshape(n, -1) for layer in cache.layers for t in (layer.keys, layer.values)
    ]
    weight = model.prompt_encoder["default"].embedding.weight
    init = torch.cat(parts, dim=1).float()
    if init.shape != weight.shape:
        raise FedpeftError(
            f"prefix tuning: the base's cache is {tuple(init.shape)}, peft expects {tuple(weight.shape)}"
        )
    weight.copy_(init.to(weight.device))


def set_trainable(model: Any, cfg: AdapterConfig) -> None:
    """The one place that decides what trains: adapter weights only; with freeze_a, LoRA B only; under Fed-SB
    the r x r matrix only. VeRA's shared random matrices never train."""
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name, cfg))


@contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """peft's disable_adapter() (the base alone), leaving which weights train as it found them: on exit peft
    marks every weight of the active adapter trainable (BaseTunerLayer.enable_adapters -> set_adapter, peft
    0.21), which undid FFA-LoRA's frozen A for the training that followed an evaluation of the base."""
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with model.disable_adapter():
            yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trains.get(name, p.requires_grad))


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _peft_state(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict  # peft: see _peft_config

    # save_embedding_layers="auto" (peft's default) asks the Hugging Face hub for the config of
    # base_model_name_or_path, now a public id: a network call from a device at every save. The adapters
    # never touch the embeddings, so there is nothing to ask about.
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def _live(model: Any) -> tuple[dict[str, torch.Tensor], Schema] | None:
    """The adapter's tensors under PEFT's file keys, each sharing storage with its live parameter, and the
    schema; built once per model and rebuilt if a parameter moved (None when peft's state is not plain
    views of parameters). Reading and writing through them skips peft's per-call key mapping, which made a
    simulated client on a small model measurably faster (benchmarks/README.md, "Federation scale")."""
    cached = model.__dict__.get("_fedpeft_live")
    if cached is not None:
        views, schema, params = cached
        if all(p.data_ptr() == ptr for p, ptr in params):
            return views, schema
    state = _peft_state(model)
    by_ptr = {p.data_ptr(): p for p in model.parameters()}
    params = []
    for t in state.values():
        p = by_ptr.get(t.data_ptr())
        if p is None or p.shape != t.shape or p.dtype != t.dtype:
            return None
        params.append((p, p.data_ptr()))
    views = {k: state[k] for k in sorted(state)}
    schema = schema_of({k: _to_numpy(v) for k, v in views.items()})
    model.__dict__["_fedpeft_live"] = (views, schema, params)
    return views, schema


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """The adapter as named float arrays under PEFT's file keys, sorted by name (copies)."""
    live = _live(model)
    state = live[0] if live is not None else _peft_state(model)
    return {k: _to_numpy(state[k]) for k in sorted(state)}


def adapter_schema(model: Any) -> Schema:
    live = _live(model)
    return live[1] if live is not None else schema_of(adapter_state(model))


def check_schema(expected: Schema, got: Schema, what: str) -> None:
    if [tuple(e) for e in expected] == [tuple(g) for g in got]:
        return
    exp = {e[0]: tuple(e) for e in expected}
    gotd = {g[0]: tuple(g) for g in got}
    missing = sorted(set(exp) - set(gotd))
    extra = sorted(set(gotd) - set(exp))
    if missing or extra:
        name = (missing or extra)[0]
        kind = "missing" if missing else "unexpected"
        raise FedpeftError(
            f"{what} does not match the adapter schema: {len(missing)} missing, {len(extra)} unexpected "
            f"tensors ({kind}: {name})"
        )
    name = next(k for k in exp if exp[k] != gotd[k])
    (_, got_shape, got_dtype), (_, exp_shape, exp_dtype) = gotd[name], exp[name]
    raise FedpeftError(
        f"{what} does not match the adapter schema: {name} is {got_shape} {got_dtype}, expected {exp_shape} {exp_dtype}"
    )


def load_adapter_state(model: Any, arrays: dict[str, np.ndarray], what: str = "adapter") -> None:
    """Set the adapter weights from named arrays; the names, shapes and dtypes must match exactly."""
    from peft import set_peft_model_state_dict  # peft: see _peft_config

    check_schema(adapter_schema(model), schema_of(arrays), what)
    for k, v in arrays.items():
        if not np.all(np.isfinite(v)):
            raise FedpeftError(f"{what} holds NaN or Inf in {k}")
    live = _live(model)
    if live is not None:  # in place, into the parameters' own storage (the schema matched: every key)
        with torch.no_grad():
            for k, view in live[0].items():
                view.copy_(torch.from_numpy(np.ascontiguousarray(arrays[k])))
        return
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    unplaced = not_placed(model, set_peft_model_state_dict(model, state))
    if unplaced:
        raise FedpeftError(f"{what}: peft did not place {unplaced[0]}")


def not_placed(model: Any, result: Any) -> list[str]:
    """The keys set_peft_model_state_dict left unused. Prompt learning's prompt_embeddings always show as
    unexpected to the module load, and peft loads them into the prompt encoder after it."""
    keys = list(getattr(result, "unexpected_keys", None) or [])
    if getattr(model, "_is_prompt_learning", False):
        keys = [k for k in keys if k != "prompt_embeddings"]
    return keys


@dataclass
class AdapterFiles:
    """An adapter folder as read from disk: PEFT's config, the named arrays, our metadata."""

    path: Path
    peft_config: dict[str, Any]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        """The base it was trained against: an exact quantized base, or a federation's source weights."""
        return self.meta["base_fingerprint"]

    @property
    def source(self) -> str:
        """The source weights of that base (fedpeft.model.fingerprint); files written before it was recorded
        name the exact base only."""
        base = self.meta.get("base")
        return str(base.get("source") or self.fingerprint) if isinstance(base, dict) else self.fingerprint

    @property
    def exact(self) -> bool:
        """Whether it names one exact quantized base (a single device's adapter, a pinned federation's) rather
        than source weights that every quantization of them serves."""
        return self.fingerprint != self.source

    @property
    def adapter_config(self) -> AdapterConfig:
        raw = dict(self.meta["adapter"])
        raw["target_modules"] = tuple(raw["target_modules"])
        raw["feedforward_modules"] = tuple(raw["feedforward_modules"])
        return AdapterConfig(**raw)


def peft_config_dict(model: Any) -> dict[str, Any]:
    return _jsonable(model.peft_config["default"].to_dict())


def save_adapter(
    model: Any,
    base: Base,
    cfg: AdapterConfig,
    dest: Path,
    extra: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save the adapter of `model` (see write_adapter_dir); a Fed-SB adapter as the plain LoRA it equals."""
    arrays = adapter_state(model)
    if cfg.lora_sb:
        arrays, cfg = fed_sb.fold(arrays), dataclasses.replace(cfg, lora_sb=False, r=cfg.rank)
    meta = adapter_meta(
        base.fingerprint, str(base.path), base.quant, cfg, arrays, base=base.doc(), **(extra or {})
    )
    return write_adapter_dir(dest, arrays, peft_config_dict(model), meta, extra_files)


def read_adapter(path: Path) -> AdapterFiles:
    """Read and validate an adapter folder; every defect is a one-line FedpeftError."""
    path = Path(path)
    if not path.is_dir():
        raise FedpeftError(f"adapter folder does not exist: {path}")
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (path / name).is_file():
            hint = f"; a federation's adapter is in {path / 'global'}" if (path / "global").is_dir() else ""
            raise FedpeftError(f"not a fedpeft adapter folder ({name} missing): {path}{hint}")
    try:
        peft_config = json.loads((path / CONFIG_FILE).read_text())
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise FedpeftError(f"unreadable adapter metadata in {path}: {e}") from None
    try:
        arrays = load_file(path / WEIGHTS_FILE)
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncation or a bad header
        raise FedpeftError(
            f"corrupt adapter weights {path / WEIGHTS_FILE}: {str(e).splitlines()[0]}"
        ) from None
    arrays = {k: arrays[k] for k in sorted(arrays)}
    if meta.get("format") != FORMAT_VERSION or "base_fingerprint" not in meta or "schema" not in meta:
        raise FedpeftError(f"unsupported fedpeft.json in {path}")
    check_schema(
        schema_from_json(meta["schema"]),
        schema_of(arrays),
        f"adapter weights in {path}",
    )
    return AdapterFiles(path=path, peft_config=peft_config, arrays=arrays, meta=meta)


def check_fingerprint(expected: str, base: Base, what: str) -> None:
    """An adapter names the exact quantized base it was trained on, or (a federation of devices of several
    quantizations) the source weights they share (fedpeft.model.fingerprint)."""
    if not names_base(expected, base.fingerprint, base.source):
        raise FedpeftError(
            f"{what} was trained on another base (fingerprint {expected[:12]}, this base is "
            f"{base.fingerprint[:12]}: different model or --quant)"
        )


def base_model(meta: dict[str, Any]) -> str:
    """The --model that rebuilds an adapter's base here: the folder it was trained on when this machine has
    it, else how fedpeft.json says to get it (default, tiny, or the original path; --model overrides)."""
    if Path(meta["base_path"]).exists():
        return meta["base_path"]
    return str(meta.get("base", {}).get("model", meta["base_path"]))


def apply_adapter(base: Base, files: AdapterFiles) -> Any:
    """Wrap `base` with the adapter from `files`, after checking fingerprint and schema."""
    check_fingerprint(files.fingerprint, base, f"adapter {files.path}")
    model = inject(base, files.adapter_config)
    load_adapter_state(model, files.arrays, what=f"adapter {files.path}")
    return model


def export_adapter(files: AdapterFiles, dest: Path) -> Path:
    """Copy a validated adapter folder to `dest` (atomic)."""
    with atomic_dir(Path(dest)) as tmp:
        for child in files.path.iterdir():
            if child.is_file():
                shutil.copy2(child, tmp / child.name)
    return Path(dest)
