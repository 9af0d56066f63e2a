import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import (
    adapter_schema,
    adapter_state,
    apply_adapter,
    check_targets,
    inject,
    load_adapter_state,
    read_adapter,
    save_adapter,
)
from fedpeft.model.base import load_base
from fedpeft.model.precision import autocast

X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))


def _base(cache_dir: str, quant: str = "none"):
    # a stored bf16/int8/nf4 base computes in bf16 here: the autocast path, whatever `auto` would measure
    compute = "fp32" if quant == "none" else "bf16"
    return load_base(BaseConfig(model="tiny", quant=quant, compute_dtype=compute, cache_dir=cache_dir))


def _perturb(model) -> None:
    """Make the adapter non-trivial (LoRA B starts at 0, IA3 at 1) so tests see it."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _logits(model, quant: str = "none") -> torch.Tensor:
    # _base computes every non-fp32 base in bf16 (fedpeft.model.precision.autocast); so does this check
    with torch.no_grad(), autocast("fp32" if quant == "none" else "bf16"):
        return model(input_ids=X).logits.float()


def test_schema_is_sorted_peft_keys(cache_dir: str, tiny_path: Path) -> None:
    model = inject(_base(cache_dir), AdapterConfig(kind="lora", r=4))
    schema = adapter_schema(model)
    names = [n for n, _, _ in schema]
    assert names == sorted(names)
    assert len(names) == 2 * 7 * 2  # layers x projections x (A, B)
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert (q_a, (4, 64), "float32") in schema
    ia3 = adapter_schema(inject(_base(cache_dir), AdapterConfig(kind="ia3")))
    assert [n for n, _, _ in ia3] == sorted(
        f"base_model.model.model.layers.{i}.{m}.ia3_l"
        for i in range(2)
        for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )


def test_same_seed_same_init_other_seed_other_init(cache_dir: str, tiny_path: Path) -> None:
    a = adapter_state(inject(_base(cache_dir), AdapterConfig(seed=1)))
    b = adapter_state(inject(_base(cache_dir), AdapterConfig(seed=1)))
    c = adapter_state(inject(_base(cache_dir), AdapterConfig(seed=2)))
    key = next(k for k in a if ".lora_A." in k)
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])


def test_arrays_round_trip(cache_dir: str, tiny_path: Path) -> None:
    src = inject(_base(cache_dir), AdapterConfig())
    _perturb(src)
    arrays = adapter_state(src)
    dst = inject(_base(cache_dir), AdapterConfig())
    load_adapter_state(dst, arrays)
    for k, v in adapter_state(dst).items():
        np.testing.assert_array_equal(v, arrays[k])
    torch.testing.assert_close(_logits(dst), _logits(src))


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapter_weights_are_read_and_written_in_place_as_peft_would(
    kind: str, cache_dir: str, tiny_path: Path
) -> None:
    """fedpeft reads and writes the adapter through views of the live parameters (fast per message);
    what peft itself reads back must be exactly what was written, also after a parameter was replaced."""
    from peft import get_peft_model_state_dict

    model = inject(_base(cache_dir), AdapterConfig(kind=kind, r=4))
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in adapter_state(model).items()}
    load_adapter_state(model, arrays)
    seen = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert sorted(seen) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(seen[k].numpy(), v)
    # a parameter whose storage is replaced (as .to() does) is followed, not written through a stale view
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    param.data = param.data.clone()
    zeros = {k: np.zeros_like(v) for k, v in arrays.items()}
    load_adapter_state(model, zeros)
    assert float(param.detach().abs().sum()) == 0.0, name
    assert all(not v.any() for v in adapter_state(model).values())


def test_arrays_with_wrong_shape_missing_key_or_nan_are_refused(cache_dir: str, tiny_path: Path) -> None:
    model = inject(_base(cache_dir), AdapterConfig())
    good = adapter_state(model)
    key = next(iter(good))
    with pytest.raises(FedpeftError, match="missing"):
        load_adapter_state(model, {k: v for k, v in good.items() if k != key})
    with pytest.raises(FedpeftError, match=r"is \(5, 64\)"):
        load_adapter_state(model, {**good, key: np.zeros((5, 64), np.float32)})
    with pytest.raises(FedpeftError, match="NaN"):
        load_adapter_state(model, {**good, key: np.full_like(good[key], np.nan)})


def test_model_with_none_of_the_target_modules(tmp_path: Path, cache_dir: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedpeft.model.tiny import _byte_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=257)).save_pretrained(gpt2)
    _byte_tokenizer().save_pretrained(gpt2)
    base = load_base(BaseConfig(model=str(gpt2), quant="none", cache_dir=cache_dir))
    with pytest.raises(FedpeftError, match="none of the target modules"):
        inject(base, AdapterConfig())
    with pytest.raises(FedpeftError, match="not in the base model: q_prj"):
        check_targets(_base(cache_dir).model, ("q_proj", "q_prj"))


@pytest.mark.parametrize("quant,kind", [("none", "lora"), ("nf4", "lora"), ("bf16", "ia3"), ("int8", "ia3")])
def test_peft_loads_saved_adapter_with_identical_logits(
    tmp_path: Path, cache_dir: str, tiny_path: Path, quant: str, kind: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedpeft.model.quant import disable_cpu_4bit_packing, quantization_kwargs

    base = _base(cache_dir, quant)
    cfg = AdapterConfig(kind=kind)
    model = inject(base, cfg)
    _perturb(model)
    out = save_adapter(model, base, cfg, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    # What a PEFT user does, knowing only the folder (and, for a quantized base, the quant setting).
    hf = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], **quantization_kwargs(quant))
    disable_cpu_4bit_packing(hf)
    loaded = PeftModel.from_pretrained(hf, out)
    torch.testing.assert_close(_logits(loaded, quant), _logits(model, quant), rtol=0, atol=0)
    assert not torch.allclose(
        _logits(loaded, quant), _logits(_base(cache_dir, quant).model, quant)
    )  # the adapter is applied


def test_read_adapter_and_apply(tmp_path: Path, cache_dir: str, tiny_path: Path) -> None:
    base = _base(cache_dir)
    model = inject(base, AdapterConfig(kind="lora", r=4, freeze_a=True))
    _perturb(model)
    save_adapter(
        model, base, AdapterConfig(kind="lora", r=4, freeze_a=True), tmp_path / "a", extra={"round": 3}
    )
    files = read_adapter(tmp_path / "a")
    assert files.meta["round"] == 3
    assert files.adapter_config.freeze_a and files.adapter_config.r == 4
    again = apply_adapter(_base(cache_dir), files)
    torch.testing.assert_close(_logits(again), _logits(model))


def _saved(tmp_path: Path, cache_dir: str) -> Path:
    base = _base(cache_dir)
    model = inject(base, AdapterConfig())
    return save_adapter(model, base, AdapterConfig(), tmp_path / "adapter")


def test_truncated_adapter_weights(tmp_path: Path, cache_dir: str, tiny_path: Path) -> None:
    out = _saved(tmp_path, cache_dir)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(FedpeftError, match="corrupt adapter weights") as e:
        read_adapter(out)
    assert "\n" not in str(e.value)


def test_adapter_from_another_base_is_refused(tmp_path: Path, cache_dir: str, tiny_path: Path) -> None:
    files = read_adapter(_saved(tmp_path, cache_dir))
    with pytest.raises(FedpeftError, match="another base"):
        apply_adapter(_base(cache_dir, "nf4"), files)


def test_adapter_whose_schema_differs_from_its_weights(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    out = _saved(tmp_path, cache_dir)
    meta = json.loads((out / "fedpeft.json").read_text())
    meta["schema"][0][1] = [99, 99]
    (out / "fedpeft.json").write_text(json.dumps(meta))
    with pytest.raises(FedpeftError, match="schema"):
        read_adapter(out)


def test_adapter_whose_config_differs_from_the_base_schema(
    tmp_path: Path, cache_dir: str, tiny_path: Path
) -> None:
    out = _saved(tmp_path, cache_dir)
    meta = json.loads((out / "fedpeft.json").read_text())
    meta["adapter"]["r"] = 4  # rank 4 model, rank 8 weights
    (out / "fedpeft.json").write_text(json.dumps(meta))
    with pytest.raises(FedpeftError, match="schema"):
        apply_adapter(_base(cache_dir), read_adapter(out))


def test_failed_save_keeps_the_previous_adapter(tmp_path: Path, cache_dir: str, tiny_path: Path) -> None:
    out = _saved(tmp_path, cache_dir)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = _base(cache_dir)
    model = inject(base, AdapterConfig())
    with pytest.raises(TypeError):
        save_adapter(model, base, AdapterConfig(), out, extra={"bad": object()})  # not JSON-serializable
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_switching_the_adapter_off_keeps_ffa_lora_a_frozen(cache_dir: str) -> None:
    """peft's disable_adapter() marks every weight of the adapter trainable on exit; adapter_off restores
    what trained before, so FFA-LoRA's A stays frozen after an evaluation of the base alone."""
    from fedpeft.config.tree import AdapterConfig, BaseConfig
    from fedpeft.model.adapters import adapter_off, inject, trainable_parameters
    from fedpeft.model.base import load_base

    model = inject(
        load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)), AdapterConfig(freeze_a=True)
    )
    before = [n for n, p in model.named_parameters() if p.requires_grad]
    assert before and all("lora_B" in n for n in before)
    with adapter_off(model):
        pass
    assert [n for n, p in model.named_parameters() if p.requires_grad] == before
    with model.disable_adapter():  # what peft alone does: the reason adapter_off exists
        pass
    assert len(trainable_parameters(model)) == 2 * len(before)
