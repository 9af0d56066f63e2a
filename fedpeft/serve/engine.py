"""One peft model holding every served adapter, and the decode loop of a batch of requests.

LoRA requests for different adapters (and the base) run in one forward: peft's mixed-adapter batches
(`adapter_names`, one name per row; LoRAX and S-LoRA serve many LoRAs over one base the same way) apply each
row's LoRA to its own rows only. IA3 has no mixed-batch forward in peft 0.21, so an IA3 batch is decoded
one adapter group after another; prompt and prefix tuning, one request after another through peft's
generate().

The loop is ours rather than `generate()`: each row keeps its own sampling settings, stop strings, token
budget and stream, which `generate()` applies batch-wide. Rows are left-padded with explicit position ids,
so a padded row computes what it computes alone (up to float rounding).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
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
from fedpeft.model.placement import model_device
from fedpeft.model.precision import autocast
from fedpeft.serve.catalog import BASE, Entry

MIXED = "__base__"  # peft's row name for "no adapter" in a mixed batch: any name no layer holds


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32 into inf and NaN probabilities; it is greedy anyway
        return self.temperature < 1e-4


def failure(e: BaseException) -> str:
    """A failed generation, in the one line its request gets back."""
    return f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


class Job:
    """One request's generation: its prompt, adapter and sampling; the tokens it got and its text so far.
    `on_text(delta, finish)` gets the text that is safe to send: never a part of a stop string or half a
    UTF-8 character; `finish` is None until the last call ("stop" or "length", OpenAI's reasons, or "error"
    with `error` set)."""

    def __init__(
        self,
        prompt_ids: list[int],
        adapter: str,
        sampling: Sampling,
        on_text: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.adapter = adapter
        self.sampling = sampling
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None
        self.error = ""
        self.cancelled = False  # set from another thread when the client went away
        self.generator: torch.Generator | None = None
        if not sampling.greedy:  # its own generator: a request's seed decides its draws whatever the batch
            self.generator = torch.Generator()
            self.generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's last logits (float32, on the CPU)."""
        s = self.sampling
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def add(self, token: int, decode: Callable[[list[int]], str], eos: set[int]) -> None:
        if token in eos:
            self._emit("stop")
            return
        self.ids.append(token)
        self.text = decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self._emit("stop")
        else:
            self._emit("length" if len(self.ids) >= self.sampling.max_tokens else None)

    def end(self, finish: str) -> None:
        self._emit(finish)

    def fail(self, message: str) -> None:
        self.error = message
        self._emit("error")

    def _emit(self, finish: str | None) -> None:
        self.finish = finish
        end = len(self.text)
        if finish is None:  # hold back what a stop string or the next byte of a character may still change
            end -= max((len(s) - 1 for s in self.sampling.stop), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        delta = self.text[self.sent : max(end, self.sent)]
        self.sent += len(delta)
        if self.on_text is not None and (delta or finish is not None):
            try:
                self.on_text(delta, finish)
            except RuntimeError:  # the request's event loop is gone (the server is stopping): nobody listens
                self.cancelled = True


class Engine:
    """The base (loaded once) with every adapter of `entries` loaded into one peft model."""

    def __init__(self, base: Base, entries: list[Entry]) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        # A fast tokenizer used from two threads at once can fail ("Already borrowed", huggingface/tokenizers
        # #537): the API thread encodes while the batcher thread decodes.
        self._tokenizer_lock = threading.Lock()
        self.names = [BASE] + [e.name for e in entries]
        self.entries = {e.name: e for e in entries}
        self.kind = entries[0].kind if entries else None
        self._internal: dict[str, str] = {}  # API name -> peft adapter name (peft names hold no dots)
        eos = base.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        self.context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        if not entries:
            self.model = base.model
            return
        for e in entries:
            check_fingerprint(e.files.fingerprint, base, f"adapter {e.name} ({e.files.path})")
        self.model = inject(base, entries[0].files.adapter_config)
        for i, e in enumerate(entries):
            internal = "default" if i == 0 else f"a{i}"
            if i > 0:
                self.model.add_adapter(internal, _peft_config(e.files.adapter_config))
            self._internal[e.name] = internal
            self._load(internal, e)
            e.files.arrays.clear()  # now in the model: a second copy would double each adapter's memory
        self.model.requires_grad_(False)
        self.model.eval()

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

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Decode `jobs` to the end (each finishes by its own budget, stop string or end of text)."""
        if self.kind is None or (self.kind == "lora" and len({j.adapter for j in jobs}) > 1):
            self._decode(jobs, mixed=self.kind == "lora")
            return
        # One adapter group at a time (IA3 and prompt learning; LoRA when the whole batch wants one adapter:
        # peft's plain forward, without the mixed batch's per-row gathers).
        for name in dict.fromkeys(j.adapter for j in jobs):
            group = [j for j in jobs if j.adapter == name]
            if name == BASE:
                with self.model.disable_adapter():
                    self._decode(group, mixed=False)
                continue
            self.model.set_adapter(self._internal[name])
            if self.kind not in ("prompt", "prefix"):
                self._decode(group, mixed=False)
                continue
            for j in group:  # virtual tokens: peft's generate(), one request at a time
                try:
                    self._generate(j)
                except Exception as e:  # this request fails, not the ones after it
                    j.fail(failure(e))

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

    def _decode(self, jobs: list[Job], mixed: bool) -> None:
        device = model_device(self.model)
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, j in enumerate(jobs):
            ids[row, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
            mask[row, width - len(j.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra: dict[str, Any] = {}
        if mixed:
            extra["adapter_names"] = [self._internal.get(j.adapter, MIXED) for j in jobs]
        greedy = [j.sampling.greedy for j in jobs]
        past = None
        with autocast(self.base.compute, device.type):
            for _ in range(max(j.sampling.max_tokens for j in jobs)):
                out = self.model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    cache=past,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                )
                past = out.cache
                logits = out.logits[:, -1, :].float().cpu()
                tokens = logits.argmax(-1)
                for row, j in enumerate(jobs):
                    if j.done:
                        tokens[row] = self.pad
                        continue
                    try:
                        if not greedy[row]:
                            tokens[row] = j.pick(logits[row])
                        j.add(int(tokens[row]), self.decode, self.eos)
                    except Exception as e:  # this row's request fails, not the batch it shares
                        j.fail(failure(e))
                if all(j.done for j in jobs):
                    return
                live = torch.tensor([[0 if j.done else 1] for j in jobs], dtype=torch.long)
                ids = tokens[:, None]
                # a finished row attends to nothing new and stays at its last position: with learned absolute
                # positions (GPT-2's table) a long-finished row would otherwise run past the table's end
                mask = torch.cat([mask, live], dim=-1)
                positions = positions[:, -1:] + live

    def check_budget(self, prompt_ids: list[int], max_tokens: int) -> None:
        if len(prompt_ids) + max_tokens > self.context:
            raise FedpeftError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceed the model's "
                f"context of {self.context} tokens"
            )
