"""The ASGI layer between uvicorn and the app that every request passes: a body-size limit, a
last-resort error handler (both answering in the OpenAI error shape) and the access log.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses pass through untouched. A
body over the limit is refused with 413 before it is read whole: by its Content-Length when it
declares one, else as soon as the chunks received pass the limit. An exception no handler took
becomes a JSON 500 (when the response has not started) instead of Starlette re-raising it to
uvicorn, which answers in plain text and drops the keep-alive connection. Each request is logged
once it is answered (logger "bitdelta.access": method, path, status, the model, prompt+completion
tokens, seconds, and the error message of a refusal), from what the handlers leave in the
request's state (`request.state.model`, `.usage`, `.error`); health and metrics probes at DEBUG.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.exceptions import HTTPException

from .protocol import APIError

log = logging.getLogger("bitdelta.server")
access_log = logging.getLogger("bitdelta.access")
QUIET_PATHS = ("/health", "/metrics")  # probed every few seconds: logged at DEBUG


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a chunked body passes the limit. An HTTPException, because
    FastAPI turns any other error while reading the body into a 400; the app's handler for
    HTTPException answers it."""


class Guard:
    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, state = time.perf_counter(), None, scope.setdefault("state", {})

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send, lambda: status is not None)
        finally:
            _log_access(scope, status, state, time.perf_counter() - start)

    async def _guarded(self, scope, receive, send, started) -> None:
        message = f"the request body is over {self.max_body_bytes / 1e6:g} MB (the server's --max-body-mb); send a shorter prompt"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            scope["state"]["error"] = message
            return await _send_error(send, APIError(413, message, code="request_too_large"))
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(413, message)
            return event

        try:
            await self.app(scope, limited_receive, send)
        except Exception:  # noqa: BLE001 -- the last resort: log it, answer in JSON, keep the connection
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started():
                await _send_error(send, APIError(500, "internal server error; the server log has details"))


def _log_access(scope, status: int | None, state: dict, seconds: float) -> None:
    client = scope.get("client") or ("-", 0)
    line = f'{client[0]}:{client[1]} - "{scope["method"]} {scope["path"]} HTTP/{scope["http_version"]}" {status or "-"}'
    if "model" in state:
        line += f" model={state['model']}"
    if "usage" in state:
        line += " tokens={}+{}".format(*state["usage"])
    line += f" {seconds:.3f}s"
    if "error" in state:
        line += f" error={state['error']!r}"
    level = logging.WARNING if status is None or status >= 500 else logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
    access_log.log(level, line)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
