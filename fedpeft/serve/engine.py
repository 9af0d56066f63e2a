"""The served base and adapters, and the decode of a set of requests.

LoRA and IA3 adapters (any mix of them, and the base) run through one batched operator
(fedpeft/model/multi.py): each row of a batch through its own adapter, one batched matmul pair per layer.
Prompt and prefix tuning act on the input, not on the layers: those adapters live in one peft model and decode
one request after another through peft's generate().

The loop is ours rather than `generate()`: each row keeps its own sampling settings, stop strings, token
budget and stream, which `generate()` applies batch-wide; rows join and leave the running batch as they
come and finish (fedpeft/serve/running.py).
"""

from __future__ import annotations

import secrets
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import (
    _peft_config,
    check_fingerprint,
    check_schema,
    inject,
    not_placed,
    schema_of,
)
from fedpeft.model.base import Base
from fedpeft.model.multi import PER_ROW, MultiAdapter
from fedpeft.model.placement import model_device
from fedpeft.model.precision import autocast
from fedpeft.serve.catalog import BASE, Entry
from fedpeft.serve.jobs import Job, failure
from fedpeft.serve.running import Running


class Engine:
    """The base (loaded once) with every adapter of `entries`: LoRA and IA3 in the batched operator, prompt
    and prefix tuning in one peft model."""

    def __init__(self, base: Base, entries: list[Entry]) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        # A fast tokenizer used from two threads at once can fail ("Already borrowed", huggingface/tokenizers
        # #537): the API thread encodes while the batcher thread decodes.
        self._tokenizer_lock = threading.Lock()
        self.names = [BASE] + [e.name for e in entries]
        self.entries = {e.name: e for e in entries}
        self._internal: dict[str, str] = {}  # API name -> peft adapter name (peft names hold no dots)
        eos = base.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self.context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        for e in entries:
            check_fingerprint(e.files.fingerprint, base, f"adapter {e.name} ({e.files.path})")
        self.model = base.model
        self.multi: MultiAdapter | None = None
        # prompt and prefix tuning, VeRA and DoRA run through peft's own forward, one adapter at a time
        self.prompt_learning = any(e.files.adapter_config.kind not in PER_ROW for e in entries)
        if self.prompt_learning:
            self._peft_model(entries)
        elif entries:
            self.multi = MultiAdapter(base.model)
            for e in entries:
                self.multi.add(e.name, e.files.adapter_config, e.files.arrays)
                e.files.arrays.clear()  # now in the model: a second copy would double each adapter's memory
        self.model.requires_grad_(False)
        self.model.eval()

    def _peft_model(self, entries: list[Entry]) -> None:
        self.model = inject(self.base, entries[0].files.adapter_config)
        for i, e in enumerate(entries):
            internal = "default" if i == 0 else f"a{i}"
            if i > 0:
                self.model.add_adapter(internal, _peft_config(e.files.adapter_config))
            self._internal[e.name] = internal
            self._load(internal, e)
            e.files.arrays.clear()

    def _load(self, internal: str, e: Entry) -> None:
        # peft: imported with the first adapter, not with the module
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = get_peft_model_state_dict(self.model, adapter_name=internal, save_embedding_layers=False)
        expected = {k: v.detach().cpu().numpy() for k, v in expected.items()}
        check_schema(schema_of(expected), schema_of(e.files.arrays), f"adapter {e.name} ({e.files.path})")
        state = {k: torch.from_numpy(v.copy()) for k, v in e.files.arrays.items()}
        unplaced = not_placed(self.model, set_peft_model_state_dict(self.model, state, adapter_name=internal))
        if unplaced:
            raise FedpeftError(f"adapter {e.name}: peft did not place {unplaced[0]}")

    def encode(self, prompt: str) -> list[int]:
        with self._tokenizer_lock:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise FedpeftError("this base model has no chat template: use /v1/completions")
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def continuous(self) -> bool:
        """Whether requests can join a running batch (every adapter is applied per layer)."""
        return not self.prompt_learning

    def running(self) -> Running:
        return Running(self)

    def rows(self, jobs: list[Job]) -> AbstractContextManager[Any]:
        """The model runs each job's row through that job's adapter."""
        if self.multi is None:
            return nullcontext()
        return self.multi.rows_of([None if j.adapter == BASE else j.adapter for j in jobs])

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Decode `jobs` to the end (each finishes by its own budget, stop string or end of text)."""
        if self.continuous:
            self._decode(jobs)
            return
        # prompt learning: the base's rows together, then peft's generate(), one request at a time
        base_jobs = [j for j in jobs if j.adapter == BASE]
        if base_jobs:
            with self.model.disable_adapter():
                self._decode(base_jobs)
        for j in jobs:
            if j.adapter == BASE:
                continue
            self.model.set_adapter(self._internal[j.adapter])
            try:
                self._generate(j)
            except Exception as e:  # this request fails, not the ones after it
                j.fail(failure(e))

    def _decode(self, jobs: list[Job]) -> None:
        running = self.running()
        running.join(jobs)
        while len(running):
            running.step()

    def _generate(self, job: Job) -> None:
        """One request through peft's generate(), which puts the virtual tokens (or keys and values) in front
        of every step; our own loop cannot. Tokens reach the job through a streamer, as they come."""
        # transformers' generation: only prompt and prefix tuning decode through generate()
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        engine = self

        class Feed(BaseStreamer):
            prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt itself
                    self.prompt_seen = True
                    return
                if not job.done:
                    job.add(int(value.reshape(-1)[0]), engine.decode, engine.eos)

            def end(self) -> None:
                pass

        class Done(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), job.done, dtype=torch.bool, device=input_ids.device)

        device = model_device(self.model)
        ids = torch.tensor([job.prompt_ids], device=device)
        s = job.sampling
        sampling: dict[str, Any] = {"do_sample": False}
        if not s.greedy:
            sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
        # generate() draws from torch's global generator: seeded here, and restored after (fork_rng)
        with torch.random.fork_rng(devices=[]), autocast(self.base.compute, device.type):
            if not s.greedy:
                torch.manual_seed(s.seed if s.seed is not None else secrets.randbits(63))
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=s.max_tokens,
                pad_token_id=self.pad,
                streamer=Feed(),
                stopping_criteria=StoppingCriteriaList([Done()]),
                **sampling,
            )
        if not job.done:  # generate() stopped on its own (its max_new_tokens)
            job.end("length")

    def check_budget(self, prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.context:
            raise FedpeftError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                f"context of {self.context} tokens"
            )
