"""The decode loop on the tiny model: a mixed batch of adapters computes what each request computes alone
and what peft's own generate() computes with that adapter; stop strings, budgets and streaming pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.model.base import load_base
from fedpeft.serve.catalog import discover
from fedpeft.serve.engine import Engine
from fedpeft.serve.jobs import Job, Sampling
from tests.serve.runs import peft_generate, peft_model_for, write_run

PROMPTS = ["the quick brown fox", "a small bird sings about", "over the lazy dog and the long road", "home;"]


def engine_for(tmp: Path, cache_dir: str, cfg: AdapterConfig) -> Engine:
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    write_run(tmp / "run", base, ["alice", "bob"], cfg=cfg, scale=0.5)
    return Engine(
        load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)),
        discover([str(tmp / "run")], []),
    )


def greedy(
    engine: Engine, prompts: list[str], models: list[str], tokens: int | list[int] = 12
) -> list[list[int]]:
    budgets = tokens if isinstance(tokens, list) else [tokens] * len(prompts)
    jobs = [
        Job(engine.encode(p), m, Sampling(n, temperature=0))
        for p, m, n in zip(prompts, models, budgets, strict=True)
    ]
    engine.run(jobs)
    return [j.ids for j in jobs]


@pytest.mark.parametrize(
    "cfg",
    [AdapterConfig(), AdapterConfig(kind="ia3", target_modules=("k_proj", "v_proj", "down_proj"))],
    ids=["lora", "ia3"],
)
def test_a_mixed_batch_equals_each_request_alone_and_peft_generate(
    tmp_path: Path, tiny_path: Path, cache_dir: str, cfg: AdapterConfig
) -> None:
    engine = engine_for(tmp_path, cache_dir, cfg)
    models = ["base", "global", "personal/alice", "personal/bob"]
    batched = greedy(engine, PROMPTS, models)
    alone = [greedy(engine, [p], [m])[0] for p, m in zip(PROMPTS, models, strict=True)]
    assert batched == alone
    # rows that finish early are masked out and stop advancing; the others go on as alone
    assert greedy(engine, PROMPTS, models, [2, 12, 5, 12]) == [alone[0][:2], alone[1], alone[2][:5], alone[3]]
    # each adapter computes its own logits: the rows did not all run the base (or one adapter)
    assert len({round(last_logit(engine, PROMPTS[0], m), 4) for m in models}) == 4
    # and what a row computed is what peft computes with that adapter active, one request, generate()
    for prompt, model, ids in zip(PROMPTS, models, batched, strict=True):
        assert ids == peft_generate(engine, model, prompt, 12)[: len(ids)]


@torch.no_grad()
def last_logit(engine: Engine, prompt: str, model: str) -> float:
    """The summed last-position logits of one prompt under one adapter, applied by peft."""
    enc = engine.tokenizer(prompt, return_tensors="pt")
    return float(peft_model_for(engine, model)(**enc).logits[0, -1].abs().sum())


class Chars:
    """A tokenizer whose token i is the character chr(i)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def feed(text: str, sampling: Sampling, eos: set[int] = frozenset()) -> tuple[list[str], Job]:
    pieces: list[str] = []
    job = Job(
        [1], "base", sampling, lambda delta, finish: pieces.append(delta + (f"|{finish}" if finish else ""))
    )
    for ch in text:
        if job.done:
            break
        job.add(ord(ch), Chars().decode, set(eos))
    return pieces, job


def test_stop_strings_are_cut_and_never_half_sent() -> None:
    pieces, job = feed("ab<|x|>cd", Sampling(20, stop=("<|x|>",)))
    assert "".join(pieces) == "ab|stop" and job.text == "ab" and job.finish == "stop"
    assert not any("<" in p for p in pieces)  # the start of the stop string was held back, not sent
    pieces, job = feed("abc<|y", Sampling(20, stop=("<|x|>",)))
    assert job.finish is None and "".join(pieces) == "ab"  # 4 characters held back until they cannot stop
    pieces, job = feed("abcdef", Sampling(3))
    assert pieces == ["a", "b", "c|length"] and job.ids == [97, 98, 99]
    pieces, job = feed("ab\x00cd", Sampling(20), eos={0})
    assert "".join(pieces) == "ab|stop" and job.ids == [97, 98]
    pieces, job = feed("a\ufffd", Sampling(20))
    assert pieces == ["a"]  # half a character waits for its next byte


