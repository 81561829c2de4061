"""The evaluation's own user error (a BitDeltaError, so the CLI prints it as one line)."""

from bitdelta.errors import BitDeltaError


class EvaluationError(BitDeltaError):
    """An evaluation cannot run as asked: unknown task or baseline, no delta and no baseline, bad data."""
