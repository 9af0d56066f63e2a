import shutil
from pathlib import Path

import pytest
import torch

from fedpeft.base import dequantize_linears, fingerprint, load_base, resolve_base_dir
from fedpeft.config import BaseConfig
from fedpeft.errors import FedpeftError


@pytest.mark.parametrize("quant", ["none", "bf16", "int8", "nf4"])
def test_fingerprint_is_stable_across_loads(tiny_path: Path, cache_dir: str, quant: str) -> None:
    a = load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache_dir))
    b = load_base(BaseConfig(model=str(tiny_path), quant=quant, cache_dir=cache_dir))
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64
    assert all(not p.requires_grad for p in a.model.parameters())


def test_fingerprint_differs_per_quant(cache_dir: str, tiny_path: Path) -> None:
    prints = {
        q: load_base(BaseConfig(model="tiny", quant=q, cache_dir=cache_dir)).fingerprint
        for q in ("none", "bf16", "int8", "nf4")
    }
    assert len(set(prints.values())) == 4


def test_fingerprint_changes_with_one_weight(cache_dir: str, tiny_path: Path) -> None:
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    before = fingerprint(base.model, "none")
    with torch.no_grad():
        base.model.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    assert fingerprint(base.model, "none") != before


def test_quantized_base_is_smaller(cache_dir: str, tiny_path: Path) -> None:
    sizes = {
        q: load_base(BaseConfig(model="tiny", quant=q, cache_dir=cache_dir)).nbytes for q in ("none", "nf4")
    }
    assert sizes["nf4"] < sizes["none"] * 0.5


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="does not exist"):
        resolve_base_dir(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="no config.json"):
        resolve_base_dir(str(tmp_path))


def test_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 10)
    with pytest.raises(FedpeftError, match=".gguf"):
        resolve_base_dir(str(f))


def test_corrupt_gguf_file(tmp_path: Path, cache_dir: str) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x07" * 100)
    with pytest.raises(FedpeftError, match="cannot load GGUF"):
        resolve_base_dir(str(f), cache_dir)


def test_truncated_safetensors(tmp_path: Path, tiny_path: Path, cache_dir: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FedpeftError, match="cannot load base model") as e:
        load_base(BaseConfig(model=str(broken), quant="none", cache_dir=cache_dir))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_dequantize_linears_matches_quantized_forward(cache_dir: str, tiny_path: Path, quant: str) -> None:
    base = load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache_dir))
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        quantized = base.model(x).logits.float()
    dequantize_linears(base.model)
    assert not any("bitsandbytes" in type(m).__module__ for m in base.model.modules())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = base.model(x).logits.float()
    # same weights, different kernels: agreement to bf16 accumulation noise
    assert torch.allclose(quantized, plain, atol=0.05, rtol=0.05)
