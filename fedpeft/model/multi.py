"""Many adapters over one frozen base, each row of a batch through its own adapter.

Every adapted linear layer of the base is wrapped once by `MultiLinear`; the adapters live beside it, one
entry per adapter. A batch names each row's adapter (None: the base alone). For that assignment each layer
gathers, once, the rows' LoRA A and B (scale folded into B, ranks zero-padded to the largest) and IA3
vectors, so a forward costs one batched matmul pair per layer however many adapters the batch mixes: the
BGMV semantics of Punica (Chen et al., MLSys 2024) and S-LoRA (Sheng et al., MLSys 2024), written with torch's
`bmm`. peft's mixed batch instead runs a gather and a matmul pair per adapter per layer.

A row is exactly one of: the base, a LoRA adapter, an IA3 adapter, so
    y = base(x * v_in[row]) * v_out[row] + (x @ A[row]) @ (scale * B[row])
computes peft's forward for each row (v = 1 and A = B = 0 where the row's adapter has none of them).
Adding or dropping an adapter touches only that adapter's tensors; the base is never copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpeft.config.tree import AdapterConfig
from fedpeft.errors import FedpeftError

PREFIX = "base_model.model."  # peft's state-dict keys start here: the rest is the module path in the base
LORA_KEYS = (".lora_A.weight", ".lora_B.weight")
# the adapter kinds applied per row; the rest (prompt, prefix, VeRA, DoRA) run through peft's own forward
PER_ROW = ("lora", "ia3")
IA3_KEY = ".ia3_l"


@dataclass
class LayerLoRA:
    a: torch.Tensor  # [r, in], as peft stores lora_A
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LayerIA3:
    vector: torch.Tensor  # [in] for a feed-forward layer (scales its input), [out] otherwise
    feedforward: bool


class Rows:
    """The adapter of each row of the batch now running, shared by every wrapped layer. `version` moves when
    the assignment (or an adapter) changes, so each layer gathers again once, not on every step."""

    def __init__(self) -> None:
        self.names: tuple[str | None, ...] | None = None
        self.version = 0
        self._last: tuple[str | None, ...] | None = None  # the last assignment the layers gathered for
        self.segment = 0  # see _segment

    def set(self, names: Sequence[str | None] | None) -> None:
        """A decode loop sets the same rows step after step (and None between): the layers keep what they
        gathered until the rows or the adapters change."""
        names = tuple(names) if names is not None and any(n is not None for n in names) else None
        if names is not None and names != self._last:
            self._last = names
            self.version += 1
            self.segment = _segment(names)
        self.names = names


def _segment(names: tuple[str | None, ...]) -> int:
    """g when the rows are runs of g rows per adapter, each adapter one run (lockstep training stacks its
    clients so): each layer then multiplies [adapters, g x tokens, in] by its stack of adapters, one product
    per adapter instead of a gathered copy per row (SGMV rather than BGMV). 0 otherwise."""
    runs: list[tuple[str | None, int]] = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    sizes = {size for _, size in runs}
    distinct = len({n for n, _ in runs}) == len(runs)
    return runs[0][1] if len(sizes) == 1 and distinct and len(runs) > 1 and None not in dict(runs) else 0


class MultiLinear(nn.Module):
    """A base linear layer (plain or quantized, left as it is) and the adapters that target it."""

    def __init__(self, base_layer: nn.Module, rows: Rows) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        self.lora: dict[str, LayerLoRA] = {}
        self.ia3: dict[str, LayerIA3] = {}
        self._seen = -1
        self._a: torch.Tensor | None = None  # [batch, in, r]
        self._b: torch.Tensor | None = None  # [batch, r, out], scaled
        self._v_in: torch.Tensor | None = None  # [batch, 1, in]
        self._v_out: torch.Tensor | None = None  # [batch, 1, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self.rows.names
        if names is None:
            return self.base_layer(x)
        if x.dim() != 3 or x.shape[0] != len(names):
            raise FedpeftError(f"a batch of {x.shape[0]} rows was given adapters for {len(names)}")
        # while training the gathered tensors are part of the graph: gather on every forward
        if self._seen != self.rows.version or torch.is_grad_enabled():
            self._gather(names)
        y = self.base_layer(x if self._v_in is None else x * self._v_in.to(x.dtype))
        if self._v_out is not None:
            y = y * self._v_out.to(y.dtype)
        if self._a is not None:
            g = self.rows.segment
            xs = x if not g else x.reshape(len(names) // g, g * x.shape[1], x.shape[2])
            h = torch.bmm(xs, self._a.to(x.dtype))
            out = torch.bmm(h, self._b.to(h.dtype))
            y = y + (out if not g else out.reshape(y.shape)).to(y.dtype)
        return y

    def _gather(self, names: tuple[str | None, ...]) -> None:
        # what a training forward gathers is stale once the optimizer steps: never reused
        self._seen = -1 if torch.is_grad_enabled() else self.rows.version
        self._a = self._b = self._v_in = self._v_out = None
        lora = [self.lora.get(n) if n is not None else None for n in names]
        if self.rows.segment:  # one entry per run of rows
            lora = lora[:: self.rows.segment]
        if any(entry is not None for entry in lora):
            self._a, self._b = _stack_lora(lora)
        ia3 = [self.ia3.get(n) if n is not None else None for n in names]
        if any(e is not None and e.feedforward for e in ia3):
            self._v_in = _stack_vectors([e if e is not None and e.feedforward else None for e in ia3])
        if any(e is not None and not e.feedforward for e in ia3):
            self._v_out = _stack_vectors([e if e is not None and not e.feedforward else None for e in ia3])


def _stack_lora(rows: list[LayerLoRA | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's A (transposed) and scaled B, ranks zero-padded to the batch's largest: the padding and the
    rows without LoRA add exact zeros."""
    first = next(e for e in rows if e is not None)
    rank = max(e.a.shape[0] for e in rows if e is not None)
    n_in, n_out = first.a.shape[1], first.b.shape[0]
    # one stacked copy per distinct adapter, then an index per row (autograd reaches each adapter's tensors)
    distinct: dict[int, int] = {}
    a_list, b_list, index = [], [], []
    for e in rows:
        if e is None:
            index.append(-1)
            continue
        if id(e) not in distinct:
            distinct[id(e)] = len(a_list)
            pad = rank - e.a.shape[0]
            a_list.append(nn.functional.pad(e.a, (0, 0, 0, pad)).t())
            b_list.append(nn.functional.pad(e.b * e.scale, (0, pad)).t())
        index.append(distinct[id(e)])
    a_list.append(first.a.new_zeros(n_in, rank))  # the slot of rows without LoRA here
    b_list.append(first.b.new_zeros(rank, n_out))
    at = torch.tensor([len(a_list) - 1 if i < 0 else i for i in index], device=first.a.device)
    return torch.stack(a_list)[at], torch.stack(b_list)[at]


