"""The OpenAI-compatible HTTP API (FastAPI) over a Backend: the engine of this process, or Ray
Serve replicas (backend.py). The same code serves both.

Handlers tokenize with the requested fine-tune's own tokenizer and chat template (in a worker
thread: a long prompt must not stall the event loop that serves everyone else), hand the request
to the backend, and read its Output events. A client that goes away is noticed within POLL_SECONDS
and its request is cancelled, which frees its batch slot and KV blocks at the next step. Every
error, whatever raised it, reaches the client as an OpenAI error body (guard.py catches what no
handler does). Request metrics are observed here, from the events, so every backend has them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from bitdelta.engine import EngineFailedError, InvalidRequestError, Output, QueueFullError, SamplingParams, UnknownModelError
from bitdelta.engine.store import redacted
from bitdelta.errors import BitDeltaError

from .backend import Backend, Generation, Unavailable
from .guard import Guard
from .metrics import Metrics
from .protocol import AddDelta, APIError, ChatRequest, CompletionRequest, completion_body, new_id, usage
from .settings import ServerSettings, delta_folder

log = logging.getLogger("bitdelta.server")

POLL_SECONDS = 0.2
# BitDeltaError subclasses a request can cause, as HTTP statuses; any other one is the server's (500)
STATUS = {UnknownModelError: (404, "model_not_found"), InvalidRequestError: (400, None), QueueFullError: (429, "queue_full"),
          Unavailable: (503, "unavailable"), EngineFailedError: (503, "unavailable")}


def create_app(backend: Backend, metrics: Metrics, settings: ServerSettings = ServerSettings()) -> FastAPI:
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
        if not backend.healthy():
            raise APIError(503, "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[user])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[user])
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(name) for name in backend.names()]}

    @app.post("/v1/completions", dependencies=[user])
    async def completions(body: CompletionRequest, request: Request):
        request.state.model = body.model
        entry = backend.get(body.model)
        prompt = body.prompt if isinstance(body.prompt, list) else await run_in_threadpool(_tokenize, entry, body.prompt, "prompt")
        return await _generate("text", body, prompt, body.max_tokens or 16, request)

    @app.post("/v1/chat/completions", dependencies=[user])
    async def chat(body: ChatRequest, request: Request):
        request.state.model = body.model
        prompt = await run_in_threadpool(_chat_prompt, backend.get(body.model), body)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(backend.context - len(prompt), 1)
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
        if at_least > backend.context:
            raise APIError(400, f"this model's maximum context length is {backend.context} tokens; the prompt has at least {at_least}",
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
        if body.name in backend.names():
            raise APIError(409, f"{body.name!r} is already served; DELETE it first to reload it", param="name")
        try:
            await backend.add(body.name, path)
        except BitDeltaError as error:
            log.warning("POST /v1/deltas %s refused: %s", body.name, error)
            public = redacted(error, body.name, path, settings.deltas_dir / body.name)
            raise APIError(400, f"delta {body.name!r} refused: {public}", param="name", code="invalid_delta") from None
        return _model_card(body.name)

    @app.delete("/v1/deltas/{name}", dependencies=[admin])
    async def remove_delta(name: str) -> dict:
        if backend.get(name).is_base:
            raise APIError(400, "the base model cannot be unloaded", param="name")
        await backend.remove(name)  # UnknownModelError (404) if removed concurrently
        return {"id": name, "object": "model", "deleted": True}

    def _model_card(name: str) -> dict:
        base = backend.names()[0]
        return {"id": name, "object": "model", "created": 0, "owned_by": "bitdelta", "parent": None if name == base else base}

    async def _generate(kind: str, body, prompt: list[int], max_tokens: int, request: Request):
        params = SamplingParams(max_tokens, body.temperature, body.top_p, tuple(body.stop or ()), body.seed, body.ignore_eos)
        arrived = time.perf_counter()
        generation = await backend.generate(body.model, prompt, params, stream=bool(body.stream))
        headers = {"x-bitdelta-replica": generation.served_by} if generation.served_by else {}
        response_id = new_id("cmpl" if kind == "text" else "chatcmpl")
        events = _events(generation, body.model, len(prompt), arrived, request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(kind, response_id, body.model, events, request, include_usage), media_type="text/event-stream", headers=headers)
        outputs = [output async for output in events]
        if not outputs or outputs[-1].finish_reason is None:
            return Response(status_code=499)  # the client has gone (nginx's "client closed request")
        last = outputs[-1]
        if last.finish_reason == "error":
            raise APIError(500, last.error or "generation failed")
        response = completion_body(kind, response_id, body.model, "".join(o.text for o in outputs), last.finish_reason, chunk=False)
        return JSONResponse(response | {"usage": usage(last.prompt_tokens, last.completion_tokens)}, headers=headers)

    async def _events(generation: Generation, model: str, prompt_tokens: int, arrived: float, request: Request) -> AsyncIterator[Output]:
        """The request's Outputs until it finishes, observed for the metrics and the access log. The
        events are read by a task of their own, so the client can be checked every POLL_SECONDS
        while none arrives; when it has gone, the request is cancelled (the task and the stream)."""
        events: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for output in generation.outputs:
                    events.put_nowait(output)
            except Exception as error:  # noqa: BLE001 -- handed to the reader, which raises it
                events.put_nowait(error)

        reader = asyncio.create_task(pump())
        loop = asyncio.get_running_loop()
        check_at, last, generated, finished = loop.time() + POLL_SECONDS, arrived, 0, False
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
                if isinstance(output, Exception):
                    raise output
                now = time.perf_counter()
                if output.token_ids:
                    metrics.token(generated == 0, now - last)
                    generated, last = generated + len(output.token_ids), now
                if output.finish_reason is not None:
                    finished = True
                    request.state.usage = (output.prompt_tokens, output.completion_tokens)
                    metrics.request_finished(model, output.finish_reason, output.prompt_tokens, output.completion_tokens)
                    if output.error:
                        request.state.error = output.error
                yield output
                if output.finish_reason is not None:
                    return
        finally:  # finished, or the client went away (this returned, or the response was cancelled)
            reader.cancel()
            if not finished:
                metrics.request_finished(model, "cancelled", prompt_tokens, generated)

    async def _stream(kind: str, response_id: str, model: str, events: AsyncIterator[Output], request: Request, include_usage: bool):
        def sse(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        if kind == "chat":  # OpenAI's first chat chunk carries the role
            first = completion_body(kind, response_id, model, "", None, chunk=True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield sse(first)
        try:
            async for output in events:
                if output.finish_reason == "error":
                    yield sse(APIError(500, output.error or "generation failed").body())
                    break
                if output.text or output.finish_reason:
                    yield sse(completion_body(kind, response_id, model, output.text, output.finish_reason, chunk=True))
                if output.finish_reason and include_usage:
                    chunk = completion_body(kind, response_id, model, "", None, chunk=True) | {"choices": [], "usage": usage(output.prompt_tokens, output.completion_tokens)}
                    yield sse(chunk)
        except BitDeltaError as error:  # the backend failed mid-stream (a replica died): an error event, then the end
            request.state.error = str(error)
            yield sse(APIError(STATUS.get(type(error), (500, None))[0], str(error)).body())
        yield "data: [DONE]\n\n"

    app.add_middleware(Guard, max_body_bytes=int(settings.max_body_mb * 1e6))
    app.state.backend, app.state.started = backend, time.time()
    return app
