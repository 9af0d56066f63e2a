"""The model-free adapter description: one JSON form for the registration reply and checkpoints."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from fedpeft.config.tree import AdapterConfig
from fedpeft.model.adapter_files import (
    AdapterDescription,
    adapter_meta,
    schema_from_json,
    schema_json,
    schema_of,
)

ARRAYS = {"b.lora_B.weight": np.zeros((4, 2), np.float32), "a.lora_A.weight": np.ones((2, 4), np.float16)}


def _description() -> AdapterDescription:
    return AdapterDescription(
        fingerprint="f" * 64,
        schema=schema_of(ARRAYS),
        travel_keys=["b.lora_B.weight"],
        peft_config={"peft_type": "LORA", "target_modules": {"v_proj", "q_proj"}},
        # the rank resolved, as client_adapter gives it: the JSON holds the rank, never "the default"
        adapter=AdapterConfig(r=8, target_modules=("q_proj", "v_proj"), freeze_a=True),
        base_path="/models/base",
        quant="nf4",
    )


def test_schema_json_is_what_json_reads_back() -> None:
    doc = schema_json(schema_of(ARRAYS))
    assert doc == [["a.lora_A.weight", [2, 4], "float16"], ["b.lora_B.weight", [4, 2], "float32"]]
    assert json.loads(json.dumps(doc)) == doc
    assert schema_from_json(doc) == schema_of(ARRAYS)
    assert adapter_meta("f", "/b", "none", AdapterConfig(), ARRAYS)["schema"] == doc


def test_description_survives_json_as_the_client_sends_it() -> None:
    d = _description()
    doc = json.loads(json.dumps(d.to_json()))
    back = AdapterDescription.from_json(doc)
    assert back.schema == d.schema and back.adapter == d.adapter and back.travel_keys == d.travel_keys
    assert back.peft_config == {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]}  # sets sorted
    assert back.to_json() == doc


def test_description_json_is_the_untyped_dict_it_replaces() -> None:
    """What Device.describe() sent before it was typed, key for key: old and new clients and servers
    understand each other, and old checkpoints load."""
    d = _description()
    cfg = d.adapter
    old = {
        "fingerprint": d.fingerprint,
        "schema": [[n, list(s), t] for n, s, t in schema_of(ARRAYS)],
        "travel_keys": ["b.lora_B.weight"],
        "peft_config": {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]},
        # virtual_tokens came later, with prompt and prefix tuning, and lora_sb with Fed-SB: a plain LoRA
        # description leaves them out
        "adapter": {k: v for k, v in asdict(cfg).items() if k not in ("virtual_tokens", "lora_sb")},
        "base_path": "/models/base",
        "quant": "nf4",
    }
    assert json.dumps(d.to_json()) == json.dumps(old)
    assert AdapterDescription.from_json(json.loads(json.dumps(old))).adapter == cfg


def test_a_description_without_a_field_is_refused() -> None:
    doc = _description().to_json()
    del doc["quant"]
    with pytest.raises(KeyError):
        AdapterDescription.from_json(doc)
