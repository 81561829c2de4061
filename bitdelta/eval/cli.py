"""`bitdelta eval`: a typer command function, registered in bitdelta/cli.py as

    app.command("eval")(eval_command)

It parses options, calls bitdelta.eval.evaluate, prints a table and writes --output as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bitdelta.eval.baselines import SPECS


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
) -> None:
    """Measure how faithfully DELTA (and baselines) reproduce FINETUNED: perplexity, logit MSE, KL, top-1 agreement, lm-eval tasks."""
    from bitdelta.eval import evaluate

    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    err = Console(stderr=True)
    result = evaluate(
        base, finetuned, delta, data=data, tasks=task_list, baselines=baseline, include_path=include_path, windows=windows,
        seq_len=seq_len, batch_size=batch_size, limit=int(limit) if limit is not None and limit >= 1 else limit,
        num_fewshot=num_fewshot, device=device, dtype=dtype, seed=seed, log=lambda line: err.print(line, highlight=False),
    )
    Console().print(results_table(result))
    if output is not None:
        output.write_text(json.dumps(result, indent=2))
        Console().print(f"wrote {output}")


def results_table(result: dict) -> Table:
    table = Table(title=f"fidelity to {result['finetuned']} on {result['windows']} x {result['seq_len']} tokens ({result['data']})")
    task_columns = sorted({f"{task}/{metric}" for row in result["rows"] for task, m in row.get("tasks", {}).items() for metric in m})
    for column in ("model", "bits/weight", "ppl", "gain kept", "logit MSE", "KL", "top-1", *task_columns):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in result["rows"]:
        gain = row["gain_kept"]["loss"]
        tasks = [f"{row['tasks'][c.split('/')[0]][c.split('/')[1]]:.4g}" for c in task_columns]
        bits = f"{row['bits_per_weight']:.3g}" if "bits_per_weight" in row else ""
        table.add_row(row["model"], bits, f"{row['ppl']:.4g}", "" if gain is None else f"{gain:.1%}", f"{row['logit_mse']:.4g}",
                      f"{row['kl']:.4g}", f"{row['top1']:.3f}", *tasks)
    return table
