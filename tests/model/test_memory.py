import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedpeft.config.tree import TrainConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.memory import (
    MIB,
    BudgetTooSmall,
    Shape,
    base_bytes_of,
    fit_micro_batch,
    fit_model,
    peak_mib,
)

DEFAULT = Shape(layers=30, hidden=576, intermediate=1536, vocab=49152)  # SmolLM2-135M
DEFAULT_NF4_BYTES = int(111.05 * MIB)  # Base.nbytes of the default model in NF4
DEFAULT_LORA = 2_442_240  # LoRA r=8 on all 7 projections

# Process peaks (VmHWM, MiB) measured with benchmarks/memory.py --calibrate: the numbers in fedpeft/model/memory.py.
COMPACT = [  # (checkpointing, loss_chunk, micro-batch, block, peak)
    *[(True, 128, m, 128, p) for m, p in [(1, 677), (2, 703), (4, 704)]],
    *[(True, 0, m, 128, p) for m, p in [(1, 681), (2, 753), (4, 897)]],
    *[(False, 128, m, 128, p) for m, p in [(1, 774), (2, 900), (4, 1076)]],
    *[(False, 0, m, 128, p) for m, p in [(1, 778), (2, 948), (4, 1272)]],
    *[(True, 128, m, 256, p) for m, p in [(1, 701), (2, 703)]],
    *[(False, 0, m, 256, p) for m, p in [(1, 949), (2, 1303)]],
]
FAST = [
    *[(True, 128, m, 128, p) for m, p in [(1, 736), (2, 822), (4, 817)]],
    *[(True, 0, m, 128, p) for m, p in [(1, 718), (2, 874), (4, 988)]],
    *[(False, 128, m, 128, p) for m, p in [(1, 850), (2, 1029), (4, 1286)]],
    *[(False, 0, m, 128, p) for m, p in [(1, 847), (2, 1115), (4, 1469)]],
    *[(True, 128, m, 256, p) for m, p in [(1, 829), (2, 810)]],
    *[(False, 0, m, 256, p) for m, p in [(1, 1034), (2, 1526)]],
]


def _base(shape: Shape = DEFAULT, nbytes: int = DEFAULT_NF4_BYTES, quant: str = "nf4") -> SimpleNamespace:
    config = SimpleNamespace(
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
    )
    compute = "fp32" if quant == "none" else "bf16"
    return SimpleNamespace(model=SimpleNamespace(config=config), nbytes=nbytes, quant=quant, compute=compute)


@pytest.mark.parametrize(
    "compact,checkpointing,chunk,micro,block,measured",
    [(True, *row) for row in COMPACT] + [(False, *row) for row in FAST],
)
def test_the_estimate_covers_every_measured_peak(
    compact: bool, checkpointing: bool, chunk: int, micro: int, block: int, measured: float
) -> None:
    est = peak_mib(DEFAULT, DEFAULT_NF4_BYTES, DEFAULT_LORA, micro * block, checkpointing, chunk, compact)
    assert measured <= est <= (1.3 if compact else 1.6) * measured


def _need(micro: int, cfg: TrainConfig, compact: bool) -> float:
    args = (micro * 128, cfg.checkpointing, cfg.loss_chunk, compact)
    return peak_mib(DEFAULT, DEFAULT_NF4_BYTES, DEFAULT_LORA, *args)


