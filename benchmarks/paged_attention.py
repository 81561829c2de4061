"""Attention of one prefill chunk over the paged KV cache: the row kernel, the tile kernel, and
PyTorch's SDPA over contiguous keys (a flash-attention kernel; what a cache without pages could use).

    python -m benchmarks.paged_attention [--out benchmarks/results]      (CUDA + Triton)

Llama-2-7B attention (32 heads of 128, fp16), 16-token pages scattered through the pool. A chunk of
C rows at positions P..P+C-1 of one sequence (the tokens before it already cached), one layer,
median of triton's do_bench (L2 flushed). TFLOP/s counts 4 * heads * head_dim * (keys each row
sees). Writes paged_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

from benchmarks.report import write_report
from bitdelta.engine.ops.paged_attention import paged_attention, paged_attention_reference, query_split

HERE = Path(__file__).resolve().parent
HEADS, HEAD_DIM, PAGE = 32, 128, 16
CASES = [(256, 0), (256, 1792), (512, 0), (512, 1536), (2048, 0)]  # (chunk rows, cached positions before it)


def case(chunk: int, prefix: int) -> dict:
    length = prefix + chunk
    pages = -(-length // PAGE)
    keys = torch.randn(pages * PAGE, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    tables = torch.randperm(pages, device="cuda", dtype=torch.int32)[None]
    row_sequence = torch.zeros(chunk, dtype=torch.int32, device="cuda")
    row_position = torch.arange(prefix, length, dtype=torch.int32, device="cuda")
    q = torch.randn(chunk, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    scale = 1 / math.sqrt(HEAD_DIM)
    split = query_split(row_sequence.cpu(), row_position.cpu()).to(q.device)
    pool = (tables[0].long()[:, None] * PAGE + torch.arange(PAGE, device="cuda")).flatten()[:length]
    k_seq, v_seq = keys[pool].transpose(0, 1)[None], values[pool].transpose(0, 1)[None]  # [1, H, L, D]
    calls = {
        "row kernel": lambda: paged_attention(q, keys, values, tables, row_sequence, row_position, PAGE, scale),
        "tile kernel": lambda: paged_attention(q, keys, values, tables, row_sequence, row_position, PAGE, scale, split),
        "SDPA, contiguous keys": lambda: F.scaled_dot_product_attention(q.transpose(0, 1)[None], k_seq, v_seq,
                                                                        attn_mask=causal_lower_right(chunk, length), scale=scale),
    }
    expected = paged_attention_reference(q.float(), keys.float(), values.float(), tables, row_sequence, row_position, PAGE, scale)
    errors = {}
    for name in ("row kernel", "tile kernel"):
        errors[name] = ((calls[name]().float() - expected).norm() / expected.norm()).item()
    times = {name: triton.testing.do_bench(call, warmup=10, rep=100, return_mode="median") * 1e3 for name, call in calls.items()}
    flop = 4 * HEADS * HEAD_DIM * sum(prefix + i + 1 for i in range(chunk))
    return {"chunk": chunk, "prefix": prefix, "times_us": times, "tflops": {n: flop / t / 1e6 for n, t in times.items()},
            "errors": errors}


def markdown(result: dict) -> str:
    names = list(result["rows"][0]["times_us"])
    lines = [f"# Paged attention of a prefill chunk ({result['device']})", "",
             f"`python -m benchmarks.paged_attention`: {HEADS} heads of {HEAD_DIM}, fp16, {PAGE}-token pages, one layer; "
             "us (TFLOP/s). SDPA reads the same keys laid out contiguously (no pages).", "",
             "| chunk | cached before | " + " | ".join(names) + " | row / tile |", "|---" * (len(names) + 3) + "|"]
    for row in result["rows"]:
        t, f = row["times_us"], row["tflops"]
        lines.append(f"| {row['chunk']} | {row['prefix']} | " + " | ".join(f"{t[n]:.1f} ({f[n]:.0f})" for n in names)
                     + f" | {t['row kernel'] / t['tile kernel']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for chunk, prefix in CASES:
        result["rows"].append(case(chunk, prefix))
        print(json.dumps(result["rows"][-1]), flush=True)
    write_report(args.out, "paged_attention", result, markdown(result))


if __name__ == "__main__":
    main()
