"""The `bitdelta` command: each command parses its arguments and calls one function of the API.

Nothing heavy is imported before a command runs: torch, transformers and the pipeline load inside
the command functions, and `eval` and `serve` (whose modules import them at the top) load only when
invoked, so `bitdelta --help`, `bitdelta COMMAND --help` and argument errors answer at once.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from bitdelta.display import column, count, percent, shared_prefix, size
from bitdelta.errors import BitDeltaError

# Commands whose code lives with their subsystem: name -> (module, function, the summary that
# `bitdelta --help` lists without importing the module; a test checks it is the function's own).
LAZY_COMMANDS = {
    "eval": ("bitdelta.eval.cli", "eval_command",
             "Measure how faithfully DELTA (and baselines) reproduce FINETUNED: perplexity, logit MSE, KL, top-1 agreement, lm-eval tasks."),
    "serve": ("bitdelta.server.cli", "serve", "Serve BASE and many 1-bit fine-tunes of it behind an OpenAI-compatible API."),
}


class _Interrupted(Exception):
    """Ctrl-C during a command; typer would otherwise exit 130 without a word."""


class _LazyCommand(TyperCommand):
    """Stands in for a LAZY_COMMANDS entry in `bitdelta --help`; running it builds the real command."""

    def __init__(self, name: str, module: str, function: str, summary: str):
        super().__init__(name, help=summary)
        self.module, self.function = module, function

    def make_context(self, info_name, args, parent=None, **extra) -> typer.Context:
        command = typer.Typer(add_completion=False)
        command.command(self.name)(getattr(importlib.import_module(self.module), self.function))
        return typer.main.get_command(command).make_context(info_name, args, parent=parent, **extra)


class _CommandGroup(TyperGroup):
    def __init__(self, **options):
        super().__init__(**options)
        for name, (module, function, summary) in LAZY_COMMANDS.items():
            self.add_command(_LazyCommand(name, module, function, summary))

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None


app = typer.Typer(cls=_CommandGroup, add_completion=False, no_args_is_help=True,
                  help="Store and serve fine-tunes as 1-bit deltas over a shared base (BitDelta).")

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
# Scale distillation options, shared by `compress --distill` and `distill`.
Data = Annotated[str | None, typer.Option(help="Calibration data: .txt/.jsonl file or dataset id (e.g. allenai/c4:en); default: sampled from the fine-tune (data-free).")]
Steps = Annotated[int, typer.Option(help="Adam steps.")]
Samples = Annotated[int, typer.Option(help="Calibration sequences (a shorter --data file gives all it has, with a warning).")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per step.")]
Loss = Annotated[str, typer.Option(help="mse (logits, the paper) or kl (softened distributions).")]
TopK = Annotated[int, typer.Option(help="Teacher logits kept per position.")]
Heldout = Annotated[int, typer.Option(help="Extra held-out sequences for the before/after report.")]
Device = Annotated[str, typer.Option(help="auto, cuda or cpu.")]
Dtype = Annotated[str, typer.Option(help="auto (the fine-tune's), bfloat16, float16 or float32.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling and batching.")]
BaseQuant = Annotated[str | None, typer.Option("--base-quant", help="Quantize the base's block matrices (linears, MoE experts) first: int8 (per channel), fp8 (e4m3 per channel) or int4 (groups of 128); the delta is taken against, and served over, that quantized base.")]


def _out() -> Console:
    """The console for results, made when printing so that it measures the terminal (or COLUMNS) then."""
    return Console()


def _quiet_transformers() -> None:
    """transformers' warnings and progress bars off: commands report what matters themselves. Through
    the environment, which transformers reads when it is imported (importing it here would cost every
    `--help` a second); directly when it is already loaded (main called in-process)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _notices_on_stderr() -> Iterator[None]:
    """bitdelta's warnings (e.g. fewer calibration samples than asked) as one `warning: ...` line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LevelFormatter())
    logger = logging.getLogger("bitdelta")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@app.command()
def compress(
    base: Annotated[str, typer.Argument(help="Base model: local directory or hub id.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tune of BASE: local directory or hub id.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta directory to write.")],
    scale: Annotated[str, typer.Option(help="Scale granularity: matrix (the paper) or row.")] = "matrix",
    include: Annotated[list[str], typer.Option(help="Glob of tensor names to compress (replaces the automatic choice; repeatable).")] = [],
    exclude: Annotated[list[str], typer.Option(help="Glob of tensor names to keep lossless (repeatable).")] = [],
    max_shard_size: Annotated[float, typer.Option(help="Largest delta shard, in GB.")] = 2.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    allow_unrelated_base: Annotated[bool, typer.Option(
        "--allow-unrelated-base", help="Compress even when FINETUNED does not look like a fine-tune of BASE (unrelated weights, or the two swapped).")] = False,
    distill: Annotated[bool, typer.Option("--distill", help="Then calibrate the scales (see `bitdelta distill`).")] = False,
    data: Data = None, steps: Steps = 200, samples: Samples = 800, seq_len: SeqLen = 128, lr: Lr = 1e-4,
    batch_size: BatchSize = 4, loss: Loss = "mse", topk: TopK = 256, heldout: Heldout = 64,
    device: Device = "auto", dtype: Dtype = "auto", seed: Seed = 0,
    base_quant: BaseQuant = None,
) -> None:
    """Compress FINETUNED into a 1-bit delta over BASE (or over BASE quantized, with --base-quant)."""
    from bitdelta.compress import compress as run
    from bitdelta.distill import DistillConfig
    from bitdelta.fileformat import DeltaReader

    distill_config = DistillConfig(data, samples, seq_len, steps, lr, batch_size, loss, topk=topk, heldout=heldout, device=device, dtype=dtype, seed=seed) if distill else None
    path = run(base, finetuned, output, scale=scale, include=include, exclude=exclude, overwrite=overwrite, max_shard_bytes=int(max_shard_size * 1e9),
               progress=not quiet, distill=distill_config, allow_unrelated_base=allow_unrelated_base, base_quant=base_quant)
    reader = DeltaReader(path, verify=False)
    _out().print(f"wrote {path}: {size(reader.nbytes)} for a {size(reader.config.finetuned_bytes)} fine-tune "
                 f"({reader.config.finetuned_bytes / reader.nbytes:.2f}x smaller)")
    if reader.config.distillation:
        _print_distillation(reader.config.distillation)


@app.command()
def distill(
    base: Annotated[str, typer.Argument(help="The base the delta was made from.")],
    finetuned: Annotated[str, typer.Argument(help="The fine-tune the delta was made from.")],
    delta: Annotated[Path, typer.Argument(help="Delta directory, rewritten in place atomically.")],
    data: Data = None, steps: Steps = 200, samples: Samples = 800, seq_len: SeqLen = 128, lr: Lr = 1e-4,
    batch_size: BatchSize = 4, loss: Loss = "mse", topk: TopK = 256, heldout: Heldout = 64,
    device: Device = "auto", dtype: Dtype = "auto", seed: Seed = 0, quiet: Quiet = False,
) -> None:
    """Calibrate DELTA's scales so base + delta matches FINETUNED's logits (signs stay frozen)."""
    from bitdelta.distill import DistillConfig
    from bitdelta.distill import distill as run

    config = DistillConfig(data, samples, seq_len, steps, lr, batch_size, loss, topk=topk, heldout=heldout, device=device, dtype=dtype, seed=seed)
    _print_distillation(run(base, finetuned, delta, config, progress=not quiet))


def _print_distillation(record: dict) -> None:
    table = Table(title=f"scale distillation: {count(record['steps'], 'step')}, {count(record['samples'], 'sample')} x {count(record['seq_len'], 'token')}, {record['data']}")
    for header in ("held-out", "initial scales", "distilled"):
        table.add_column(header, justify="left" if header == "held-out" else "right")
    before, after = record["heldout_before"], record["heldout_after"]
    for key, label in (("logit_mse", "logit MSE (teacher top-k)"), ("kl", "KL to fine-tune (top-k)"), ("ce", "next-token loss")):
        table.add_row(label, f"{before[key]:.5g}", f"{after[key]:.5g}")
    out = _out()
    out.print(table)
    out.print(f"fine-tune's own next-token loss {record['teacher_heldout_ce']:.5g}; "
              f"{record['seconds']:.1f} s, peak memory {size(record['peak_memory_bytes'])} on {record['device']}")


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="The base the delta was made from.")],
    delta: Annotated[Path, typer.Argument(help="Delta directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write.")],
    dtype: Dtype = "auto",
    max_shard_size: Annotated[float, typer.Option(help="Largest checkpoint shard, in GB.")] = 2.0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write BASE + DELTA as a standard Hugging Face checkpoint."""
    from bitdelta.apply import merge as run

    path = run(base, delta, output, dtype=dtype, overwrite=overwrite, max_shard_bytes=int(max_shard_size * 1e9), progress=not quiet)
    _out().print(f"wrote {path}")


