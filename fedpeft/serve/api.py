"""The OpenAI-compatible HTTP API over the batcher: GET /v1/models, POST /v1/completions and
/v1/chat/completions (`stream: true` as server-sent events), errors in OpenAI's shape
({"error": {"message", "type", "param", "code"}}) so client libraries raise their usual exceptions."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedpeft.errors import FedpeftError
from fedpeft.serve.batcher import Batcher, Busy
from fedpeft.serve.engine import Engine
from fedpeft.serve.jobs import Job, Sampling
from fedpeft.serve.logprobs import logprobs_of

MAX_STOPS = 4  # as OpenAI's API
MAX_PROMPTS = 128  # prompts in one completions request (each is a row of a batch; OpenAI allows more)
MAX_CHOICES = 128  # prompts times n: the rows one request may ask for
MAX_LOGPROBS = 5  # alternatives per token in /v1/completions (OpenAI's limit); chat's top_logprobs: 20
MAX_STOP_CHARS = 256
MAX_CHARS_PER_TOKEN = 32  # a prompt this many characters per context token is past the context for sure


Event = tuple[int, str, str | None, int]  # choice, new text, finish reason, log-probabilities so far


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per prompt, each its own row (and draws)


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def create_app(engine: Engine, batcher: Batcher, api_key: str | None, max_tokens: int) -> FastAPI:
    app = FastAPI(title="fedpeft serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_auth(app, api_key)
    _add_info_routes(app, engine, batcher)
    _add_completion_routes(app, _Completions(engine, batcher, max_tokens))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours (ApiError), a malformed body (400, as OpenAI answers it) and
    Starlette's own (an unknown path's 404)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "malformed request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))


def _add_auth(app: FastAPI, api_key: str | None) -> None:
    """With an API key, /v1/ answers only requests that bear it (compared in constant time)."""

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return _error(
                    401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
        return await call_next(request)


def _add_info_routes(app: FastAPI, engine: Engine, batcher: Batcher) -> None:
    """GET /health (no key needed) and GET /v1/models."""
    created = int(time.time())

    @app.get("/health", response_model=None)
    async def health() -> Any:
        body = {"batches": batcher.batches, "requests": batcher.rows, "largest": batcher.largest}
        if not batcher.alive:  # the decoding thread is gone: nothing would be answered
            return JSONResponse({"status": "down", **body}, status_code=503)
        return {"status": "ok", **body}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = []
        for name in engine.names:
            e = engine.entries.get(name)
            info = {"adapter": e.kind, "round": e.round} if e else {"adapter": None, "round": None}
            data.append({"id": name, "object": "model", "created": created, "owned_by": "fedpeft", **info})
        return {"object": "list", "data": data}


def _add_completion_routes(app: FastAPI, c: _Completions) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await c.completions(req, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest, request: Request) -> Any:
        return await c.chat(req, request)


class _Completions:
    """POST /v1/completions and /v1/chat/completions: requests checked, encoded off the event loop, their rows
    submitted to the batcher and answered whole or streamed."""

    def __init__(self, engine: Engine, batcher: Batcher, max_tokens: int) -> None:
        self.engine, self.batcher, self.max_tokens = engine, batcher, max_tokens

    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: give 1 to {MAX_PROMPTS} prompts", "prompt")
        if len(prompts) * req.n > MAX_CHOICES:
            raise ApiError(400, f"n: prompts times n must be at most {MAX_CHOICES}", "n")
        s = replace(self.sampling(req, req.max_tokens or 16), logprobs=req.logprobs)
        jobs = await self.prepare(prompts, req.model, s, req.n)
        return await self.respond(jobs, req, request, "text_completion", "cmpl")

    async def chat(self, req: ChatRequest, request: Request) -> Any:
        engine, max_tokens = self.engine, self.max_tokens
        wanted = req.max_completion_tokens or req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs: set logprobs to true to use it", "top_logprobs")
        s = self.sampling(req, wanted or 1)
        if req.logprobs:
            s = replace(s, logprobs=req.top_logprobs or 0)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            if sum(len(m["content"]) for m in messages) > MAX_CHARS_PER_TOKEN * engine.context:
                raise ApiError(
                    400, f"the messages are longer than the model's context of {engine.context} tokens"
                )
            prompt = await asyncio.to_thread(engine.chat_prompt, messages)
        except FedpeftError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # the template's own checks (e.g. roles out of order)
            raise ApiError(400, f"messages: {str(e).splitlines()[0]}", "messages") from None
        if wanted is None:  # as OpenAI: up to what the context leaves (within the server's limit)
            used = len(await asyncio.to_thread(engine.encode, prompt))
            s = replace(s, max_tokens=max(1, min(max_tokens, engine.context - used)))
        return await self.respond(
            await self.prepare([prompt], req.model, s, req.n), req, request, "chat.completion", "chatcmpl"
        )

    def sampling(self, req: _Common, wanted: int) -> Sampling:
        if req.model not in self.engine.names:
            raise ApiError(
                404,
                f"the model {req.model!r} does not exist here; GET /v1/models lists them",
                "model",
                "model_not_found",
            )
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ApiError(
                400, f"stop: at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters", "stop"
            )
        if wanted > self.max_tokens:
            raise ApiError(
                400,
                f"max_tokens {wanted} exceeds this server's limit of {self.max_tokens} (--max-tokens)",
                "max_tokens",
            )
        return Sampling(wanted, req.temperature, req.top_p, tuple(stops), req.seed)

    async def prepare(self, prompts: list[str], model: str, s: Sampling, n: int = 1) -> list[Job]:
        """n jobs per prompt, in OpenAI's order of choices; with a seed, choice k draws with seed + k, so the
        choices differ and each is reproducible."""
        engine = self.engine
        jobs = []
        for p in prompts:
            if len(p) > MAX_CHARS_PER_TOKEN * engine.context:  # surely past the context: not worth encoding
                raise ApiError(
                    400, f"the prompt is longer than the model's context of {engine.context} tokens", "prompt"
                )
            ids = await asyncio.to_thread(engine.encode, p)  # off the event loop: other streams go on
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt")
            try:
                engine.check_budget(ids, s.max_tokens)
            except FedpeftError as e:
                raise ApiError(400, str(e), "max_tokens") from None
            for k in range(n):
                seeded = s if s.seed is None else replace(s, seed=(s.seed + k + 2**63) % 2**64 - 2**63)
                jobs.append(Job(ids, model, seeded))
        return jobs

    async def respond(self, jobs: list[Job], req: _Common, request: Request, kind: str, prefix: str) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        for i, j in enumerate(jobs):
            # the count of log-probabilities so far rides along: a stream sends those the text has reached
            j.on_text = lambda delta, finish, i=i, j=j: loop.call_soon_threadsafe(
                events.put_nowait, (i, delta, finish, len(j.logprobs))
            )
        head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        try:
            self.batcher.submit(jobs)
        except Busy as e:
            raise ApiError(503, f"the server is busy: {e}; retry later") from None
        if req.stream:
            return StreamingResponse(
                _stream(jobs, events, head, kind, self.engine.decode), media_type="text/event-stream"
            )
        texts = await _collect(jobs, events, request)
        failed = [j for j in jobs if j.finish == "error"]
        if failed:
            raise ApiError(500, failed[0].error)
        choices = [
            _choice(
                kind,
                i,
                texts[i],
                j.finish,
                logprobs_of(j, j.logprobs, self.engine.decode, chat=kind != "text_completion"),
            )
            for i, j in enumerate(jobs)
        ]
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs[:: req.n])  # each prompt once, as OpenAI counts
        completion_tokens = sum(len(j.ids) for j in jobs)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return {**head, "object": kind, "choices": choices, "usage": usage}


async def _collect(jobs: list[Job], events: asyncio.Queue[Event], request: Request) -> list[str]:
    """Each job's whole text, as its pieces come; a client that goes away cancels its rows of the batch."""
    texts = ["" for _ in jobs]
    try:
        left = len(jobs)
        while left:
            try:
                i, delta, finish, _ = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():  # nobody waits for the answer: stop decoding it
                    break
                continue
            texts[i] += delta
            left -= finish is not None
    finally:
        for j in jobs:
            j.cancelled = j.cancelled or not j.done  # the client went away: stop decoding for it
    return texts