@pytest.mark.parametrize("checkpointing,chunk", [(True, 128), (False, 0)])
def test_the_largest_micro_batch_that_fits_keeps_the_batch(checkpointing: bool, chunk: int) -> None:
    cfg = TrainConfig(batch_size=6, grad_accum=2, checkpointing=checkpointing, loss_chunk=chunk)
    fast = {m: _need(m, cfg, False) for m in (1, 2, 3, 4, 6, 12)}
    compact = {m: _need(m, cfg, True) for m in (1, 2, 3, 4, 6, 12)}
    for need in (fast, compact):
        assert list(need.values()) == sorted(need.values())  # more tokens, more memory
    assert all(compact[m] < fast[m] for m in fast)
    cases = [(fast[12] + 1, 12, False), (fast[12] - 1, 6, False), (fast[4], 4, False), (fast[1], 1, False)]
    below = [m for m in compact if compact[m] < fast[1]]  # the fast heap fits no micro-batch: compact
    cases += [(fast[1] - 0.5, max(below), True), (compact[1], 1, True)]
    for budget, micro, compact_heap in cases:
        got = fit_micro_batch(cfg, _base(), DEFAULT_LORA, 128, budget)
        assert (got.batch_size, got.grad_accum, got.compact_heap) == (micro, 12 // micro, compact_heap)
        assert got.checkpointing == checkpointing and got.steps == cfg.steps  # nothing else changes


def test_a_budget_too_small_names_the_smallest_that_works() -> None:
    cfg = TrainConfig(batch_size=4)
    with pytest.raises(FedpeftError) as e:
        fit_micro_batch(cfg, _base(), DEFAULT_LORA, 128, 300)
    message = str(e.value)
    assert "\n" not in message
    smallest = int(message.split("smallest budget that works is ")[1].split(" MiB")[0])
    assert message.startswith("--max-memory 300 MiB is too small for this model and block length")
    assert message.endswith(f"is {smallest} MiB (micro-batch 1)")
    assert (
        isinstance(e.value, BudgetTooSmall) and e.value.need_mib == smallest
    )  # a device adds its other processes
    assert fit_micro_batch(cfg, _base(), DEFAULT_LORA, 128, smallest).batch_size == 1
    with pytest.raises(FedpeftError):
        fit_micro_batch(cfg, _base(), DEFAULT_LORA, 128, smallest - 1)


def test_fp32_activations_and_longer_blocks_need_more() -> None:
    nf4 = fit_micro_batch(TrainConfig(), _base(), DEFAULT_LORA, 128, 900)
    assert (nf4.batch_size, nf4.compact_heap) == (4, False)
    assert fit_micro_batch(TrainConfig(), _base(), DEFAULT_LORA, 512, 900).batch_size < 4
    with pytest.raises(FedpeftError):  # the fp32 base alone is 513 MiB
        fit_micro_batch(TrainConfig(), _base(nbytes=513 * MIB, quant="none"), DEFAULT_LORA, 128, 900)


def test_a_config_without_sizes_is_refused() -> None:
    base = SimpleNamespace(
        model=SimpleNamespace(config=SimpleNamespace(vocab_size=10)), nbytes=1, quant="nf4", compute="bf16"
    )
    with pytest.raises(FedpeftError, match="cannot estimate"):
        fit_micro_batch(TrainConfig(), base, 1, 128, 1e6)


def test_fit_model_counts_what_the_loaded_base_counted(cache_dir: str, tiny_path: Path) -> None:
    from fedpeft.config.tree import AdapterConfig, BaseConfig
    from fedpeft.model.adapters import inject, trainable_parameters
    from fedpeft.model.base import load_base

    base = load_base(BaseConfig(model="tiny", quant="nf4", compute_dtype="bf16", cache_dir=cache_dir))
    model = inject(base, AdapterConfig())
    assert base_bytes_of(model) == base.nbytes
    params = sum(p.numel() for p in trainable_parameters(model))
    cfg = TrainConfig(batch_size=4, grad_accum=2)
    small = peak_mib(Shape.of(base.model.config), base.nbytes, params, 2 * 32, True, 128, False) + 0.01
    assert fit_model(cfg, model, 32, small, "bf16") == fit_micro_batch(cfg, base, params, 32, small)
    assert fit_model(cfg, model, 32, small, "bf16").batch_size == 2


PROBE = """
import json, warnings
warnings.filterwarnings("ignore")
from fedpeft.model.adapters import inject, trainable_parameters
from fedpeft.model.base import load_base
from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, TrainConfig
from fedpeft.data.blocks import load_user_data
from fedpeft.training.local import train
base = load_base(BaseConfig(model="tiny", quant="nf4", compute_dtype="bf16", cache_dir={cache!r}))
data, _ = load_user_data(DataConfig(data={users!r}, block_size=32), base.tokenizer, "alice")
model = inject(base, AdapterConfig())
train(model, data, TrainConfig(steps=2, batch_size=4, progress=False), 1e-3, base.tokenizer.pad_token_id, base.compute)
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) / 1024
print(json.dumps({{"hwm": hwm, "nbytes": base.nbytes, "params": sum(p.numel() for p in trainable_parameters(model))}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_tiny_training_process_stays_under_its_estimate(
    cache_dir: str, tiny_path: Path, users_dir: Path
) -> None:
    """The calibration on this machine: a fresh process's whole peak, measured, against the model."""
    code = PROBE.format(cache=cache_dir, users=str(users_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    shape = Shape.of(
        SimpleNamespace(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=257)
    )
    est = peak_mib(shape, got["nbytes"], got["params"], 4 * 32, True, 128, False)
    assert got["hwm"] <= est, (got, est)
