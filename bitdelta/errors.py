"""bitdelta's errors: each carries a one-line message naming the problem and the fix.

The CLI catches BitDeltaError once and prints its message; anything else is a bug and keeps its
traceback.
"""


class BitDeltaError(Exception):
    """Base class of every error a user can cause and fix."""


class CheckpointError(BitDeltaError):
    """A model checkpoint is missing, unreadable or cannot be downloaded."""


class IncompatibleModelsError(BitDeltaError):
    """Base and fine-tune (or base and delta) do not belong together."""


class DeltaFormatError(BitDeltaError):
    """A delta directory is corrupted, truncated, or of an unknown format version."""


class OutputExistsError(BitDeltaError):
    """The output path exists and --overwrite was not given."""


class DistillationError(BitDeltaError):
    """Scale distillation could not run or diverged; the delta was left untouched."""


class EvaluationError(BitDeltaError):
    """An evaluation cannot run as asked: unknown task or baseline, no delta and no baseline, bad data."""


# Errors a serving request or admin call can cause; the server maps each to an HTTP status.
class UnknownModelError(BitDeltaError):
    """No base or delta is served under that name (HTTP 404)."""


class InvalidRequestError(BitDeltaError):
    """A parameter is out of range or the prompt does not fit the context (HTTP 400)."""


class QueueFullError(BitDeltaError):
    """The waiting queue is at --max-queue (HTTP 429)."""


class EngineFailedError(BitDeltaError):
    """The engine can serve nothing more (a tensor-parallel rank exited): HTTP 503 until it is restarted."""


class OutputWriteError(BitDeltaError):
    """The output could not be written: the disk is full, a folder is not writable, a file is in the way."""


class UnrelatedModelsError(IncompatibleModelsError):
    """The fine-tune does not look like a fine-tune of the base: unrelated weights, or the two swapped
    (compress's --allow-unrelated-base skips the check)."""


class TargetSelectionError(BitDeltaError):
    """An --include/--exclude glob matches no tensor, or nothing is left to compress."""
