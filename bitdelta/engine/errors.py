"""Errors a request or an admin call can cause; the server maps each to an HTTP status."""

from bitdelta.errors import BitDeltaError


class UnknownModelError(BitDeltaError):
    """No base or delta is served under that name (HTTP 404)."""


class InvalidRequestError(BitDeltaError):
    """A parameter is out of range or the prompt does not fit the context (HTTP 400)."""


class QueueFullError(BitDeltaError):
    """The waiting queue is at --max-queue (HTTP 429)."""
