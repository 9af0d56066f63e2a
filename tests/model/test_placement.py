"""--device and --client-gpus: the selection logic on any machine; the GPU path itself where CUDA is present."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.config.tree import BaseConfig, FederationConfig, RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.model import placement
from fedpeft.model.placement import actor_resources, resolve_device, with_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "cuda_available", lambda: False)


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "cuda_available", lambda: True)


def _cfg(device: str = "auto", **federation) -> RunConfig:
    return RunConfig(base=BaseConfig(device=device), federation=FederationConfig(**federation))


def test_auto_picks_the_gpu_only_where_torch_sees_one(no_gpu: None) -> None:
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(FedpeftError, match=r"--device cuda: .*use --device cpu") as e:
        resolve_device("cuda")
    assert "\n" not in str(e.value)


def test_auto_and_cuda_resolve_to_cuda_on_a_gpu_machine(a_gpu: None) -> None:
    assert resolve_device("auto") == resolve_device("cuda") == "cuda"
    assert resolve_device("cpu") == "cpu"  # asked for: the GPU stays unused


def test_a_simulation_writes_the_device_it_resolved(no_gpu: None) -> None:
    assert with_device(_cfg()).base.device == "cpu"
    with pytest.raises(FedpeftError, match="--client-gpus applies to GPU actors"):
        with_device(_cfg(client_gpus=0.5))


def test_on_a_ray_cluster_gpus_are_asked_for_not_looked_for(no_gpu: None) -> None:
    # the driver's machine may hold no GPU while the cluster's nodes do: --client-gpus decides
    cluster = {"ray_address": "auto"}
    assert with_device(_cfg(**cluster)).base.device == "cpu"
    assert with_device(_cfg(client_gpus=1.0, **cluster)).base.device == "cuda"
    assert with_device(_cfg("cuda", **cluster)).base.device == "cuda"


def test_actor_shares() -> None:
    # CPU: one actor owns every core by default, or --client-cpus each
    assert actor_resources("cpu", 16, 0, None, None) == placement.ActorResources(16, 0.0, 16)
    assert actor_resources("cpu", 16, 0, 2, None) == placement.ActorResources(2, 0.0, 2)
    # CUDA: by default one actor per sampled client, spread over the GPUs, at most one per core; the
    # cores split among the actors
    assert actor_resources("cuda", 16, 1, None, None, sampled=5) == placement.ActorResources(3, 0.2, 3)
    assert actor_resources("cuda", 16, 2, None, None, sampled=5) == placement.ActorResources(2, 1 / 3, 2)
    assert actor_resources("cuda", 2, 1, None, None, sampled=5) == placement.ActorResources(1, 0.5, 1)
    assert actor_resources("cuda", 16, 1, None, None, sampled=1) == placement.ActorResources(16, 1.0, 16)
    # or as asked: fractions pack actors per GPU
    assert actor_resources("cuda", 16, 2, None, 1.0) == placement.ActorResources(8, 1.0, 8)
    assert actor_resources("cuda", 16, 1, None, 0.25) == placement.ActorResources(4, 0.25, 4)
    assert actor_resources("cuda", 2, 1, None, 0.25) == placement.ActorResources(1, 0.25, 1)
    assert actor_resources("cuda", 16, 1, 3, 1.0) == placement.ActorResources(3, 1.0, 3)


def test_a_deployed_device_computes_on_its_cpu_whatever_the_server_says(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from fedpeft.config.files import to_run_config
    from fedpeft.config.node import DeviceNode
    from fedpeft.device.tasks import config_for

    sent = _cfg("cuda")
    content = RecordDict({"config": ConfigRecord(to_run_config(sent))})
    node = DeviceNode(data_path=str(tmp_path))
    assert config_for(content, node).base.device == "cpu"
    assert config_for(content, None).base.device == "cuda"  # a simulated client follows the run


@cuda
@pytest.mark.parametrize("quant", ["bf16", "nf4", "int8"])
def test_the_gpu_base_is_the_cpu_base_moved(quant: str, cache_dir: str, tiny_path: Path) -> None:
    """Same fingerprint (quantized on the CPU, then moved), and the same logits within bf16 rounding."""
    from fedpeft.model.base import load_base
    from fedpeft.model.precision import autocast

    on_cpu = load_base(
        BaseConfig(model="tiny", quant=quant, compute_dtype="bf16", cache_dir=cache_dir, device="cpu")
    )
    on_gpu = load_base(
        BaseConfig(model="tiny", quant=quant, compute_dtype="bf16", cache_dir=cache_dir, device="cuda")
    )
    assert on_gpu.device == "cuda" and on_gpu.fingerprint == on_cpu.fingerprint
    ids = torch.arange(1, 33)[None] % on_cpu.model.config.vocab_size
    with torch.no_grad():
        with autocast("bf16", "cpu"):
            want = on_cpu.model(input_ids=ids).logits.float()
        with autocast("bf16", "cuda"):
            got = on_gpu.model(input_ids=ids.cuda()).logits.float().cpu()
    assert torch.allclose(got, want, atol=0.1, rtol=0.05), (got - want).abs().max()


@cuda
def test_training_on_the_gpu_lowers_the_loss_and_reports_gpu_memory(
    cache_dir: str, tiny_path: Path, users_dir: Path
) -> None:
    from fedpeft.config.tree import AdapterConfig, DataConfig, TrainConfig
    from fedpeft.data.blocks import load_user_data
    from fedpeft.model.adapters import adapter_state, inject
    from fedpeft.model.base import load_base
    from fedpeft.model.placement import gpu_figures
    from fedpeft.training.local import evaluate, train

    base = load_base(BaseConfig(model="tiny", quant="nf4", cache_dir=cache_dir, device="cuda"))
    data, _ = load_user_data(DataConfig(data=str(users_dir), block_size=32), base.tokenizer, "alice")
    model = inject(base, AdapterConfig(kind="lora", r=4))
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, base.compute)
    train(model, data, TrainConfig(steps=20, lr=5e-3, batch_size=4, progress=False), 5e-3, pad, base.compute)
    after = evaluate(model, data.eval, pad, base.compute)
    assert after.loss < before.loss
    state = adapter_state(model)
    assert all(isinstance(v, np.ndarray) and np.isfinite(v).all() for v in state.values())
    assert gpu_figures("cuda")["gpu_peak_mib"] > 0


def test_resuming_on_another_device_is_allowed(tmp_path: Path) -> None:
    from fedpeft.federation.state import check_resume_config, open_run

    open_run(tmp_path, _cfg("cuda", client_gpus=0.5), None)  # config.json of a run begun on a GPU
    check_resume_config(tmp_path, _cfg("cpu", client_cpus=1))  # continued on a CPU machine
    with pytest.raises(FedpeftError, match="another configuration"):
        check_resume_config(tmp_path, _cfg("cpu", seed=5))
