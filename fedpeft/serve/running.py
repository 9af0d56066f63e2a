"""The rows decoding now, with continuous batching (Orca, Yu et al., OSDI 2022): a request joins the running
batch at the step after its own prefill and leaves it the step it finishes, freeing its row.

Rows are left-aligned to a shared width: a joining group's keys and values (and the running batch's, when the
group's prompts are longer) are padded on the left and masked out, and the columns no row attends to any more
are trimmed. Each row keeps its own position ids, so it computes what it computes alone (up to float
rounding). The cache is transformers' DynamicCache, edited layer by layer (keys, values: [rows, heads, width,
dim]); a paged cache (vLLM) would avoid the copies a join makes, at the price of its own attention kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional

from fedpeft.errors import FedpeftError
from fedpeft.model.placement import model_device
from fedpeft.model.precision import autocast
from fedpeft.serve.jobs import Job, failure


class Running:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._reset()

    def _reset(self) -> None:
        """No rows: nothing held."""
        self.jobs: list[Job] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.positions = torch.zeros((0, 1), dtype=torch.long)
        self.tokens = torch.zeros((0, 1), dtype=torch.long)  # each row's last token, fed at the next step

    def __len__(self) -> int:
        return len(self.jobs)

    @torch.no_grad()
    def join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together (left-padded), give each its first token, and add the unfinished ones."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.engine.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, j in enumerate(jobs):
            ids[row, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[row, width - len(j.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, tokens = self._forward(jobs, ids, mask, positions, None)
        keep = [row for row, j in enumerate(jobs) if not j.done]
        if not keep:
            return
        group = _Rows(jobs, cache, mask, positions[:, -1:], tokens)
        group.select(keep, len(jobs))
        self._merge(group)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; finished and cancelled rows leave."""
        self._leave([r for r, j in enumerate(self.jobs) if not j.done])
        if not self.jobs:
            return
        self.mask = torch.cat([self.mask, torch.ones((len(self.jobs), 1), dtype=torch.long)], dim=-1)
        self.positions = self.positions + 1
        self.cache, self.tokens = self._forward(self.jobs, self.tokens, self.mask, self.positions, self.cache)
        self._leave([r for r, j in enumerate(self.jobs) if not j.done])

    def fail_all(self, message: str) -> None:
        for j in self.jobs:
            if not j.done:
                j.fail(message)
        self._leave([])

    def _forward(
        self, jobs: list[Job], ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[Any, torch.Tensor]:
        engine = self.engine
        device = model_device(engine.model)
        with engine.rows(jobs), autocast(engine.base.compute, device.type):
            out = engine.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1, :].float().cpu()
        tokens = logits.argmax(-1)
        for row, j in enumerate(jobs):
            if j.done:
                continue
            try:
                tokens[row] = j.next_token(logits[row], int(tokens[row]))
                j.add(int(tokens[row]), engine.decode, engine.eos)
            except Exception as e:  # this row's request fails, not the batch it shares
                j.fail(failure(e))
        return out.cache, tokens[:, None]

    def _merge(self, group: _Rows) -> None:
        if not self.jobs:
            self.jobs, self.cache, self.mask = group.jobs, group.cache, group.mask
            self.positions, self.tokens = group.positions, group.tokens
            return
        width = max(self.mask.shape[1], group.mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(group.cache), strict=True):
            mine.keys = torch.cat([_pad(mine.keys, width), _pad(theirs.keys, width)])
            mine.values = torch.cat([_pad(mine.values, width), _pad(theirs.values, width)])
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(group.mask, width)])
        self.positions = torch.cat([self.positions, group.positions])
        self.tokens = torch.cat([self.tokens, group.tokens])
        self.jobs = self.jobs + group.jobs

    def _leave(self, keep: list[int]) -> None:
        """Keep only the rows `keep`, and trim the columns none of them attends to."""
        if len(keep) == len(self.jobs):
            return
        if not keep:
            self._reset()
            return
        rows = _Rows(self.jobs, self.cache, self.mask, self.positions, self.tokens)
        rows.select(keep, len(self.jobs))
        self.jobs, self.mask, self.positions, self.tokens = rows.jobs, rows.mask, rows.positions, rows.tokens
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first:
            self.mask = self.mask[:, first:]
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class _Rows:
    def __init__(self, jobs: list[Job], cache: Any, mask: torch.Tensor, positions: Any, tokens: Any) -> None:
        self.jobs, self.cache, self.mask, self.positions, self.tokens = jobs, cache, mask, positions, tokens

    def select(self, keep: list[int], rows: int) -> None:
        if len(keep) == rows:
            return
        index = torch.tensor(keep, dtype=torch.long)
        for layer in _layers(self.cache):
            at = index.to(layer.keys.device)
            layer.keys, layer.values = layer.keys[at], layer.values[at]
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        self.jobs = [self.jobs[r] for r in keep]


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        raise FedpeftError("continuous batching needs a full-attention key/value cache (DynamicCache)")
    return layers


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return functional.pad(t, (0, 0, width - t.shape[-2], 0))


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return functional.pad(mask, (width - mask.shape[1], 0))
