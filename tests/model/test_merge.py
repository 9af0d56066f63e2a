"""fedpeft.model.merge and `fedpeft export`: merges of every adapter type on every quantized base, checked
against the unmerged PeftModel on the base each was merged onto; exports that load elsewhere."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedpeft.cli import main
from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.model.adapters import inject, load_adapter_state, read_adapter, save_adapter
from fedpeft.model.base import load_base, public_id
from fedpeft.model.merge import export_merged, merge_base
from fedpeft.model.precision import autocast
from fedpeft.model.quant import dequantize_linears

X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))


def _compute(quant: str) -> str:
    """Every stored bf16/int8/nf4 base computes in bf16 here, as on a CPU with native bf16."""
    return "fp32" if quant == "none" else "bf16"


def _base(cache_dir: str, quant: str):
    return load_base(
        BaseConfig(model="tiny", quant=quant, compute_dtype=_compute(quant), cache_dir=cache_dir)
    )


def _adapter(tmp_path: Path, cache_dir: str, quant: str, kind: str) -> Path:
    """A trained-looking adapter on the `quant` base: LoRA B starts at 0 and IA3 at 1, so perturb both."""
    base = _base(cache_dir, quant)
    model = inject(base, AdapterConfig(kind=kind, r=4))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, base, AdapterConfig(kind=kind, r=4), tmp_path / f"{kind}-{quant}")


def _logits(model, quant: str = "none") -> torch.Tensor:
    with torch.no_grad(), autocast(_compute(quant)):
        return model(input_ids=X).logits.float()


def _on(base, files):
    model = inject(base, files.adapter_config)
    load_adapter_state(model, files.arrays)
    return model


@pytest.mark.parametrize("onto", ["full", "quantized"])
@pytest.mark.parametrize("quant", ["nf4", "int8", "bf16"])
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_merge_equals_the_adapter_on_the_base_it_went_onto(
    tmp_path: Path, cache_dir: str, tiny_path: Path, kind: str, quant: str, onto: str
) -> None:
    from transformers import AutoModelForCausalLM

    files = read_adapter(_adapter(tmp_path, cache_dir, quant, kind))
    export_merged(merge_base(files, onto, "tiny", cache_dir), files, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # transformers alone
    assert not hasattr(merged.config, "quantization_config")
    if onto == "full":
        reference = _on(_base(cache_dir, "none"), files)
    else:
        base = _base(cache_dir, quant)
        dequantize_linears(base.model)
        base.model.float()
        reference = _on(base, files)
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merged_onto_quantized_is_the_devices_model(tmp_path: Path, cache_dir: str, tiny_path: Path) -> None:
    """What a device computes (the adapter on the NF4 base under bf16 autocast) within bf16 rounding;
    merged onto the full base it is another model (on this tiny random model NF4 rounds little)."""
    from transformers import AutoModelForCausalLM

    files = read_adapter(_adapter(tmp_path, cache_dir, "nf4", "lora"))
    device = _logits(_on(_base(cache_dir, "nf4"), files), "nf4")
    for onto in ("quantized", "full"):
        export_merged(merge_base(files, onto, "tiny", cache_dir), files, tmp_path / onto)
    quantized = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "quantized"))
    full = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full"))
    bf16_noise = (quantized - device).abs().mean().item()  # 0.0034 against logits of mean size 0.13
    assert bf16_noise < 0.01
    assert (full - device).abs().mean().item() > 1.2 * bf16_noise  # 0.0052: NF4's rounding on top


def test_export_merges_ia3_on_nf4_and_finds_a_moved_base(
    tmp_path: Path, cache_dir: str, tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """IA3 on NF4 used to crash (peft refused a model flagged 4-bit); an adapter whose base folder is gone
    from this machine is rebuilt from fedpeft.json's "base" (here: --model tiny)."""
    adapter = _adapter(tmp_path, cache_dir, "nf4", "ia3")
    meta = json.loads((adapter / "fedpeft.json").read_text())
    meta["base_path"] = str(tmp_path / "elsewhere")
    (adapter / "fedpeft.json").write_text(json.dumps(meta))
    args = ["export", str(adapter), "--out", str(tmp_path / "m"), "--merge", "--cache-dir", cache_dir]
    assert main(args) == 0
    assert "merged onto the unquantized base" in capsys.readouterr().out
    assert main([*args[:3], str(tmp_path / "q"), *args[4:], "--merge-onto", "quantized"]) == 0


def test_an_exported_adapter_loads_elsewhere_with_peft_alone(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    """README, "Export and use elsewhere": copy the folder anywhere, load it onto the base with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tmp_path, cache_dir, "none", "lora")
    assert main(["export", str(adapter), "--out", str(tmp_path / "exported")]) == 0
    moved = Path(shutil.copytree(tmp_path / "exported", tmp_path / "other-machine" / "adapter"))
    shutil.rmtree(tmp_path / "exported")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), moved)
    files = read_adapter(moved)
    torch.testing.assert_close(_logits(loaded), _logits(_on(_base(cache_dir, "none"), files)))
    base_doc = files.meta["base"]
    assert base_doc["model"] == "tiny" and base_doc["fingerprint"] == files.fingerprint
    assert "--model tiny" in base_doc["rebuild"]


def test_adapter_config_names_a_public_base() -> None:
    assert public_id(BaseConfig(model="default")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_id(BaseConfig(model="tiny")) == ""
    assert public_id(BaseConfig(model="tiny", base_id="me/my-model")) == "me/my-model"


def test_base_id_reaches_adapter_config_and_saving_never_asks_the_hub(
    tmp_path: Path, cache_dir: str, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.utils.save_and_load as peft_save

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("peft asked the Hugging Face hub about the base")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_network)
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir, base_id="me/tiny"))
    out = save_adapter(inject(base, AdapterConfig(r=4)), base, AdapterConfig(r=4), tmp_path / "a")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "me/tiny"
