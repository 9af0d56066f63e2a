"""A request's generation as the decode loop sees it: its sampling settings, the tokens it got, its text so far
and, when asked for, the log-probabilities of its tokens."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # None: no log-probabilities; K >= 0: each token's, with the K most likely alternatives (OpenAI's logprobs)
    logprobs: int | None = None

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
        # per generated token: (token, its log-probability, the top alternatives as (token, log-probability))
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
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

    def next_token(self, logits: torch.Tensor, greedy_token: int) -> int:
        """This row's next token from its last logits (float32, on the CPU), its log-probabilities recorded
        when the request asked for them. They are the model's own distribution, before temperature and top_p
        (as vLLM reports them by default)."""
        token = greedy_token if self.sampling.greedy else self.pick(logits)
        k = self.sampling.logprobs
        if k is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(lp, k) if k else None
            alternatives = (
                [] if top is None else list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            )
            self.logprobs.append((token, float(lp[token]), alternatives))
        return token

    def add(self, token: int, decode: Callable[[list[int]], str], eos: set[int]) -> None:
        if token in eos:  # the end of text is no token of the answer: nor of its log-probabilities
            if self.logprobs and self.logprobs[-1][0] == token:
                self.logprobs.pop()
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
