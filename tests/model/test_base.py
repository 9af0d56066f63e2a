import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.base import load_base, resolve_base_dir
from fedpeft.model.cache import prepare_quantized, quantized_dir
from fedpeft.model.fingerprint import fingerprint, source_fingerprint
from fedpeft.model.quant import dequantize_linears
from fedpeft.model.tiny import TINY_NAME, build_tiny


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


def test_every_quantization_names_the_same_source_weights_and_other_weights_another(
    cache_dir: str, tiny_path: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    bases = [
        load_base(BaseConfig(model="tiny", quant=q, cache_dir=cache_dir)) for q in ("none", "bf16", "nf4")
    ]
    assert len({b.source for b in bases}) == 1 and len({b.fingerprint for b in bases}) == 3
    assert bases[0].doc()["source"] == bases[0].source
    copy = tmp_path / "copy"
    shutil.copytree(tiny_path, copy)
    cache = tmp_path / "cache"
    assert source_fingerprint(copy, cache) == bases[0].source  # a copy of the weights elsewhere agrees
    tensors = load_file(copy / "model.safetensors")
    name = sorted(k for k in tensors if k.endswith("up_proj.weight"))[0]
    tensors[name][3, 5] += 1e-2
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert source_fingerprint(copy, cache) != bases[0].source  # the cached figure is not reused for it


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


# --- the pre-quantized copy in the cache ---------------------------------------------------------------


def _fresh_tiny(tmp_path: Path) -> tuple[str, Path]:
    """A cache of this test's own, holding the tiny model (built in ~0.1 s)."""
    cache = str(tmp_path / "cache")
    return cache, build_tiny(cache)


def _state_bytes(model) -> dict[str, tuple]:
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        out[name] = (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy()))
    return out


