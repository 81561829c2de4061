"""Fidelity evaluation of a delta against its fine-tune (`bitdelta eval`): metrics on held-out
text, lm-eval tasks, and baselines (low-rank SVD, k-bit RTN, BitDelta over an INT8, FP8 or INT4 base).

`evaluate` loads on first use (it imports torch), so `bitdelta eval --help` answers at once.
"""

from bitdelta.errors import EvaluationError

# The baselines' command-line spellings (bitdelta.eval.baselines.parse reads them), here so that
# the command's help can show them without importing torch.
SPECS = "bitdelta, bitdelta-row, svd:R, svd:equal, rtn:K (K = 2..8), int8base, fp8base, int4base"

__all__ = ["EvaluationError", "SPECS", "evaluate"]


def __getattr__(name: str):
    if name == "evaluate":
        from bitdelta.eval.fidelity import evaluate

        return evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
