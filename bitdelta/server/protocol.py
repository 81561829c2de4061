"""The OpenAI wire format: request bodies (validated), response bodies, and errors.

Only what the server implements is accepted; a parameter that would change the output but is not
implemented (logprobs, penalties, n > 1, ...) is refused with 400 instead of silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

MAX_STOP_STRINGS = 4
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an invalid Unicode character (a lone surrogate); send valid UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class APIError(Exception):
    """An error the client caused, as OpenAI reports it: {"error": {message, type, param, code}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
             405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}
    RETRY_AFTER_SECONDS = 1  # sent with 429 and 503: the queue drains in about that time

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.RETRY_AFTER_SECONDS)} if self.status in (429, 503) else {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"), "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Unknown fields are tolerated (clients send e.g. `user`); known-but-unsupported ones are checked below.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        extra = self.model_extra or {}
        for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"):
            if extra.get(name):
                raise ValueError(f"{name} is not supported by this server")
        for name in ("presence_penalty", "frequency_penalty"):
            if extra.get(name, 0) not in (0, None):
                raise ValueError(f"{name} is not supported by this server")
        if extra.get("best_of", 1) not in (1, None):
            raise ValueError("best_of is not supported by this server")
        if extra.get("response_format") not in (None, {"type": "text"}):
            raise ValueError("response_format is not supported by this server (only {\"type\": \"text\"})")
        return self


class CompletionRequest(_Sampling):
    prompt: Text | list[StrictInt]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _single_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a batch of prompts
            if len(prompt) != 1:
                raise ValueError("send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
            return prompt
        raise ValueError("a prompt is a string or a non-empty list of token ids (integers)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Text
    content: Text | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in self.content):
                raise ValueError("only text content parts are supported")
            return _encodable("".join(str(part.get("text", "")) for part in self.content))
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AddDelta(BaseModel):
    name: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: Literal["text", "chat"], request_id: str, model: str, text: str, finish_reason: str | None, chunk: bool) -> dict:
    """A whole response, or one streamed chunk of it, in the shape OpenAI clients parse."""
    if kind == "text":
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    elif chunk:
        choice = {"index": 0, "delta": {"content": text} if text or finish_reason is None else {}, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