def _logits(model) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).logits.float()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_prequantized_copy_gives_identical_base(tmp_path: Path, quant: str) -> None:
    cache, folder = _fresh_tiny(tmp_path)
    first = load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache))  # quantizes, writes the copy
    assert not first.prequantized
    assert (
        first.quantized_path
        == quantized_dir(folder, quant, cache)
        == Path(cache).resolve() / f"{TINY_NAME}.{quant}"
    )
    assert (first.quantized_path / "model.safetensors").is_file()
    second = load_base(BaseConfig(model="tiny", quant=quant, cache_dir=cache))
    assert second.prequantized
    assert second.path == first.path == folder  # the full-precision folder, for PEFT and export
    assert second.model.name_or_path == str(folder)
    assert second.fingerprint == first.fingerprint
    assert second.nbytes == first.nbytes
    assert _state_bytes(second.model) == _state_bytes(first.model)
    assert torch.equal(_logits(second.model), _logits(first.model))
    if quant == "nf4":
        import bitsandbytes as bnb

        layers = [m for m in second.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def _flip_tensor_bytes(weights: Path) -> None:
    """Change 8 bytes in the middle of the tensor data, leaving the safetensors header valid."""
    data = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    mid = (start + len(data)) // 2
    data[mid : mid + 8] = bytes(b ^ 0x5A for b in data[mid : mid + 8])
    weights.write_bytes(bytes(data))


def _corrupt(qdir: Path, how: str) -> None:
    weights = qdir / "model.safetensors"
    if how == "flipped":
        _flip_tensor_bytes(weights)
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "config":  # still valid JSON, still loads: only the recorded sha256 catches it
        config = json.loads((qdir / "config.json").read_text())
        config["rms_norm_eps"] = 0.1
        (qdir / "config.json").write_text(json.dumps(config))
    elif how == "fingerprint":
        meta = json.loads((qdir / "quantized.json").read_text())
        meta["fingerprint"] = "0" * 64
        (qdir / "quantized.json").write_text(json.dumps(meta))
    else:
        (qdir / "quantized.json").write_text("{")


@pytest.mark.parametrize("how", ["flipped", "truncated", "config", "fingerprint", "meta"])
def test_corrupt_prequantized_copy_is_rebuilt_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    cache, _ = _fresh_tiny(tmp_path)
    ref = load_base(BaseConfig(model="tiny", quant="nf4", cache_dir=cache))
    _corrupt(ref.quantized_path, how)
    if how == "flipped":  # the damage is real: the copy as it is gives another base
        from transformers import AutoModelForCausalLM

        damaged = AutoModelForCausalLM.from_pretrained(ref.quantized_path, device_map="cpu")
        assert fingerprint(damaged, "nf4") != ref.fingerprint
    with caplog.at_level(logging.WARNING, logger="fedpeft.model.cache"):
        again = load_base(BaseConfig(model="tiny", quant="nf4", cache_dir=cache))
    assert not again.prequantized
    assert again.fingerprint == ref.fingerprint
    assert _state_bytes(again.model) == _state_bytes(ref.model)
    assert "not using the pre-quantized base" in caplog.text
    third = load_base(BaseConfig(model="tiny", quant="nf4", cache_dir=cache))  # rebuilt: valid again
    assert third.prequantized and third.fingerprint == ref.fingerprint


def test_read_only_cache_quantizes_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache, folder = _fresh_tiny(tmp_path)
    ref = load_base(BaseConfig(model="tiny", quant="int8", cache_dir=str(tmp_path / "other")))
    before = sorted(p.name for p in Path(cache).iterdir())
    modes = {p: p.stat().st_mode for p in (Path(cache), folder)}
    for p in modes:
        p.chmod(0o555)
    if os.geteuid() == 0:  # root writes through file modes: fail the write the way the OS would

        def read_only(dest: Path):
            raise PermissionError(13, "Permission denied", str(dest))

        monkeypatch.setattr("fedpeft.model.cache.atomic_dir", read_only)
        monkeypatch.setattr("fedpeft.model.fingerprint.atomic_write_json", lambda path, obj: read_only(path))
    try:
        with caplog.at_level(logging.WARNING, logger="fedpeft.model.cache"):
            for _ in range(2):
                # an explicit compute dtype: `auto` would also cache its measured speeds here (tested apart)
                base = load_base(
                    BaseConfig(model="tiny", quant="int8", compute_dtype="fp32", cache_dir=cache)
                )
                assert not base.prequantized and base.quantized_path is None
                assert base.fingerprint == ref.fingerprint
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert sorted(p.name for p in Path(cache).iterdir()) == before
    assert "cannot write the pre-quantized base" in caplog.text


def test_user_folder_is_never_written(tmp_path: Path) -> None:
    cache, folder = _fresh_tiny(tmp_path)
    user = tmp_path / "my-model"
    shutil.copytree(folder, user)
    listing = {p.name: p.stat().st_mtime_ns for p in user.iterdir()}
    first = load_base(BaseConfig(model=str(user), quant="nf4", cache_dir=cache))
    assert first.path == user.resolve()
    assert first.quantized_path is not None
    assert first.quantized_path.parent == Path(cache).resolve() / "quantized"
    second = load_base(BaseConfig(model=str(user), quant="nf4", cache_dir=cache))
    assert second.prequantized and second.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in user.iterdir()} == listing