def _choice(kind: str, index: int, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
    if kind == "chat.completion":
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


async def _stream(
    jobs: list[Job],
    events: asyncio.Queue[Event],
    head: dict[str, Any],
    kind: str,
    decode: Callable[[list[int]], str],
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last one per choice with its finish reason, then
    [DONE], as OpenAI streams. A client that goes away cancels its rows of the batch."""
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    sent = [0] * len(jobs)  # log-probabilities sent per choice

    def chunk(i: int, text: str | None, finish: str | None, upto: int = 0) -> str:
        entries = jobs[i].logprobs[sent[i] : max(upto, sent[i])]
        sent[i] += len(entries)
        logprobs = logprobs_of(jobs[i], entries, decode, chat) if entries else None
        if chat:
            delta = (
                {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            )
            choice: dict[str, Any] = {
                "index": i,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice]})}\n\n"

    try:
        if chat:
            for i in range(len(jobs)):
                yield chunk(i, None, None)
        left = len(jobs)
        while left:
            i, delta, finish, upto = await events.get()
            if finish == "error":
                body = {
                    "error": {"message": jobs[i].error, "type": "server_error", "param": None, "code": None}
                }
                yield f"data: {json.dumps(body)}\n\n"
                left -= 1
                continue
            if delta:
                yield chunk(i, delta, None, upto)
            if finish is not None:
                yield chunk(i, "", finish, upto)
                left -= 1
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:
            j.cancelled = j.cancelled or not j.done