def _stack_vectors(rows: list[LayerIA3 | None]) -> torch.Tensor:
    first = next(e for e in rows if e is not None)
    ones = torch.ones_like(first.vector)
    return torch.stack([ones if e is None else e.vector for e in rows])[:, None, :]


class MultiAdapter:
    """The base model with its adapted layers wrapped, and adapters added and dropped by name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows = Rows()
        self.layers: dict[str, MultiLinear] = {}
        self.configs: dict[str, AdapterConfig] = {}

    def add(self, name: str, cfg: AdapterConfig, arrays: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Place one adapter (peft's state-dict keys and shapes). LoRA and IA3 only: prompt and prefix tuning
        act on the input, not on the layers."""
        if cfg.kind not in PER_ROW or cfg.lora_sb:
            raise FedpeftError(f"adapter {name}: {cfg.kind} adapters are not applied per layer")
        if name in self.configs:
            raise FedpeftError(f"adapter {name} is already loaded")
        found = _by_module(arrays, cfg.kind)
        missing = [t for t in cfg.targets() if not any(m.rsplit(".", 1)[-1] == t for m in found)]
        if missing:
            raise FedpeftError(f"adapter {name} has no weights for {', '.join(missing)}")
        placed: list[MultiLinear] = []
        try:
            for module, found_tensors in found.items():
                layer = self._wrap(module)
                weight = next(layer.base_layer.parameters(), None)
                tensors = tuple(t if weight is None else t.to(weight.device) for t in found_tensors)
                if cfg.kind == "lora":
                    a, b = tensors
                    _check_shape(name, module, layer, a.shape[1], b.shape[0])
                    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                        raise FedpeftError(f"adapter {name}: layer {module}'s A and B disagree on the rank")
                    layer.lora[name] = LayerLoRA(a, b, cfg.alpha / cfg.rank)
                else:
                    (v,) = tensors
                    ff = module.rsplit(".", 1)[-1] in cfg.feedforward_modules
                    n_in, n_out = _features(layer)
                    if v.numel() != (n_in if ff else n_out):
                        raise FedpeftError(
                            f"adapter {name}: layer {module} has no room for {v.numel()} scales"
                        )
                    layer.ia3[name] = LayerIA3(v.reshape(-1), ff)
                placed.append(layer)
        except Exception:
            for layer in placed:  # all of the adapter or none of it
                layer.lora.pop(name, None)
                layer.ia3.pop(name, None)
            raise
        self.configs[name] = cfg
        self.rows.version += 1

    def drop(self, name: str) -> None:
        for layer in self.layers.values():
            layer.lora.pop(name, None)
            layer.ia3.pop(name, None)
        self.configs.pop(name, None)
        self.rows.version += 1

    def parameters_of(self, name: str) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for layer in self.layers.values():
            if name in layer.lora:
                out += [layer.lora[name].a, layer.lora[name].b]
            if name in layer.ia3:
                out.append(layer.ia3[name].vector)
        return out

    @contextmanager
    def rows_of(self, names: Sequence[str | None]) -> Iterator[None]:
        """Run the model with these adapters, one per batch row (None: the base)."""
        unknown = {n for n in names if n is not None and n not in self.configs}
        if unknown:
            raise FedpeftError(f"no adapter named {sorted(unknown)[0]} is loaded")
        self.rows.set(names)
        try:
            yield
        finally:
            self.rows.set(None)

    def unwrap(self) -> None:
        """Put the base's own layers back (the adapters go with their wrappers)."""
        for path, layer in self.layers.items():
            parent, _, child = path.rpartition(".")
            setattr(self.model.get_submodule(parent), child, layer.base_layer)
        self.layers.clear()
        self.configs.clear()

    def _wrap(self, path: str) -> MultiLinear:
        if path in self.layers:
            return self.layers[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise FedpeftError(f"the base model has no layer {path}") from None
        parent, _, child = path.rpartition(".")
        layer = MultiLinear(module, self.rows)
        setattr(self.model.get_submodule(parent), child, layer)
        self.layers[path] = layer
        return layer


def _by_module(
    arrays: dict[str, np.ndarray | torch.Tensor], kind: str
) -> dict[str, tuple[torch.Tensor, ...]]:
    """peft's keys grouped by the module they adapt: (A, B) for LoRA, (vector,) for IA3."""
    suffixes = LORA_KEYS if kind == "lora" else (IA3_KEY,)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise FedpeftError(f"unexpected key in a {kind} adapter: {key}")
        module = key[len(PREFIX) : -len(suffix)]
        t = torch.as_tensor(np.array(value, copy=True)) if isinstance(value, np.ndarray) else value
        grouped.setdefault(module, {})[suffix] = t
    out = {}
    for module, parts in grouped.items():
        if set(parts) != set(suffixes):
            raise FedpeftError(f"layer {module} lacks {', '.join(sorted(set(suffixes) - set(parts)))}")
        out[module] = tuple(parts[s] for s in suffixes)
    return out


def _features(layer: MultiLinear) -> tuple[int | None, int | None]:
    base = layer.base_layer
    n_in, n_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
    weight = getattr(base, "weight", None)
    if weight is not None and (n_in is None or n_out is None):
        n_in, n_out = weight.shape[1], weight.shape[0]
    return n_in, n_out


def _check_shape(name: str, module: str, layer: MultiLinear, n_in: int, n_out: int) -> None:
    want = _features(layer)
    if want != (n_in, n_out):
        raise FedpeftError(f"adapter {name}: layer {module} takes {want}, the adapter {(n_in, n_out)}")