def test_changed_source_folder_rebuilds_its_copy(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cache, folder = _fresh_tiny(tmp_path)
    user = tmp_path / "my-model"
    shutil.copytree(folder, user)
    old = load_base(BaseConfig(model=str(user), quant="nf4", cache_dir=cache))
    model = AutoModelForCausalLM.from_pretrained(user)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
    model.save_pretrained(user)  # same path, new weights: the cached copy is stale now
    new = load_base(BaseConfig(model=str(user), quant="nf4", cache_dir=cache))
    assert not new.prequantized
    assert new.fingerprint != old.fingerprint
    assert new.quantized_path == old.quantized_path
    again = load_base(BaseConfig(model=str(user), quant="nf4", cache_dir=cache))
    assert again.prequantized and again.fingerprint == new.fingerprint


def test_prepare_quantized_writes_once(tmp_path: Path) -> None:
    cache, folder = _fresh_tiny(tmp_path)
    qdir = prepare_quantized(folder, "int8", cache)
    assert qdir == quantized_dir(folder, "int8", cache)
    stamp = (qdir / "model.safetensors").stat().st_mtime_ns
    assert prepare_quantized(folder, "int8", cache) == qdir
    assert (qdir / "model.safetensors").stat().st_mtime_ns == stamp
    base = load_base(BaseConfig(model="tiny", quant="int8", cache_dir=cache))
    assert base.prequantized and base.quantized_path == qdir
    with pytest.raises(FedpeftError, match="no pre-quantized copy"):
        prepare_quantized(folder, "bf16", cache)


@pytest.mark.real
def test_default_conversion_is_unchanged_and_prequantized(tmp_path: Path) -> None:
    """The faster conversion (one GGUF parse, bf16 straight away) writes the very tensors the plain
    transformers path did (fp32 load, then bf16), and its nf4 copy gives the quantize-at-load base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from fedpeft.model.gguf import convert_gguf, default_gguf_path
    from fedpeft.model.quant import load_model

    gguf = default_gguf_path()
    plain = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain.hf_quantizer = None
    del plain.config.quantization_config
    plain.to(torch.bfloat16).save_pretrained(tmp_path / "plain")
    del plain
    cache = str(tmp_path / "cache")
    folder = convert_gguf(gguf, cache, prequantize=("nf4",))  # the default (auto) is bf16 here: no copy
    with (
        safe_open(tmp_path / "plain" / "model.safetensors", "pt") as a,
        safe_open(folder / "model.safetensors", "pt") as b,
    ):
        keys = sorted(a.keys())
        assert keys == sorted(b.keys())
        for key in keys:
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype == torch.bfloat16 and x.shape == y.shape
            assert torch.equal(x.view(torch.int16), y.view(torch.int16)), key
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (tmp_path / "plain" / "config.json").read_text()
    )
    assert quantized_dir(folder, "nf4", cache).is_dir()  # written by the conversion
    base = load_base(BaseConfig(model="default", quant="nf4", cache_dir=cache))
    assert base.prequantized and base.path == folder
    assert base.fingerprint == fingerprint(load_model(folder, "nf4"), "nf4")


def test_fast_gguf_reader_reads_what_gguf_reads(tmp_path: Path) -> None:
    """The conversion's reader (fedpeft.model.gguf._fast_gguf_reader) gives gguf's fields and tensors exactly."""
    import gguf
    import numpy as np

    from fedpeft.model.gguf import _fast_gguf_reader

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "small")
    writer.add_uint32("llama.block_count", 2)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc", "<s>", "é", ""])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.0, 0.5, 1.0, 3.0])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 1, 3, 1, 1])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((6, 8)).astype(np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((8, 16)).astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fast = _fast_gguf_reader(gguf.GGUFReader)
    assert fast is not gguf.GGUFReader  # the installed gguf has the method it replaces
    a, b = gguf.GGUFReader(path), fast(path)
    assert list(a.fields) == list(b.fields)
    for name, fa in a.fields.items():
        fb = b.fields[name]
        assert (fa.offset, fa.data, fa.types) == (fb.offset, fb.data, fb.types), name
        assert len(fa.parts) == len(fb.parts), name
        for x, y in zip(fa.parts, fb.parts, strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    assert (
        [t.name for t in a.tensors]
        == [t.name for t in b.tensors]
        == ["token_embd.weight", "blk.0.ffn_up.weight"]
    )
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.tensor_type, ta.data.dtype, ta.data.shape) == (
            tb.tensor_type,
            tb.data.dtype,
            tb.data.shape,
        )
        assert ta.data.tobytes() == tb.data.tobytes()


def test_auto_quant_is_bf16_for_small_models_and_nf4_from_the_threshold(
    cache_dir: str, tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    import fedpeft.model.quant as fq

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_path).parameters())
    assert fq.parameter_count(tiny_path) == params
    assert fq.resolve_quant("auto", tiny_path) == "bf16" and fq.resolve_quant("int8", tiny_path) == "int8"
    base = load_base(BaseConfig(model="tiny", cache_dir=cache_dir))  # the default: auto
    assert base.quant == "bf16"
    assert (
        base.fingerprint == load_base(BaseConfig(model="tiny", quant="bf16", cache_dir=cache_dir)).fingerprint
    )
    monkeypatch.setattr(fq, "AUTO_NF4_PARAMS", params)
    assert load_base(BaseConfig(model="tiny", cache_dir=cache_dir)).quant == "nf4"
    with pytest.raises(ValueError, match="resolve"):
        fq.quantization_kwargs("auto")
