"""Fixtures: tiny models of three families, genuinely trained here (base on code, fine-tune on prose)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

from bitdelta import tiny

torch.set_num_threads(2)

# the loggers `bitdelta serve` configures (server/cli.py logging_config)
SERVER_LOGGERS = ("bitdelta", "uvicorn", "uvicorn.access", "uvicorn.error")


@pytest.fixture(autouse=True)
def _server_logging_restored():
    """A test that runs `bitdelta serve` in-process (CliRunner) configures these loggers onto that
    run's stderr, which is closed after it: later tests' servers would log to a closed stream."""
    import logging

    saved = [(logger, logger.handlers[:], logger.level, logger.propagate) for logger in map(logging.getLogger, SERVER_LOGGERS)]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (base dir, fine-tune dir) for llama (GQA), qwen2 (biases, tied embeddings), gpt_neox (fused QKV)."""
    folder = tmp_path_factory.mktemp("pairs")
    return {family: tiny.make_pair(folder, tiny.TinySpec(family=family)) for family in tiny.FAMILIES}


@pytest.fixture(scope="session")
def llama_pair(pairs) -> tuple[Path, Path]:
    return pairs["llama"]


@pytest.fixture(scope="session")
def llama_delta(llama_pair, tmp_path_factory) -> Path:
    from bitdelta import compress

    return compress(*llama_pair, tmp_path_factory.mktemp("deltas") / "llama", progress=False)


@functools.cache
def served_deltas(base_dir: Path, finetuned_dir: Path, folder: Path) -> dict[str, Path]:
    """Four deltas of the tiny llama base, built once per session (engine, server and Ray tests share them)."""
    from bitdelta.multi_tenant_demo import make_deltas

    return make_deltas(base_dir, finetuned_dir, folder)


@pytest.fixture(scope="module")
def deltas(llama_pair, tmp_path_factory) -> dict[str, Path]:
    return served_deltas(*llama_pair, tmp_path_factory.getbasetemp() / "served-deltas")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run `bitdelta ARGS` in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from bitdelta.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["bitdelta", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, stdout.getvalue(), stderr.getvalue()


def quantize_in_place(model: torch.nn.Module, names, recipe: str) -> torch.nn.Module:
    """`model` with its parameters named in `names` replaced by their quantized values (`recipe`,
    dequantized): the base a delta made with `compress --base-quant` is applied to."""
    from bitdelta.quant import quantize

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in names:
                parameter.copy_(quantize(parameter, recipe).dequantize())
    return model


def within_an_ulp(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Every element of `got` within an ulp of `dtype` of the fp32 `expected` (the spacing at 1, scaled by
    each element's magnitude, floored at 2^-6): what one or two roundings to `dtype` may cost."""
    ulp = torch.finfo(dtype).eps
    return bool(((got.float() - expected).abs() <= ulp * expected.abs().clamp(min=2 ** -6)).all())


def _interpreter_runs() -> bool:
    """Triton's CPU interpreter is installed and can run our kernels: Triton 3.6's interpreter turns a
    loaded scalar (a one-element array) into a loop bound with int(), which NumPy >= 2.4 refuses
    (seen with 2.4.6; 2.3.5 runs)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("numpy") is None:
        return False
    import numpy

    return tuple(int(part) for part in numpy.__version__.split(".")[:2]) < (2, 4)


needs_triton_interpreter = pytest.mark.skipif(not _interpreter_runs(),
                                              reason="needs Triton's CPU interpreter (Triton 3.6 with NumPy < 2.4)")


def run_in_triton_interpreter(code: str) -> str:
    """Run `code` in a fresh Python with TRITON_INTERPRET=1 (set before Triton loads), from the
    repository root; return its stdout (kernels checked on the CPU, without a GPU)."""
    import os
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
