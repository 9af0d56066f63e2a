"""A live `fedpeft serve` on 127.0.0.1 with the real packaged model, queried by real HTTP clients (httpx and
the openai package): what it lists, that its answers are peft's, that a mixed batch answers what one request
at a time does, streaming, errors, the API key and SIGTERM.

The base is the fp32 one (--quant none adapters): in bf16 a batch of 4 rounds differently from a single
request (other kernels), so a greedy answer may take the other branch of a near-tie; fp32 keeps batch and
single request identical on this machine, which lets the test ask for equality."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.real

KEY = "a-test-key-1234"
TOKENS = 20
ASKS = [  # (model, prompt): four adapters, four prompts
    ("base", "The economy of the United States"),
    ("global", "My fellow Americans, tonight"),
    ("personal/alice", "We believe that"),
    ("personal/bob", "Health care is"),
]
CHAT = [{"role": "user", "content": "Name one thing every city needs."}]


def write_and_answer(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """A run folder of the real base's adapters, and what peft's generate() answers with each of them."""
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.adapters import load_adapter_state, read_adapter
    from fedpeft.model.base import load_base
    from fedpeft.training.local import generate
    from tests.serve.runs import write_run

    base = load_base(BaseConfig(quant="none"))
    model = write_run(root / "run", base, ["alice", "bob"])
    paths = {
        "global": root / "run" / "global",
        "personal/alice": root / "run" / "personal" / "alice" / "personal",
        "personal/bob": root / "run" / "personal" / "bob" / "personal",
    }

    def reference(name: str, prompt: str, tokens: int = TOKENS) -> str:
        if name == "base":
            with model.disable_adapter():
                return generate(model, base.tokenizer, prompt, tokens, base.compute)
        load_adapter_state(model, read_adapter(paths[name]).arrays)
        return generate(model, base.tokenizer, prompt, tokens, base.compute)

    refs = {name: reference(name, prompt) for name, prompt in ASKS}
    chat_prompt = base.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    refs["chat"] = reference("personal/alice", chat_prompt, 24)
    return paths, refs


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve")
    paths, refs = write_and_answer(root)
    cmd = [sys.executable, "-m", "fedpeft.cli", "serve", str(root / "run"), "--adapter"]
    cmd += [f"extra={paths['personal/alice']}", "--port", "0", "--api-key", KEY, "--batch-wait-ms", "300"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if " at http" in line:
            break
    else:
        pytest.fail(f"fedpeft serve did not start: {''.join(lines)}{proc.stderr.read()}")
    url = line.split(" at ")[1].split(";")[0].strip()
    for _ in range(100):
        try:
            if httpx.get(url.removesuffix("/v1") + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield {"url": url, "proc": proc, "refs": refs, "started": "".join(lines)}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(served: dict[str, Any], key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=served["url"], headers=headers, timeout=120)


def complete(served: dict[str, Any], model: str, prompt: str) -> str:
    with client(served) as c:
        r = c.post(
            "/completions", json={"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
        )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def batches(served: dict[str, Any]) -> dict[str, int]:
    return httpx.get(served["url"].removesuffix("/v1") + "/health").json()


def test_models_lists_what_was_loaded(served: dict[str, Any]) -> None:
    with client(served) as c:
        data = c.get("/models").json()["data"]
    assert [m["id"] for m in data] == ["base", "global", "personal/alice", "personal/bob", "extra"]
    assert data[1]["adapter"] == "lora" and data[1]["round"] == 3 and data[0]["adapter"] is None
    assert "personal/bob" in served["started"] and "API key required" in served["started"]


def test_a_mixed_batch_answers_what_one_request_at_a_time_and_peft_do(served: dict[str, Any]) -> None:
    one_at_a_time = [complete(served, m, p) for m, p in ASKS]
    before = batches(served)
    with ThreadPoolExecutor(len(ASKS)) as pool:
        together = list(pool.map(lambda a: complete(served, *a), ASKS))
    after = batches(served)
    assert after["requests"] == before["requests"] + len(ASKS) and after["largest"] == len(ASKS)  # together
    assert together == one_at_a_time == [served["refs"][m] for m, _ in ASKS]
    assert len(set(together)) == len(ASKS)
    assert complete(served, "extra", ASKS[2][1]) == served["refs"]["personal/alice"]  # --adapter NAME=PATH


def test_streaming_and_chat_through_the_openai_client(served: dict[str, Any]) -> None:
    from openai import OpenAI

    api = OpenAI(base_url=served["url"], api_key=KEY)
    model, prompt = ASKS[1]
    pieces = [
        c.choices[0].text
        for c in api.completions.create(
            model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True
        )
    ]
    assert len(pieces) > 2 and "".join(pieces) == served["refs"][model]
    reply = api.chat.completions.create(model="personal/alice", messages=CHAT, max_tokens=24, temperature=0)
    assert (
        reply.choices[0].message.content == served["refs"]["chat"].strip()
        or reply.choices[0].message.content == served["refs"]["chat"]
    )
    stream = api.chat.completions.create(
        model="personal/alice", messages=CHAT, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_choices_and_logprobs_through_the_openai_client(served: dict[str, Any]) -> None:
    from openai import OpenAI

    api = OpenAI(base_url=served["url"], api_key=KEY)
    model, prompt = ASKS[1]
    drawn = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in drawn.choices] == [0, 1, 2] and len({c.text for c in drawn.choices}) == 3
    one = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=7)
    assert drawn.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once, as OpenAI's
    again = api.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.text for c in again.choices] == [c.text for c in drawn.choices]  # choice k draws with seed + k
    greedy = api.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0, logprobs=2)
    lp = greedy.choices[0].logprobs
    assert "".join(lp.tokens) == greedy.choices[0].text == served["refs"][model]
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    # greedy: each token is its step's most likely one
    assert all(
        max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=False)
    )
    chat = api.chat.completions.create(
        model="personal/alice", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 for t in content)
    stream = api.chat.completions.create(
        model="personal/alice", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        t.token for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert streamed == [t.token for t in content]


def test_errors_are_openai_shaped(served: dict[str, Any]) -> None:
    import openai

    api = openai.OpenAI(base_url=served["url"], api_key=KEY)
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        api.completions.create(model="personal/nobody", prompt="hi", max_tokens=2)
    with client(served) as c:
        bad_json = c.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
        missing = c.post("/completions", json={"model": "global"})
        too_long = c.post("/completions", json={"model": "global", "prompt": "hi", "max_tokens": 10_000})
        big_seed = c.post("/completions", json={"model": "global", "prompt": "hi", "seed": 2**70})
        long_stop = c.post("/completions", json={"model": "global", "prompt": "hi", "stop": "x" * 300})
        bad_role = c.post(
            "/chat/completions", json={"model": "global", "messages": [{"role": "x", "content": "y"}]}
        )
    for r in (bad_json, missing, too_long, big_seed, long_stop, bad_role):
        assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type"}, r.text
    assert (
        "prompt" in missing.json()["error"]["message"]
        and "--max-tokens" in too_long.json()["error"]["message"]
    )
    for key in (None, "wrong-key-000"):
        with client(served, key) as c:
            r = c.get("/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["url"], api_key="wrong-key-000").models.list()


def test_sigterm_stops_the_server_cleanly(served: dict[str, Any]) -> None:
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "fedpeft serve: stopped after" in err and "Traceback" not in err, err


def test_refused_at_start_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fedpeft.json").write_text(json.dumps({"format": 1}))
    for args, why in [
        (["--host", "0.0.0.0", str(bad)], "set --api-key"),
        (["--adapter", f"x={bad}"], "not a fedpeft adapter folder"),
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "fedpeft.cli", "serve", *args], capture_output=True, text=True
        )
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
