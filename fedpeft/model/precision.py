"""Compute precision: what the matmuls run in, chosen by the machine at hand (`--compute-dtype`).

How the base is *stored* (`--quant`: none, bf16, int8, nf4) decides its bytes and so its fingerprint; what
it *computes* in is this module's choice and never enters the fingerprint, so devices that compute
differently still join one federation. bf16 is fast only where the hardware has it: CPUs with
AVX512-BF16 or AMX (and ARMv8.6+ with BF16), GPUs from compute capability 8.0. Elsewhere torch runs bf16
matmuls through a slow fallback, far slower than fp32 on an AVX2-only CPU (benchmarks/README.md,
"Compute precision"). So `auto`:
  - on CUDA: bf16 where the GPU does it natively, else fp32 (fp16 would need loss scaling to train);
  - on the CPU: a short matmul of the model's own shapes in fp32 and in bf16 (tens of milliseconds, cached
    per machine beside the base cache, re-measured when torch, the CPU or the thread count changes);
    bf16 when it is clearly faster (BF16_MARGIN), else fp32;
  - a base stored in fp32 (`--quant none`, the reference) computes in fp32.
fp16 is never chosen by `auto`; it can be asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedpeft.atomic import atomic_write_json
from fedpeft.config.tree import ComputeDtype

log = logging.getLogger(__name__)

COMPUTE_DTYPES: tuple[str, ...] = tuple(d for d in typing.get_args(ComputeDtype) if d != "auto")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# bf16 must beat fp32 by this much to be chosen: fp32 computes the stored weights exactly, and a whole
# step gains less than its matmuls do (norms, softmax and casts dilute it).
BF16_MARGIN = 1.15
CACHE_FILE = "compute-speeds.json"
CACHE_VERSION = 1
PROBE_ROWS = 64  # tokens a probe matmul multiplies: small, so that even a slow bf16 fallback is timed quickly
PROBE_SECONDS = 0.02  # each dtype is timed for about this long (at least two calls)


@dataclass(frozen=True)
class Precision:
    """The compute dtype a process uses, why, and the speeds it was chosen from."""

    dtype: str  # fp32 | bf16 | fp16
    why: str  # one phrase: what decided it
    gflops: dict[str, float] = field(default_factory=dict)  # measured matmul speed per dtype (CPU auto)
    capability: str = ""  # torch's CPU capability string, or the GPU's compute capability

    def line(self) -> str:
        """`computing in fp32 (auto: ...)`: the phrase start-up lines and the round-0 line use."""
        return f"computing in {self.dtype} ({self.why})"

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "why": self.why, "capability": self.capability}
        out.update({f"{k}_gflops": round(v, 1) for k, v in sorted(self.gflops.items())})
        return out


def cpu_capability() -> str:
    """torch's own view of the CPU's vector ISA (AVX512, AVX2, DEFAULT, SVE256, ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def torch_version() -> str:
    return str(torch.__version__)


def cpu_name() -> str:
    """The CPU's model name (a new machine is measured anew even with the same capability string)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure_matmul(dtype: str, rows: int, k: int, n: int, seconds: float = PROBE_SECONDS) -> float:
    """GFLOP/s of [rows x k] @ [k x n] in `dtype` on this CPU with torch's current threads: one untimed
    call, then calls until `seconds` passed (at least two), the fastest call counted."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g).to(TORCH_DTYPES[dtype])
    b = torch.randn(k, n, generator=g).to(TORCH_DTYPES[dtype])
    torch.matmul(a, b)
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
        calls += 1
    return 2 * rows * k * n / max(best, 1e-9) / 1e9


def probe_shape(model_config: Any) -> tuple[int, int]:
    """(k, n) of the model's widest projection (hidden x intermediate): most of a step's FLOPs run there."""
    hidden = int(getattr(model_config, "hidden_size", 0) or 512)
    inter = int(getattr(model_config, "intermediate_size", 0) or 4 * hidden)
    return hidden, inter


def machine_key(k: int, n: int) -> str:
    """What the measured speeds depend on: torch, the CPU, the threads, the shape."""
    return "|".join(
        [torch_version(), cpu_capability(), cpu_name(), f"threads={torch.get_num_threads()}", f"{k}x{n}"]
    )


def cpu_speeds(k: int, n: int, cache: Path | None) -> dict[str, float]:
    """fp32 and bf16 matmul GFLOP/s for a [PROBE_ROWS x k] @ [k x n] product: from `cache` when it holds
    this machine's (machine_key), else measured now and written there (a cache that cannot be written is
    only logged: the measurement is cheap)."""
    key = machine_key(k, n)
    entries: dict[str, Any] = {}
    if cache is not None:
        try:
            doc = json.loads(cache.read_text())
            if doc.get("version") == CACHE_VERSION and isinstance(doc.get("entries"), dict):
                entries = doc["entries"]
        except (OSError, ValueError, AttributeError):
            entries = {}
        hit = entries.get(key)
        if isinstance(hit, dict) and all(isinstance(hit.get(d), (int, float)) for d in ("fp32", "bf16")):
            return {d: float(hit[d]) for d in ("fp32", "bf16")}
    speeds = {d: measure_matmul(d, PROBE_ROWS, k, n) for d in ("fp32", "bf16")}
    if cache is not None:
        entries[key] = speeds
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache, {"version": CACHE_VERSION, "entries": entries})
        except OSError as e:
            log.debug("cannot cache compute speeds in %s: %s", cache, e)
    return speeds


