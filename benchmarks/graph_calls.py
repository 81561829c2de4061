"""How many calls a timed graph needs (CUDA): one call's time in graphs of 1..16 calls over 1..8 buffer sets.

    python -m benchmarks.graph_calls [--out benchmarks/results]

`benchmarks/harness.py` times every kernel as a CUDA graph replayed under triton.testing.do_bench,
which flushes L2 before each replay; a replay also has a fixed cost, which a graph of few calls
carries in each call. Here the same call (the base product alone, over an int8 base and over bf16,
at 1 and 64 rows: ten to fifty microseconds) runs in graphs of growing length over distinct sets of x
and base weights (the longest visits each of 8 sets twice, seven others' bytes in between).
Per-call times that stop falling by MIN_GRAPH_CALLS calls say the harness's graphs are long enough;
the fixed cost is read as the one-call graph's time less the longest graph's. Writes graph_calls.json and .md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import triton

from benchmarks.harness import DTYPE, MIN_GRAPH_CALLS, base_call_bytes, graph_us, rotation_count
from benchmarks.report import write_report
from bitdelta.kernels.base_product import base_product
from bitdelta.quant import quantize

CASES = [(4096, 11008, 1, "int8"), (4096, 11008, 64, "int8"), (4096, 4096, 1, "int8"), (4096, 11008, 64, None)]
GRAPHS = [(1, 1), (2, 2), (3, 3), (8, 8), (8, 16)]  # (buffer sets, calls a graph): a set recurs after seven others


def measure(k: int, n: int, rows: int, recipe: str | None) -> dict:
    sets = []
    for _ in range(max(count for count, _ in GRAPHS)):
        w = (torch.randn(n, k, device="cuda") * 0.02).to(DTYPE)
        x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
        sets.append({"x": x, "w": w if recipe is None else quantize(w, recipe)})
    times = [graph_us([lambda d=d: base_product(d["x"], d["w"], DTYPE) for d in sets[:count]], calls)
             for count, calls in GRAPHS]
    return {"K": k, "N": n, "rows": rows, "base": recipe or "bf16",
            "harness_sets": rotation_count(base_call_bytes(n, k, rows, recipe)),
            "times_us": {f"{count} sets x {calls} calls": us for (count, calls), us in zip(GRAPHS, times)},
            "fixed_cost_us": times[0] - times[-1]}


def markdown(result: dict) -> str:
    names = list(result["rows"][0]["times_us"])
    lines = [f"# Calls a timed graph needs ({result['device']})", "",
             "`python -m benchmarks.graph_calls`. The base product alone (x @ W.T; W int8 or bf16), one call's"
             " median microseconds in a CUDA graph of the given calls cycling the given buffer sets (do_bench, L2 flushed"
             f" before each replay). The harness runs at least {MIN_GRAPH_CALLS} calls a graph over its rotation"
             " (harness sets: what it would use here). fixed cost: one call alone less the longest graph's call.", "",
             "| shape | rows | base | harness sets | " + " | ".join(names) + " | fixed cost |",
             "|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in result["rows"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['rows']} | {r['base']} | {r['harness_sets']} | "
                     + " | ".join(f"{r['times_us'][name]:.1f}" for name in names) + f" | {r['fixed_cost_us']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": [measure(*case) for case in CASES]}
    result["seconds"] = time.time() - started
    write_report(args.out, "graph_calls", result, markdown(result))


if __name__ == "__main__":
    main()
