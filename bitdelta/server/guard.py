"""The ASGI layer between uvicorn and the app that no request gets past: a body-size limit and a
last-resort error handler, both answering in the OpenAI error shape.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses pass through untouched. A
body over the limit is refused with 413 before it is read whole: by its Content-Length when it
declares one, else as soon as the chunks received pass the limit. An exception no handler took
becomes a JSON 500 (when the response has not started) instead of Starlette re-raising it to
uvicorn, which answers in plain text and drops the keep-alive connection.
"""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException

from .protocol import APIError

log = logging.getLogger("bitdelta.server")


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
        message = f"the request body is over {self.max_body_bytes / 1e6:g} MB (the server's --max-body-mb); send a shorter prompt"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_error(send, APIError(413, message, code="request_too_large"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(413, message)
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:  # noqa: BLE001 -- the last resort: log it, answer in JSON, keep the connection
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(send, APIError(500, "internal server error; the server log has details"))


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
