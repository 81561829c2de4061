"""`bitdelta eval`: a typer command function, registered in bitdelta/cli.py as

    app.command("eval")(eval_command)

It parses options, calls bitdelta.eval.evaluate, prints a table and writes --output as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from bitdelta.display import column, name_column, percent
from bitdelta.errors import EvaluationError
from bitdelta.eval import SPECS


def eval_command(
    base: Annotated[str, typer.Argument(help="Base model: local directory or hub id.")],
    finetuned: Annotated[str, typer.Option("--finetuned", help="The fine-tune the delta was made from (the reference).")],
    delta: Annotated[Path | None, typer.Option("--delta", help="Delta directory to evaluate.")] = None,
    data: Annotated[str | None, typer.Option("--data", help="Held-out text: .txt/.jsonl file or dataset id (e.g. wikitext:wikitext-2-raw-v1); default: sampled from the fine-tune.")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated lm-eval tasks (names or task YAML files), e.g. truthfulqa_mc2,gsm8k.")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Write all results to this JSON file.")] = None,
    baseline: Annotated[list[str], typer.Option("--baseline", help=f"Also evaluate a baseline (repeatable): {SPECS}.")] = [],
    include_path: Annotated[Path | None, typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.")] = None,
    windows: Annotated[int, typer.Option(help="Held-out windows.")] = 32,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass (also lm-eval's batch size).")] = 8,
    limit: Annotated[float | None, typer.Option(help="lm-eval: at most this many examples per task (or a fraction).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="lm-eval: few-shot examples (default: each task's own).")] = None,
    device: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (the fine-tune's), bfloat16, float16 or float32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for window sampling and lm-eval.")] = 0,
    base_quant: Annotated[str | None, typer.Option("--base-quant", help="Also score BASE quantized by this recipe (int8, fp8, int4); --delta must be compressed with the same --base-quant.")] = None,
) -> None:
    """Measure how faithfully DELTA (and baselines) reproduce FINETUNED: perplexity, logit MSE, KL, top-1 agreement, lm-eval tasks."""
    from bitdelta.eval import evaluate

    if output is not None and not output.parent.is_dir():  # found now, not after the models ran
        raise EvaluationError(f"--output {output}: no folder {output.parent}; create it or choose another path")
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    err = Console(stderr=True)
    result = evaluate(
        base, finetuned, delta, data=data, tasks=task_list, baselines=baseline, include_path=include_path, windows=windows,
        seq_len=seq_len, batch_size=batch_size, limit=int(limit) if limit is not None and limit >= 1 else limit,
        num_fewshot=num_fewshot, device=device, dtype=dtype, seed=seed, base_quant=base_quant, log=lambda line: err.print(line, highlight=False),
    )
    console = Console()
    for table in results_tables(result):
        console.print(table)
    if output is not None:
        output.write_text(json.dumps(result, indent=2))
        Console().print(f"wrote {output}")


def results_tables(result: dict) -> list[Table]:
    """The fidelity table, then (with --tasks) the lm-eval table: one row per model in each. Model
    names and numbers stay whole; the long `task/metric` headers fold, so both read at 80 columns."""
    rows = result["rows"]
    fidelity = {"bits/weight": [f"{row['bits_per_weight']:.3g}" if "bits_per_weight" in row else "" for row in rows],
                "ppl": [f"{row['ppl']:.4g}" for row in rows],
                "gain kept": ["" if row["gain_kept"]["loss"] is None else percent(row["gain_kept"]["loss"]) for row in rows],
                "logit MSE": [f"{row['logit_mse']:.4g}" for row in rows],
                "KL": [f"{row['kl']:.4g}" for row in rows],
                "top-1": [f"{row['top1']:.3f}" for row in rows]}
    title = f"fidelity to {result['finetuned']} on {result['windows']} x {result['seq_len']} tokens ({result['data']})"
    tables = [_table(title, [row["model"] for row in rows], fidelity)]
    metrics = sorted({(task, metric) for row in rows for task, values in row.get("tasks", {}).items() for metric in values})
    if metrics:
        tasks = {f"{task}/{metric}": [f"{row['tasks'][task][metric]:.4g}" for row in rows] for task, metric in metrics}
        tables.append(_table("lm-eval tasks", [row["model"] for row in rows], tasks))
    return tables


def _table(title: str, models: list[str], columns: dict[str, list[str]]) -> Table:
    table = Table(name_column("model", models), *(column(header, "right", cells) for header, cells in columns.items()),
                  title=title, box=box.SIMPLE_HEAD)
    for model, *cells in zip(models, *columns.values()):
        table.add_row(model, *cells)
    return table
