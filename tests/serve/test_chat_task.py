"""A chat adapter trained on answers (task data through the chat template) answers through `fedpeft serve`'s
/v1/chat/completions: the server renders the messages with the template training used, token for token,
and the adapter gives the answer it learned, which the base does not."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from fastapi.testclient import TestClient

from fedpeft.config.tree import AdapterConfig, BaseConfig, DataConfig, RunConfig, TrainConfig

QUESTION = "What colour is the sky?"
ANSWER = "blue sky"


def test_a_chat_adapter_answers_through_chat_completions(
    tmp_path: Path, tiny_path: Path, cache_dir: str
) -> None:
    from fedpeft.data.chat import render
    from fedpeft.model.base import load_base
    from fedpeft.serve.api import create_app
    from fedpeft.serve.batcher import Batcher
    from fedpeft.serve.catalog import discover
    from fedpeft.serve.engine import Engine
    from fedpeft.training.train_command import train_adapter

    data = tmp_path / "chats"
    data.mkdir()
    chat = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    for user in ("ann", "ben"):
        (data / f"{user}.jsonl").write_text((json.dumps(chat) + "\n") * 10)
    cfg = RunConfig(
        base=BaseConfig(model="tiny", quant="none", cache_dir=cache_dir),
        adapter=AdapterConfig(r=8),
        data=DataConfig(data=str(data), block_size=96, reference_text="off"),
        train=TrainConfig(steps=60, lr=2e-2, batch_size=4, progress=False),
    )
    line = train_adapter(cfg, "ann", tmp_path / "adapter")
    assert "ROUGE-L" in line  # a generation task: scored on its greedy answers

    base = load_base(replace(cfg.base))
    engine = Engine(base, discover([], [f"chat={tmp_path / 'adapter'}"]))
    messages = [{"role": "user", "content": QUESTION}]
    # the server's prompt is the training template's, token for token
    assert engine.encode(engine.chat_prompt(messages)) == render(base.tokenizer, messages, True)
    batcher = Batcher(engine, 4, 0.01, 16)
    batcher.start()
    try:
        with TestClient(create_app(engine, batcher, None, 64)) as client:
            answers = {}
            for model in ("chat", "base"):
                # the tiny tokenizer's end of turn is plain text, not its end-of-text token: a stop string
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": 16,
                    "temperature": 0,
                    "stop": ["<|im_end|>"],
                }
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                answers[model] = r.json()["choices"][0]["message"]["content"]
    finally:
        batcher.stop()
    # the answer it learned (60 steps teach the byte-level tiny model the answer; its end-of-turn marker only
    # in part, so the text may run on after it), which the base alone does not give
    assert answers["chat"].startswith(ANSWER)
    assert not answers["base"].startswith(ANSWER)
