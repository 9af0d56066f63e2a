"""Adapter files without a model: PEFT folders, our metadata, the schema. No torch, so the server (which
never loads the base) writes global adapters and checkpoints with numpy and safetensors alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from fedpeft.atomic import atomic_dir
from fedpeft.config.tree import AdapterConfig

META_FILE = "fedpeft.json"  # our metadata beside PEFT's files; peft ignores it
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1

Schema = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype), sorted by name


def names_base(expected: str, fingerprint: str, source: str = "") -> bool:
    """Whether a federation's or an adapter's base (`expected`) is this base of exact `fingerprint` and `source`:
    it names the exact quantized base, or (devices of several quantizations) the source weights they share
    (fedpeft.model.fingerprint). One rule for the device, the server, adapter loading and serving."""
    return expected in (fingerprint, source or fingerprint)


def schema_of(arrays: dict[str, np.ndarray]) -> Schema:
    return [(k, tuple(int(d) for d in arrays[k].shape), str(arrays[k].dtype)) for k in sorted(arrays)]


def schema_json(schema: Schema) -> list[list[Any]]:
    """The schema as files and messages hold it: [[name, [shape...], dtype], ...]. Lists, not tuples, so it
    compares equal to what JSON reads back (personal stores compare it so)."""
    return [[n, list(s), d] for n, s, d in schema]


def schema_from_json(doc: list[list[Any]]) -> Schema:
    return [(n, tuple(s), d) for n, s, d in doc]


def _jsonable(obj: Any) -> Any:
    """peft configs hold sets (target_modules); JSON wants lists, sorted so files are reproducible."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "value") and type(obj).__module__.startswith("peft"):  # enums such as TaskType
        return obj.value
    return obj


def adapter_json(cfg: AdapterConfig) -> dict[str, Any]:
    """The adapter's settings as checkpoints and fedpeft.json hold them. virtual_tokens only where it means
    something (prompt and prefix tuning), lora_sb only under Fed-SB: a LoRA or IA3 file stays what earlier code
    wrote and reads."""
    doc = _jsonable(asdict(cfg))
    doc["r"] = cfg.rank  # resolved: a file must not change meaning with a default (VeRA's, Fed-SB's)
    if not cfg.prompt_learning:
        doc.pop("virtual_tokens")
    if not cfg.lora_sb:
        doc.pop("lora_sb")
    return doc


@dataclass(frozen=True)
class AdapterDescription:
    """What the server knows of the adapter without loading the base: one client describes it at
    registration (JSON in the reply), and every checkpoint keeps it (state.json's "info")."""

    fingerprint: str  # the federation's base
    schema: Schema  # every adapter tensor, the ones that stay on the device included
    travel_keys: list[str]  # the tensors that travel and are aggregated
    peft_config: dict[str, Any]  # PEFT's adapter_config.json
    adapter: AdapterConfig
    base_path: str
    quant: str
    base: dict[str, str] = field(
        default_factory=dict
    )  # fedpeft.model.base.Base.doc(): how to get the base back

    def to_json(self) -> dict[str, Any]:
        """A JSON object (the format of checkpoints and of the registration reply: keep it readable)."""
        return {
            "fingerprint": self.fingerprint,
            "schema": schema_json(self.schema),
            "travel_keys": list(self.travel_keys),
            "peft_config": _jsonable(self.peft_config),
            "adapter": adapter_json(self.adapter),
            "base_path": self.base_path,
            "quant": self.quant,
            **({"base": dict(self.base)} if self.base else {}),  # checkpoints before it had none
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AdapterDescription:
        """Inverse of to_json; raises KeyError, TypeError or ValueError on a malformed object."""
        adapter = dict(doc["adapter"])
        for key in ("target_modules", "feedforward_modules"):
            adapter[key] = tuple(adapter[key])
        return cls(
            fingerprint=str(doc["fingerprint"]),
            schema=schema_from_json(doc["schema"]),
            travel_keys=[str(k) for k in doc["travel_keys"]],
            peft_config=dict(doc["peft_config"]),
            adapter=AdapterConfig(**adapter),
            base_path=str(doc["base_path"]),
            quant=str(doc["quant"]),
            base={str(k): str(v) for k, v in dict(doc.get("base", {})).items()},  # older checkpoints: none
        )


def adapter_meta(
    fingerprint: str,
    base_path: str,
    quant: str,
    cfg: AdapterConfig,
    arrays: dict[str, np.ndarray],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "base_fingerprint": fingerprint,
        "base_path": base_path,
        "quant": quant,
        "adapter": adapter_json(cfg),
        "schema": schema_json(schema_of(arrays)),
        "round": None,
        **extra,
    }


def write_adapter_dir(
    dest: Path,
    arrays: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    meta: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a PEFT folder (adapter_config.json + adapter_model.safetensors) plus fedpeft.json, atomically:
    `dest` is replaced whole only once everything is written. Needs no model, so the server can use it."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(_jsonable(peft_config), indent=2, sort_keys=True) + "\n")
        save_file(
            {k: np.ascontiguousarray(arrays[k]) for k in sorted(arrays)},
            tmp / WEIGHTS_FILE,
            metadata={"format": "pt"},
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return dest


def trains(name: str, cfg: AdapterConfig) -> bool:
    """Whether the adapter weight `name` (a parameter's or a state-dict key) trains under `cfg`."""
    if cfg.lora_sb:
        return ".lora_R." in name
    is_adapter = (
        ".lora_" in name
        or ".ia3_" in name
        or ".vera_lambda_" in name
        or name.startswith("prompt_encoder.")
        or name == "prompt_embeddings"  # prompt and prefix tuning's state key
    )
    return is_adapter and not (cfg.freeze_a and ".lora_A." in name)
