"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

Handlers tokenize with the requested fine-tune's own tokenizer and chat template (in a worker
thread: a long prompt must not stall the event loop that serves everyone else), hand the request
to the engine thread, and await its Output events through an asyncio queue. A client that goes
away is noticed within POLL_SECONDS and its request is cancelled, which frees its batch slot and
KV blocks at the next step. Every error, whatever raised it, reaches the client as an OpenAI error
body (guard.py catches what no handler does).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from bitdelta.engine import Engine, InvalidRequestError, Output, QueueFullError, SamplingParams, UnknownModelError
from bitdelta.engine.store import redacted
from bitdelta.errors import BitDeltaError

from .guard import Guard
from .metrics import Metrics
from .protocol import AddDelta, APIError, ChatRequest, CompletionRequest, completion_body, new_id, usage

log = logging.getLogger("bitdelta.server")

POLL_SECONDS = 0.2
DELTA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DEFAULT_MAX_BODY_MB = 4.0
# BitDeltaError subclasses a request can cause, as HTTP statuses; any other one is the server's (500)
STATUS = {UnknownModelError: (404, "model_not_found"), InvalidRequestError: (400, None), QueueFullError: (429, "queue_full")}


@dataclass(frozen=True)
class ServerSettings:
    deltas_dir: Path | None = None  # where POST /v1/deltas may load from (by folder name only)
    api_key: str | None = None  # guards every endpoint but /health
    admin_key: str | None = None  # guards /v1/deltas; defaults to api_key
    max_body_mb: float = DEFAULT_MAX_BODY_MB  # larger request bodies get 413 before they are read


def valid_delta_name(name: str) -> bool:
    return bool(DELTA_NAME.fullmatch(name)) and ".." not in name


def delta_folder(deltas_dir: Path, name: str) -> Path:
    """The folder `name` of the deltas directory, by the one rule both startup and POST /v1/deltas
    apply: a valid name, a directory, and (symlinks resolved) inside the deltas directory. A delta
    kept elsewhere is served only when the operator names its path (`--delta NAME=PATH`)."""
    if not valid_delta_name(name):
        raise BitDeltaError(f"{name!r} is not a valid model name (letters, digits, . _ -; not a path)")
    root = Path(deltas_dir).resolve()
    folder = (root / name).resolve()
    if folder.parent != root:
        raise BitDeltaError(f"{name!r} leads outside the deltas directory (a symlink?); serve it with --delta {name}=PATH")
    if not folder.is_dir():
        raise UnknownModelError(f"the deltas directory has no delta named {name!r}")
    return folder