def choose(
    choice: str,
    quant: str,
    device: str,
    shape: tuple[int, int],
    cache: Path | None = None,
    fp32_fits: bool = True,
) -> Precision:
    """The compute dtype for `choice` (--compute-dtype) on a base stored as `quant` (resolved), computing on
    `device` (cpu | cuda). `shape`: the model's (k, n) to measure (probe_shape). `fp32_fits`: False when
    --max-memory leaves no room for fp32 copies of bf16-stored weights (auto then keeps bf16)."""
    if choice not in ("auto", *COMPUTE_DTYPES):
        raise ValueError(f"unknown compute dtype {choice!r}")
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        cap = f"sm_{major}{minor}"
        if choice != "auto":
            return Precision(choice, f"--compute-dtype {choice}", capability=cap)
        if quant == "none":
            return Precision(
                "fp32", "auto: the fp32 base (--quant none) is the fp32 reference", capability=cap
            )
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision("bf16", f"auto: this GPU ({cap}) computes bf16 natively", capability=cap)
        return Precision("fp32", f"auto: this GPU ({cap}) has no native bf16", capability=cap)
    cap = cpu_capability()
    if choice != "auto":
        return Precision(choice, f"--compute-dtype {choice}", capability=cap)
    if quant == "none":
        return Precision("fp32", "auto: the fp32 base (--quant none) is the fp32 reference", capability=cap)
    speeds = cpu_speeds(*shape, cache)
    ratio = speeds["bf16"] / max(speeds["fp32"], 1e-9)
    measured = f"{cap} CPU: bf16 matmul {ratio:.2g}x fp32's speed"
    if ratio >= BF16_MARGIN:
        return Precision("bf16", f"auto: {measured}", speeds, cap)
    if not fp32_fits:
        return Precision("bf16", f"auto: {measured}, but fp32 weights exceed --max-memory", speeds, cap)
    return Precision("fp32", f"auto: {measured}", speeds, cap)


def cache_file(cache_root: Path) -> Path:
    """Where this machine's measured speeds are kept: beside the base cache (FEDPEFT_PRECISION_CACHE
    overrides it, e.g. for a read-only cache)."""
    return Path(os.environ.get("FEDPEFT_PRECISION_CACHE") or cache_root / CACHE_FILE)


def autocast(dtype: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """The context the forward passes run in: fp32 runs as stored (apply() made the weights fp32), bf16 and
    fp16 autocast the matmuls (the fp32 adapter matmuls follow the frozen ones)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=TORCH_DTYPES[dtype])


def _quantized_parameter(p: torch.Tensor) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def widen_bytes(model: Any) -> int:
    """Extra bytes apply(model, "fp32") would take: the narrower floating tensors it would widen to fp32."""
    seen: set[int] = set()
    extra = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or _quantized_parameter(t) or not t.is_floating_point() or t.dtype == torch.float32:
            continue
        seen.add(id(t))
        extra += t.numel() * (4 - t.element_size())
    return extra


def apply(model: Any, dtype: str) -> None:
    """Make a loaded, fingerprinted base compute in `dtype`, in place. fp32: every floating parameter and
    buffer that is not a bitsandbytes weight becomes fp32 (exact from bf16: the same values, the
    fingerprint was taken before), and 4-bit layers compute in fp32. bf16/fp16: 4-bit layers compute in
    that dtype, the rest stays as stored and autocast() casts the matmuls."""
    target = TORCH_DTYPES[dtype]
    if dtype == "fp32":
        for module in model.modules():
            for p in list(module._parameters.values()):
                if (
                    p is not None
                    and p.is_floating_point()
                    and p.dtype != target
                    and not _quantized_parameter(p)
                ):
                    p.data = p.data.to(target)  # in place: tied weights share the Parameter
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != target:
                    module._buffers[name] = b.to(target)
        if hasattr(model, "config"):
            model.config.dtype = target
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.compute_dtype = target
            module.compute_type_is_set = True
