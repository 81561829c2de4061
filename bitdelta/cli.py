"""The `bitdelta` command: each command parses its arguments and calls one function of the API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bitdelta.errors import BitDeltaError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Store and serve fine-tunes as 1-bit deltas over a shared base (BitDelta).")
out = Console()

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
# Scale distillation options, shared by `compress --distill` and `distill`.
Data = Annotated[str | None, typer.Option(help="Calibration data: .txt/.jsonl file or dataset id (e.g. allenai/c4:en); default: sampled from the fine-tune (data-free).")]
Steps = Annotated[int, typer.Option(help="Adam steps.")]
Samples = Annotated[int, typer.Option(help="Calibration sequences.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
Lr = Annotated[float, typer.Option(help="Adam learning rate.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per step.")]
Loss = Annotated[str, typer.Option(help="mse (logits, the paper) or kl (softened distributions).")]
TopK = Annotated[int, typer.Option(help="Teacher logits kept per position.")]
Heldout = Annotated[int, typer.Option(help="Extra held-out sequences for the before/after report.")]
Device = Annotated[str, typer.Option(help="auto, cuda or cpu.")]
Dtype = Annotated[str, typer.Option(help="auto (the fine-tune's), bfloat16, float16 or float32.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling and batching.")]


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


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
    distill: Annotated[bool, typer.Option("--distill", help="Then calibrate the scales (see `bitdelta distill`).")] = False,
    data: Data = None, steps: Steps = 200, samples: Samples = 800, seq_len: SeqLen = 128, lr: Lr = 1e-4,
    batch_size: BatchSize = 4, loss: Loss = "mse", topk: TopK = 256, heldout: Heldout = 64,
    device: Device = "auto", dtype: Dtype = "auto", seed: Seed = 0,
) -> None:
    """Compress FINETUNED into a 1-bit delta over BASE."""
    from bitdelta.compress import compress as run
    from bitdelta.distill import DistillConfig
    from bitdelta.fileformat import DeltaReader

    distill_config = DistillConfig(data, samples, seq_len, steps, lr, batch_size, loss, topk=topk, heldout=heldout, device=device, dtype=dtype, seed=seed) if distill else None
    path = run(base, finetuned, output, scale=scale, include=include, exclude=exclude, overwrite=overwrite,
               max_shard_bytes=int(max_shard_size * 1e9), progress=not quiet, distill=distill_config)
    reader = DeltaReader(path, verify=False)
    out.print(f"wrote {path}: {_gb(reader.nbytes)} for a {_gb(reader.config.finetuned_bytes)} fine-tune "
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
    table = Table(title=f"scale distillation: {record['steps']} steps, {record['samples']} x {record['seq_len']} tokens, {record['data']}")
    for column in ("held-out", "initial scales", "distilled"):
        table.add_column(column, justify="left" if column == "held-out" else "right")
    before, after = record["heldout_before"], record["heldout_after"]
    for key, label in (("logit_mse", "logit MSE (teacher top-k)"), ("kl", "KL to fine-tune (top-k)"), ("ce", "next-token loss")):
        table.add_row(label, f"{before[key]:.5g}", f"{after[key]:.5g}")
    out.print(table)
    out.print(f"fine-tune's own next-token loss {record['teacher_heldout_ce']:.5g}; "
              f"{record['seconds']:.1f} s, peak memory {_gb(record['peak_memory_bytes'])} on {record['device']}")


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
    out.print(f"wrote {path}")


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
    table = Table(title=f"{delta}  ({summary['model_type']}, scales per {summary['scale_granularity']})")
    for column in ("tensor", "shape", "stored as", "scale", "bytes"):
        table.add_column(column, justify="right" if column in ("scale", "bytes") else "left")
    for row in summary["tensors"]:
        scale = "" if row["scale"] is None else f"{row['scale']:.3e}"
        table.add_row(row["name"], "x".join(map(str, row["shape"])), row["stored_as"], scale, f"{row['bytes']:,}")
    out.print(table)
    out.print(f"base {summary['base_model']} (fingerprint {summary['base_fingerprint']}), fine-tune {summary['finetuned_model']}")
    out.print(f"{summary['compressed_count']} tensors 1-bit, {summary['dense_count']} lossless, {summary['removed_count']} removed; "
              f"delta {_gb(summary['delta_bytes'])} vs fine-tune {_gb(summary['finetuned_bytes'])}: "
              f"compression factor {summary['compression_factor']:.2f}x")
    if summary["distillation"]:
        out.print(f"distilled: {json.dumps(summary['distillation'])}")


@app.command()
def demo(
    cache_dir: Annotated[Path | None, typer.Option(help="Where the trained demo models are cached.")] = None,
) -> None:
    """Train a small base + fine-tune here, compress, merge, and compare them (no downloads)."""
    from bitdelta.demo import run_demo

    result = run_demo(cache_dir, log=lambda message: out.print(f"[dim]{message}[/dim]"))
    table = Table(title="held-out loss (lower is better)")
    table.add_column("model")
    table.add_column("prose (fine-tune domain)", justify="right")
    table.add_column("share of fine-tune's gain kept", justify="right")
    table.add_column("code (base domain)", justify="right")
    base_loss, ft_loss = result.rows[0][1], result.rows[1][1]
    for label, prose, code in result.rows:
        table.add_row(label, f"{prose:.4f}", f"{(base_loss - prose) / (base_loss - ft_loss):.1%}", f"{code:.4f}")
    out.print(table)
    sizes = Table(title="sizes")
    sizes.add_column("artifact")
    sizes.add_column("bytes", justify="right")
    sizes.add_column("vs fine-tune", justify="right")
    reference = result.sizes["fine-tune checkpoint"]
    for name, nbytes in result.sizes.items():
        sizes.add_row(name, f"{nbytes:,}", f"{reference / nbytes:.2f}x smaller" if nbytes < reference else "1x")
    out.print(sizes)
    if result.batch:
        served = Table(title=f"two fine-tunes served in the same batches ({result.batch[0].mixed_steps} mixed forward passes)")
        for column in ("fine-tune", "prompt", "greedy answer (engine)", "= merged model alone?"):
            served.add_column(column)
        for row in result.batch:
            served.add_row(row.model, repr(row.prompt), repr(row.served[:60]), "yes" if row.identical else "NO")
        out.print(served)
    out.print("seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in result.seconds.items()))


def _register_extensions() -> None:
    """Commands whose code lives with their subsystem: `eval` (bitdelta/eval), `serve` (bitdelta/server)."""
    from bitdelta.eval.cli import eval_command
    from bitdelta.server.cli import serve

    app.command("eval")(eval_command)
    app.command("serve")(serve)


_register_extensions()


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def main() -> None:
    """Entry point: one line per user error, no traceback; bugs keep theirs."""
    _quiet_transformers()
    try:
        app()
    except BitDeltaError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
        sys.exit(1)