def test_sampling_follows_its_seed_and_top_p(tmp_path: Path, tiny_path: Path, cache_dir: str) -> None:
    engine = engine_for(tmp_path, cache_dir, AdapterConfig())

    def sample(seed: int, top_p: float = 1.0) -> list[int]:
        job = Job(engine.encode(PROMPTS[0]), "global", Sampling(16, temperature=1.0, top_p=top_p, seed=seed))
        engine.run([job])
        return job.ids

    assert sample(1) == sample(1) and sample(1) != sample(2)
    assert sample(5, top_p=1e-6) == greedy(engine, [PROMPTS[0]], ["global"], 16)[0]  # the top token only
    logits = torch.tensor([0.0, 10.0, 9.9, -5.0])
    job = Job([1], "base", Sampling(1, temperature=1.0, top_p=0.6, seed=0))
    assert {job.pick(logits) for _ in range(50)} == {1, 2}  # the nucleus: the two tokens reaching 0.6


def test_a_vanishing_temperature_is_greedy_and_a_full_queue_is_busy() -> None:
    from fedpeft.serve.batcher import Batcher, Busy

    assert Sampling(4, temperature=1e-30).greedy and not Sampling(4, temperature=0.5).greedy
    failed: list[str] = []
    batcher = Batcher(None, max_batch=4, wait_s=0.0, max_queue=2)  # type: ignore[arg-type]
    jobs = [Job([1], "base", Sampling(2), lambda d, f: failed.append(f)) for _ in range(3)]
    batcher.submit(jobs[:2])
    with pytest.raises(Busy, match="--max-queue 2"):
        batcher.submit(jobs[2:])
    batcher.stop(timeout=1)  # never started: the queued requests fail, nothing waits for an answer
    assert failed == ["error", "error"] and jobs[0].error == "the server is stopping"
    with pytest.raises(Busy):
        batcher.submit(jobs[2:])


def test_requests_that_join_a_running_batch_decode_as_alone(tmp_path: Path, cache_dir: str) -> None:
    """Continuous batching: rows join between steps (shorter and longer prompts than the batch's width, other
    adapters) and leave when done; each answers what it answers alone."""
    engine = engine_for(tmp_path, cache_dir, AdapterConfig())
    models = ["global", "base", "personal/alice", "personal/bob"]
    alone = [greedy(engine, [p], [m], 10)[0] for p, m in zip(PROMPTS, models, strict=True)]
    jobs = [
        Job(engine.encode(p), m, Sampling(10, temperature=0)) for p, m in zip(PROMPTS, models, strict=True)
    ]
    running = engine.running()
    running.join(jobs[:1])
    for _ in range(3):
        running.step()
    running.join(jobs[1:3])  # "a small bird..." is shorter than the running row's width, the next longer
    running.step()
    assert len(running) == 3
    running.join(jobs[3:])
    while len(running):
        running.step()
    assert [j.ids for j in jobs] == alone
    assert running.mask.shape == (0, 0)  # every row left: nothing held


def test_logprobs_are_the_models_own(tmp_path: Path, cache_dir: str) -> None:
    """Each token's log-probability and its top alternatives equal a direct forward of prompt + answer through
    peft's model; sampling at a temperature does not change them."""
    engine = engine_for(tmp_path, cache_dir, AdapterConfig())
    job = Job(engine.encode(PROMPTS[1]), "personal/alice", Sampling(6, temperature=0.7, seed=3, logprobs=3))
    other = Job(engine.encode(PROMPTS[0]), "global", Sampling(6, temperature=0))  # shares the batch
    engine.run([job, other])
    assert len(job.logprobs) == len(job.ids) and not other.logprobs
    ids = torch.tensor([job.prompt_ids + job.ids])
    with torch.no_grad():
        logits = peft_model_for(engine, "personal/alice")(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[len(job.prompt_ids) - 1 : -1], dim=-1)
    for step, (token, value, top) in enumerate(job.logprobs):
        assert token == job.ids[step]
        assert value == pytest.approx(float(lp[step, token]), abs=1e-4)
        assert [t for t, _ in top] == lp[step].topk(3).indices.tolist()
