"""Fidelity evaluation of a delta against its fine-tune (`bitdelta eval`): metrics on held-out
text, lm-eval tasks, and baselines (low-rank SVD, k-bit RTN, BitDelta over an INT8 base)."""

from bitdelta.errors import EvaluationError
from bitdelta.eval.fidelity import evaluate

__all__ = ["EvaluationError", "evaluate"]
