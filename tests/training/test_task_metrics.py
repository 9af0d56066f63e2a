"""Task metrics (fedpeft.training.task_metrics): option scores against a by-hand log-softmax, batched greedy answers
against one-at-a-time ones, SQuAD exact match, ROUGE-L, and classification counts that travel as metrics."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.model.adapters import inject
from fedpeft.model.base import load_base
from fedpeft.training import task_metrics
from fedpeft.training.task_metrics import (
    ClassCounts,
    _by_length,
    _greedy_new_ids,
    classify,
    exact_match,
    greedy_answers,
    normalize_answer,
    rouge_l,
    score_options,
)

PROMPTS = ["the fox", "a much longer prompt about rivers and", "x"]
OPTIONS = [" dog", " bird sings", "!"]


def _model(cache_dir: str, kind: str) -> tuple[Any, Any]:
    """The tiny base in fp32, alone ("base") or under a fresh adapter (inject wraps the base in place)."""
    base = load_base(BaseConfig(model="tiny", quant="none", compute_dtype="fp32", cache_dir=cache_dir))
    model = base.model if kind == "base" else inject(base, AdapterConfig(kind=kind, virtual_tokens=4))
    return model, base.tokenizer


@torch.no_grad()
def _by_hand(model: Any, prompt: list[int], option: list[int]) -> float:
    ids = torch.tensor([prompt + option])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if (
        getattr(model, "_is_prompt_learning", False)
        and model.peft_config["default"].peft_type == "PROMPT_TUNING"
    ):
        # prompt tuning returns logits for its virtual tokens too, first: [1, 4 + T, vocab]
        assert logits.shape[1] == 4 + ids.shape[1]
    logits = logits[0, -ids.shape[1] :].float()
    return sum(
        torch.log_softmax(logits[t - 1], -1)[ids[0, t]].item() for t in range(len(prompt), ids.shape[1])
    )


@pytest.mark.parametrize("kind", ["base", "prompt", "prefix"])
def test_score_options_match_a_by_hand_log_softmax(cache_dir: str, tiny_path: Path, kind: str) -> None:
    model, tok = _model(cache_dir, kind)
    prompts, options = [tok.encode(p) for p in PROMPTS], [tok.encode(o) for o in OPTIONS]
    # one batch holding every prompt x option pair: lengths 2..48 tokens, right-padded
    scores = score_options(model, prompts, options, "fp32", batch_size=8, pad_id=tok.pad_token_id)
    assert [len(row) for row in scores] == [3, 3, 3]
    for i, p in enumerate(prompts):
        for j, o in enumerate(options):
            assert scores[i][j] == pytest.approx(_by_hand(model, p, o), abs=1e-4)
            assert scores[i][j] < 0
    # neither the batch size nor the padding token moves a score
    alone = score_options(model, prompts, options, "fp32", batch_size=1, pad_id=tok.pad_token_id)
    other_pad = score_options(model, prompts, options, "fp32", batch_size=8, pad_id=0)
    for row, a, b in zip(scores, alone, other_pad, strict=True):
        assert row == pytest.approx(a, abs=1e-4)
        assert row == pytest.approx(b, abs=1e-4)


def test_score_options_edge_cases(cache_dir: str, tiny_path: Path) -> None:
    model, tok = _model(cache_dir, "base")
    assert score_options(model, [tok.encode("hi")], [[]], "fp32") == [[0.0]]  # nothing to score
    with pytest.raises(ValueError, match="at least one token"):
        score_options(model, [[]], [tok.encode("a")], "fp32")


@pytest.mark.parametrize("kind", ["base", "prefix"])
def test_greedy_answers_batched_equal_one_at_a_time(cache_dir: str, tiny_path: Path, kind: str) -> None:
    model, tok = _model(cache_dir, kind)
    prompts = [tok.encode(p) for p in [*PROMPTS, "rivers", "the fox"]]  # mixed lengths, two of one length
    widths: list[tuple[int, ...]] = []
    generate = model.generate

    def spy(**kw: Any) -> torch.Tensor:
        widths.append(tuple(kw["attention_mask"].sum(1).tolist()))
        return generate(**kw)

    model.generate = spy
    batched = _greedy_new_ids(model, tok, prompts, 10, "fp32", batch_size=8)
    alone = [_greedy_new_ids(model, tok, [p], 10, "fp32", batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(0 < len(ids) <= 10 for ids in batched)
    answers = greedy_answers(model, tok, prompts, 10, "fp32", batch_size=3)
    assert answers == [tok.decode(ids, skip_special_tokens=True).strip() for ids in alone]
    # a byte-level tokenizer: at most one character per new token
    assert all(len(a) <= 3 for a in greedy_answers(model, tok, prompts, 3, "fp32"))
    # peft ignores position ids under prefix (and prompt) tuning and puts its virtual keys and values before
    # the left padding, which moves their logits: those batch prompts of one length only, without padding
    assert widths[0] == ((37, 7, 7, 6, 1) if kind == "base" else (37,))
    assert kind == "base" or all(len(set(w)) == 1 for w in widths)


def test_batches_by_length_keep_every_index_once() -> None:
    lengths = [3, 5, 3, 1, 5, 5]
    assert _by_length(lengths, 2) == [[1, 4], [5, 0], [2, 3]]
    assert _by_length(lengths, 2, same_length=True) == [[1, 4], [5], [0, 2], [3]]
    with pytest.raises(ValueError):
        _by_length(lengths, 0)


class _Scripted(torch.nn.Module):
    """A model whose generate appends fixed tokens: checks the cut at end-of-text and the decoding."""

    def __init__(self, new: list[list[int]]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.new = new

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        assert kw["do_sample"] is False and kw["pad_token_id"] == 256
        assert attention_mask[:, -1].all()  # left padding: every prompt ends in the last column
        return torch.cat([input_ids, torch.tensor(self.new)], dim=1)


def test_greedy_answers_stop_at_end_of_text(cache_dir: str, tiny_path: Path) -> None:
    _, tok = _model(cache_dir, "base")
    eos = tok.eos_token_id
    new = [tok.encode(" yes ") + [eos, eos], tok.encode("no") + [eos] + tok.encode("!!!!")]
    prompts = [tok.encode("q1"), tok.encode("question 2")]
    # longest first in a batch: rows come back in the order the prompts were given
    scripted = _Scripted(new[::-1])
    assert greedy_answers(scripted, tok, prompts, 5, "fp32") == ["yes", "no"]


def test_exact_match_normalizes_like_squad() -> None:
    assert normalize_answer("  The  Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a pear and THE end.") == "apple pear and end"
    assert normalize_answer("theory") == "theory"  # articles only as whole words
    assert exact_match("the Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "a") == 1.0  # both normalize to nothing, as in SQuAD


def test_rouge_l_is_rouge_scores_f_measure() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("the cat sat on the mat", "the cat was on the mat"),
        ("a quick brown fox", "the quick brown dog jumps"),
        ("completely different", "nothing shared here"),
        ("Same Words", "same words"),
    ]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)
    # not symmetric in general: precision is over the prediction, recall over the reference
    assert rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    assert rouge_l("completely different", "nothing shared here") == 0.0


PAIRS = [(0, 0), (1, 0), (1, 1), (1, 1), (0, 2), (2, 2), (0, 0)]  # (pred, gold); label 3 never occurs


def _counts(pairs: list[tuple[int, int]]) -> ClassCounts:
    c = ClassCounts.zeros(4)
    for pred, gold in pairs:
        c.add(pred, gold)
    return c


def test_class_counts_accuracy_and_macro_f1() -> None:
    c = _counts(PAIRS)
    assert (c.n, c.correct) == (7, 5)
    assert (c.tp, c.fp, c.fn) == ([2, 2, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0])
    assert c.accuracy == pytest.approx(5 / 7)
    # F1 = 2tp / (2tp + fp + fn): label 0: 4/6 = 2/3; label 1: 4/5; label 2: 2/3; label 3 (never seen)
    # left out. Mean of three: (2/3 + 4/5 + 2/3) / 3 = (32/15) / 3 = 32/45
    assert c.macro_f1 == pytest.approx(32 / 45)
    assert ClassCounts.zeros(3).accuracy == 0.0 and ClassCounts.zeros(3).macro_f1 == 0.0
    with pytest.raises(ValueError):
        c.add(4, 0)
    # two clients' counts merge into the counts of all their examples
    merged = _counts(PAIRS[:3])
    merged.merge(_counts(PAIRS[3:]))
    assert merged == c
    with pytest.raises(ValueError):
        merged.merge(ClassCounts.zeros(2))


def test_class_counts_travel_as_flat_metrics() -> None:
    c = _counts(PAIRS)
    metrics = c.to_metrics("cls_")
    assert metrics["cls_n"] == 7.0 and metrics["cls_tp_0"] == 2.0 and metrics["cls_fn_3"] == 0.0
    assert len(metrics) == 2 + 3 * 4
    assert all(isinstance(v, float) for v in metrics.values())
    assert ClassCounts.from_metrics({**metrics, "loss": 1.5, "tp_9": -1}, 4, "cls_") == c
    assert ClassCounts.from_metrics(c.to_metrics(), 4) == c
    # missing keys count 0
    assert ClassCounts.from_metrics({"n": 3, "correct": 1, "tp_1": 1}, 2) == ClassCounts(
        3, 1, [0, 1], [0, 0], [0, 0]
    )
    for bad in (-1, float("nan"), float("inf"), 1.5, "2", True):
        with pytest.raises(ValueError):
            ClassCounts.from_metrics({**metrics, "cls_fp_1": bad}, 4, "cls_")
    with pytest.raises(ValueError, match="outside"):
        ClassCounts.from_metrics({"tp_4": 1}, 4)
    with pytest.raises(ValueError, match="exceeds"):
        ClassCounts.from_metrics({"n": 1, "correct": 2}, 4)
    with pytest.raises(ValueError):
        ClassCounts.from_metrics({"n": float("nan")}, 4)


def test_classify_picks_the_best_scored_option(cache_dir: str, tiny_path: Path) -> None:
    model, tok = _model(cache_dir, "base")
    prompts, options = [tok.encode(p) for p in PROMPTS], [tok.encode(o) for o in OPTIONS]
    scores = score_options(model, prompts, options, "fp32", pad_id=tok.pad_token_id)
    best = [max(range(3), key=row.__getitem__) for row in scores]
    c = classify(model, tok.pad_token_id, prompts, options, best, "fp32")
    assert (c.n, c.correct, c.tp) == (3, 3, [best.count(k) for k in range(3)])
    wrong = classify(model, tok.pad_token_id, prompts, options, [(b + 1) % 3 for b in best], "fp32")
    assert wrong.correct == 0 and sum(wrong.fn) == 3
    with pytest.raises(ValueError):
        classify(model, tok.pad_token_id, prompts, options, [0], "fp32")


def test_classify_breaks_ties_toward_the_lowest_index(monkeypatch: pytest.MonkeyPatch) -> None:
    tied = [[-1.0, -0.5, -0.5], [-2.0, -2.0, -3.0], [-math.inf, -9.0, -9.0]]
    monkeypatch.setattr(task_metrics, "score_options", lambda *a, **k: tied)
    c = classify(None, 0, [[1]] * 3, [[1], [2], [3]], [1, 0, 1], "fp32")
    assert c.correct == 3
