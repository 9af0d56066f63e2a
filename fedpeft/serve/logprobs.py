"""Log-probabilities in OpenAI's two shapes: /v1/completions' columns (tokens, token_logprobs, top_logprobs,
text_offset) and chat's list of tokens, each with its alternatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.serve.jobs import Job

Entry = tuple[int, float, list[tuple[int, float]]]


def logprobs_of(job: Job, entries: list[Entry], decode: Callable[[list[int]], str], chat: bool) -> Any:
    """None when the request did not ask for them; a token is its own decoded text (a token that holds half
    a UTF-8 character decodes to U+FFFD, as in OpenAI's `token`; `bytes` then give the replacement's)."""
    if job.sampling.logprobs is None:
        return None
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in texts:
            texts[token] = decode([token])
        return texts[token]

    if chat:
        return {
            "content": [
                {
                    **_token(text(token), lp),
                    "top_logprobs": [_token(text(t), v) for t, v in alternatives],
                }
                for token, lp, alternatives in entries
            ],
            "refusal": None,
        }
    offsets, at = [], 0
    for token, _, _ in entries:
        offsets.append(at)
        at += len(text(token))
    return {
        "tokens": [text(token) for token, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [{text(t): v for t, v in alternatives} for _, _, alternatives in entries]
        if job.sampling.logprobs
        else None,
        "text_offset": offsets,
    }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