@app.command()
def info(
    delta: Annotated[Path, typer.Argument(help="Delta directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a delta's tensors, shapes, scales, sizes and compression factor."""
    from bitdelta.inspect import summarize

    summary = summarize(delta)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out = _out()
    out.print(_tensor_table(delta, summary))
    quantized = f", quantized {summary['base_quant']['recipe']}: apply and serve with --base-quant {summary['base_quant']['recipe']}" if summary["base_quant"] else ""
    out.print(f"base {summary['base_model']} (fingerprint {summary['base_fingerprint']}{quantized}), fine-tune {summary['finetuned_model']}")
    out.print(f"{count(summary['compressed_count'], 'tensor')} 1-bit, {summary['dense_count']:,} lossless, {summary['removed_count']:,} removed; "
              f"delta {size(summary['delta_bytes'])} vs fine-tune {size(summary['finetuned_bytes'])}: "
              f"compression factor {summary['compression_factor']:.2f}x")
    if summary["distillation"]:
        out.print(f"distilled: {json.dumps(summary['distillation'])}")


def _tensor_table(delta: Path, summary: dict) -> Table:
    """One row per stored tensor, a layer's experts stored alike in one row (`experts.0-7.w1`, shape
    8x...). Names lose the prefix most share ('model.') and '.weight' (the title says so), which
    leaves q/k/v/o rows whole at 80 columns; only longer names (a norm's) may fold."""
    from bitdelta.inspect import fold_lists

    rows = fold_lists(summary["tensors"])
    prefix = shared_prefix(row["name"] for row in rows)
    names = [row["name"].removeprefix(prefix).removesuffix(".weight") for row in rows]
    dropped = " and ".join(f"'{part}'" for part in (prefix, ".weight") if part)
    table = Table(
        column("tensor"), column("shape"), column("stored as"), column("scale", "right"), column("size", "right"),
        title=f"{delta}\n{summary['model_type']}, names without {dropped}; "
              f"1-bit = signs + one scale per {summary['scale_granularity']}, the rest lossless",
        box=box.SIMPLE_HEAD,
    )
    for name, row in zip(names, rows):
        one_bit = row["scale"] is not None
        table.add_row(name, "x".join(map(str, row["shape"])), "1-bit" if one_bit else row["stored_as"].removeprefix("lossless "),
                      f"{row['scale']:.2e}" if one_bit else "", size(row["bytes"]))
    return table


@app.command()
def demo(
    cache_dir: Annotated[Path | None, typer.Option(help="Where the trained demo models are cached.")] = None,
) -> None:
    """Train a small base + fine-tune here, compress, merge, and compare them (no downloads)."""
    from bitdelta.demo import run_demo

    out = _out()
    result = run_demo(cache_dir, log=lambda message: out.print(f"[dim]{message}[/dim]"))
    table = Table(column("model"), column("prose (fine-tune domain)", "right"), column("share of fine-tune's gain kept", "right"),
                  column("code (base domain)", "right"), title="held-out loss (lower is better)")
    base_loss, ft_loss = result.rows[0][1], result.rows[1][1]
    for label, prose, code in result.rows:
        table.add_row(label, f"{prose:.4f}", percent((base_loss - prose) / (base_loss - ft_loss)), f"{code:.4f}")
    out.print(table)
    sizes = Table(column("artifact"), column("bytes", "right"), column("vs fine-tune", "right"), title="sizes")
    reference = result.sizes["fine-tune checkpoint"]
    for name, nbytes in result.sizes.items():
        sizes.add_row(name, f"{nbytes:,}", f"{reference / nbytes:.2f}x smaller" if nbytes < reference else "1x")
    out.print(sizes)
    if result.batch:
        served = Table(column("fine-tune"), column("prompt"), column("greedy answer (engine)"), column("= merged model alone?"),
                       title=f"two fine-tunes served in the same batches ({count(result.batch[0].mixed_steps, 'mixed forward pass', 'mixed forward passes')})")
        for row in result.batch:
            served.add_row(row.model, repr(row.prompt), repr(row.served[:60]), "yes" if row.identical else "NO")
        out.print(served)
    out.print("seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in result.seconds.items()))


def main() -> None:
    """Entry point: one line per user error or Ctrl-C, no traceback; bugs keep theirs."""
    _quiet_transformers()
    with _notices_on_stderr():
        try:
            app()
        except BitDeltaError as error:
            Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except _Interrupted:
            # every output is written under a temporary name and renamed when complete
            Console(stderr=True).print("interrupted; nothing written", highlight=False, soft_wrap=True)
            sys.exit(130)