def create_app(engine: Engine, metrics: Metrics, settings: ServerSettings = ServerSettings()) -> FastAPI:
    app = FastAPI(title="bitdelta", docs_url=None, redoc_url=None, openapi_url=None)

    def bearer(key: str | None):
        def check(request: Request) -> None:
            if key is None:
                return
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

        return Depends(check)

    user = bearer(settings.api_key)
    admin = bearer(settings.admin_key or settings.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        request.state.error = error.message
        if 400 <= error.status < 500:
            metrics.rejected.labels(status=str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    @app.exception_handler(BitDeltaError)
    async def _bitdelta_error(request: Request, error: BitDeltaError) -> JSONResponse:
        status, code = next((v for k, v in STATUS.items() if isinstance(error, k)), (500, None))
        param = "model" if isinstance(error, UnknownModelError) else None
        if isinstance(error, InvalidRequestError) and "context" in str(error):
            code = "context_length_exceeded"
        return await _api_error(request, APIError(status, str(error), param=param, code=code))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:  # 404/405 routes, unreadable bodies, 413
        message = "the body is not valid JSON or not UTF-8" if error.status_code == 400 else str(error.detail)
        return await _api_error(request, APIError(error.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        if isinstance(error.body, dict) and isinstance(error.body.get("model"), str):
            request.state.model = error.body["model"]  # for the access log
        errors = error.errors()
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return await _api_error(request, APIError(400, f"the body is not valid JSON ({reason} at character {first['loc'][-1]})"))
        param = ".".join(str(p) for p in first.get("loc", ())[1:] if isinstance(p, int) or p.isidentifier()) or None
        message = str(first.get("msg", "malformed request body")).removeprefix("Value error, ")
        return await _api_error(request, APIError(400, f"{param}: {message}" if param else message, param=param))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[user])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[user])
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(name) for name in engine.store.names()]}

    @app.post("/v1/completions", dependencies=[user])
    async def completions(body: CompletionRequest, request: Request):
        request.state.model = body.model
        entry = engine.store.get(body.model)
        prompt = body.prompt if isinstance(body.prompt, list) else await run_in_threadpool(_tokenize, entry, body.prompt, "prompt")
        return await _generate("text", body, prompt, body.max_tokens or 16, request)

    @app.post("/v1/chat/completions", dependencies=[user])
    async def chat(body: ChatRequest, request: Request):
        request.state.model = body.model
        prompt = await run_in_threadpool(_chat_prompt, engine.store.get(body.model), body)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(engine.context - len(prompt), 1)
        return await _generate("chat", body, prompt, max_tokens, request)

    def _chat_prompt(entry, body: ChatRequest) -> list[int]:
        if not entry.chat_template:
            raise APIError(400, f"{body.model} has no chat template (nor a base with the same tokenizer and one); use /v1/completions", param="model")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            text = entry.tokenizer.apply_chat_template(messages, chat_template=entry.chat_template, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # the template's own checks (roles, order) raise jinja errors
            raise APIError(400, f"messages do not fit {body.model}'s chat template: {error}", param="messages") from None
        return _tokenize(entry, text, "messages")

    def _tokenize(entry, text: str, param: str) -> list[int]:
        """Token ids of `text`, refusing a text too long for the context before tokenizing it: no
        token covers more than `entry.max_token_chars` characters."""
        at_least = -(-len(text) // entry.max_token_chars)
        if at_least > engine.context:
            raise APIError(400, f"this model's maximum context length is {engine.context} tokens; the prompt has at least {at_least}",
                           param=param, code="context_length_exceeded")
        return entry.tokenizer(text, add_special_tokens=False)["input_ids"]

    @app.post("/v1/deltas", dependencies=[admin])
    async def add_delta(body: AddDelta) -> dict:
        # Only a folder of the served deltas directory, by name: an API caller never names a path.
        if settings.deltas_dir is None:
            raise APIError(400, "the server was started without --deltas; it cannot load deltas at runtime")
        try:
            path = delta_folder(settings.deltas_dir, body.name)
        except UnknownModelError as error:
            raise APIError(404, str(error), param="name", code="delta_not_found") from None
        except BitDeltaError as error:
            raise APIError(400, str(error), param="name") from None
        if body.name in engine.store.names():
            raise APIError(409, f"{body.name!r} is already served; DELETE it first to reload it", param="name")
        try:
            await run_in_threadpool(engine.store.register, body.name, path, True)
        except BitDeltaError as error:
            log.warning("POST /v1/deltas %s refused: %s", body.name, error)
            public = redacted(error, body.name, path, settings.deltas_dir / body.name)
            raise APIError(400, f"delta {body.name!r} refused: {public}", param="name", code="invalid_delta") from None
        return _model_card(body.name)

    @app.delete("/v1/deltas/{name}", dependencies=[admin])
    async def remove_delta(name: str) -> dict:
        if engine.store.get(name).is_base:
            raise APIError(400, "the base model cannot be unloaded", param="name")
        engine.store.unregister(name)  # UnknownModelError (404) if removed concurrently
        return {"id": name, "object": "model", "deleted": True}

    def _model_card(name: str) -> dict:
        entry = engine.store.get(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "bitdelta", "parent": None if entry.is_base else engine.store.get_base().name}

    async def _generate(kind: str, body, prompt: list[int], max_tokens: int, request: Request):
        params = SamplingParams(max_tokens, body.temperature, body.top_p, tuple(body.stop or ()), body.seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Output] = asyncio.Queue()
        request_id = engine.submit(body.model, prompt, params, lambda out: loop.call_soon_threadsafe(events.put_nowait, out))
        response_id = new_id("cmpl" if kind == "text" else "chatcmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(kind, response_id, body.model, request_id, events, request, include_usage), media_type="text/event-stream")
        outputs = [output async for output in _events(request_id, events, request)]
        if not outputs or outputs[-1].finish_reason is None:
            return Response(status_code=499)  # the client has gone (nginx's "client closed request")
        last = outputs[-1]
        request.state.usage = (last.prompt_tokens, last.completion_tokens)
        if last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed")
        response = completion_body(kind, response_id, body.model, "".join(o.text for o in outputs), last.finish_reason, chunk=False)
        return response | {"usage": usage(last.prompt_tokens, last.completion_tokens)}

    async def _events(request_id: int, events: asyncio.Queue, request: Request) -> AsyncIterator[Output]:
        """The request's Outputs until it finishes; cancels it when the client disconnects."""
        finished = False
        loop = asyncio.get_running_loop()
        check_at = loop.time() + POLL_SECONDS
        try:
            while True:
                try:
                    output = await asyncio.wait_for(events.get(), POLL_SECONDS)
                except TimeoutError:
                    output = None
                if loop.time() >= check_at:  # by the clock: tokens may arrive faster than the poll period
                    if await request.is_disconnected():
                        return
                    check_at = loop.time() + POLL_SECONDS
                if output is None:
                    continue
                finished = output.finish_reason is not None
                yield output
                if finished:
                    return
        finally:
            if not finished:
                engine.cancel(request_id)

    async def _stream(kind: str, response_id: str, model: str, request_id: int, events: asyncio.Queue, request: Request, include_usage: bool):
        def sse(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        if kind == "chat":  # OpenAI's first chat chunk carries the role
            first = completion_body(kind, response_id, model, "", None, chunk=True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield sse(first)
        async for output in _events(request_id, events, request):
            if output.finish_reason:
                request.state.usage = (output.prompt_tokens, output.completion_tokens)
            if output.finish_reason == "error":
                request.state.error = output.error
                yield sse(APIError(500, output.error or "generation failed").body())
                break
            if output.text or output.finish_reason:
                yield sse(completion_body(kind, response_id, model, output.text, output.finish_reason, chunk=True))
            if output.finish_reason and include_usage:
                chunk = completion_body(kind, response_id, model, "", None, chunk=True) | {"choices": [], "usage": usage(output.prompt_tokens, output.completion_tokens)}
                yield sse(chunk)
        yield "data: [DONE]\n\n"

    metrics.bind(engine)
    app.add_middleware(Guard, max_body_bytes=int(settings.max_body_mb * 1e6))
    app.state.engine, app.state.started = engine, time.time()
    return app
