"""Re-check a dispatcher rule: the dispatched path against other tile parameters of the same path (CUDA).

    python -m benchmarks.kernels_sweep [--shapes 4096x4096,11008x4096] [--cases 1x1,64x1,1x32,...]
                                       [--shuffle] [--base-quant int8|fp8|int4] [--out benchmarks/results]
    python -m benchmarks.kernels_sweep --shapes 4096x4096 --cases 64x1 --launch-only   # the workload for ncu

A case is the rows each delta slot has: `64x1` is 64 rows of 64 distinct deltas, `1x32` one delta
shared by 32 rows, `7x9+1x1` seven deltas of 9 rows and one of 1 row, `1x256+63x1` a prefill chunk
beside 63 decode rows. Per shape and case: the floor, cuBLAS's base product, the public entry point
("dispatched") and, on the path the dispatcher chose (docs/kernels.md), every variant of its tile
parameters (tile rows, BLOCK_N, BLOCK_K, warps, pipeline stages, transposed product, K split),
each checked against the reference first and graph-timed side by side in one process
(`benchmarks/harness.py`). A step the entry point splits in two is timed whole only: sweep each
side as its own case. With --base-quant the base is held quantized (`bitdelta.quant`), read as stored by
every variant, and "base" is the entry point with every row on the base. Writes kernels_sweep.json and
kernels_sweep.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import torch
import triton

from benchmarks.harness import (Choice, Problem, SlotPlan, build_plan, dispatched_choice, measure_ceilings,
                                parse_counts, parse_shapes, precompile, run_choice, slot_ids_for, split_threshold, tiles_of,
                                time_checked)
from benchmarks.report import write_report
from bitdelta.quant import RECIPES

SHAPES = "4096x4096,11008x4096"
# one row (GEMV); one delta at 16 and 64 rows (MERGED_TILES); all-distinct 16 and 64 rows (BITMMA,
# one-row tiles); 4 deltas x 16 rows (BITMMA, taller tiles); one delta x 512 prefill rows (MERGED_GEMM)
CASES = "1x1,1x16,1x64,16x1,64x1,4x16,1x512"

# tile parameters of each path, as fields of its tiles (bitdelta.kernels.paths); combinations that the tiles
# reject (shared memory, layout constraints) are skipped
GEMV_TILES = [dict(block_n=bn, block_k=256 * warps, num_warps=warps, num_stages=stages)
              for bn, warps, stages in itertools.product((4, 8, 16), (2, 4), (1, 3))]
MERGED_TILES = [dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, transposed=swap, split_k=split)
                for (bn, bk, warps, stages), swap, split in itertools.product(
                    ((32, 128, 2, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3)),
                    (False, True), (1, 2, 4))]
ONE_ROW_BITMMA_TILES = [dict(block_n=bn, block_k=bk, num_warps=4, num_stages=stages)
                        for bn, bk, stages in ((128, 1024, 2), (128, 1024, 3), (256, 512, 3), (128, 512, 4), (64, 1024, 3),
                                               (256, 1024, 2))]
BITMMA_TILES = {8: ((256, 512, 4, 3), (128, 256, 4, 4), (128, 512, 4, 3), (64, 512, 4, 4), (256, 512, 8, 3)),
                16: ((256, 512, 4, 3), (128, 512, 4, 3), (256, 256, 8, 3)),
                32: ((128, 256, 4, 3), (256, 256, 8, 3), (256, 512, 8, 2)),
                64: ((128, 256, 4, 2), (256, 256, 8, 2), (128, 256, 8, 3))}  # tile rows: (BN, BK, warps, stages)
DOT_TILES = [dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
             for bn, bk, warps, stages in ((64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 8, 3))]
MERGE_KERNEL_TILES = [dict(block_n=bn, block_k=bk, num_warps=warps)
                      for bn, bk, warps in ((32, 256, 4), (16, 512, 4), (64, 128, 4), (32, 512, 4))]


def _name(choice: Choice) -> str:
    tiles = choice.tiles
    extra = (" T" if getattr(tiles, "transposed", False) else "") + (f" k/{tiles.split_k}" if getattr(tiles, "split_k", 1) > 1 else "")
    rows = f"r{tiles.rows} " if hasattr(tiles, "rows") else ""
    stages = f" s{tiles.num_stages}" if hasattr(tiles, "num_stages") else ""
    return f"{rows}{tiles.block_n}x{tiles.block_k} w{tiles.num_warps}{stages}{extra}"


def variants(auto: Choice, max_rows: int) -> dict[str, Choice]:
    """The dispatched path with every other valid tiling (`auto`'s own excluded)."""
    path = auto.path.name
    if path == "GEMV":
        changes = GEMV_TILES
    elif path == "MERGED_TILES":
        changes = MERGED_TILES
    elif path == "BITMMA" and auto.tiles.rows == 1:
        changes = ONE_ROW_BITMMA_TILES
    elif path == "BITMMA":  # tiles of 8..64 rows: every height up to the largest slot's
        changes = [dict(rows=rows, block_n=bn, block_k=bk, num_warps=w, num_stages=s)
                   for rows, tiles in BITMMA_TILES.items() if rows // 2 < max_rows for bn, bk, w, s in tiles]
    elif path == "DOT":
        changes = DOT_TILES
    elif path == "MERGED_GEMM":
        changes = MERGE_KERNEL_TILES
    else:
        changes = []
    out = {}
    for change in changes:
        if change.get("split_k", 1) > 2 and auto.tiles.rows > 2:  # K in four only pays for the 2-warp tiles of 1-2 rows
            continue
        try:
            choice = Choice(auto.path, dataclasses.replace(auto.tiles, **change))
        except ValueError:  # not a valid tiling of this path (its tiles' __post_init__)
            continue
        if choice != auto:
            out[_name(choice)] = choice
    return out


def configs_for(k: int, n: int, plan: SlotPlan, recipe: str | None) -> dict[str, Choice | None]:
    """The entry point ("dispatched": None) and, unless it splits the step, its path's variants."""
    if split_threshold(plan) is not None:
        return {"dispatched": None}
    return {"dispatched": None, **variants(dispatched_choice(n, k, plan, recipe), plan.max_rows)}


def launch_only(shapes, cases, shuffle: bool, recipe: str | None) -> None:
    """Run every variant twice, untimed: `ncu --kernel-name regex:... python -m benchmarks.kernels_sweep ... --launch-only`."""
    for (k, n), case in itertools.product(shapes, cases):
        p = Problem(k, n, parse_counts(case), shuffle, recipe)
        d = p.sets[0]
        for choice in configs_for(k, n, p.plan, recipe).values():
            if choice is not None:
                for _ in range(2):
                    run_choice(choice, d, p.plan)
    torch.cuda.synchronize()


def sweep(shapes, cases, shuffle: bool, recipe: str | None) -> dict:
    started = time.time()
    precompile([(k, n, config, recipe) for (k, n), case in itertools.product(shapes, cases)
                for config in configs_for(k, n, build_plan(slot_ids_for(parse_counts(case), shuffle).cuda()), recipe).values()
                if config is not None])
    ceilings = measure_ceilings()
    bandwidth = ceilings["copy_bandwidth_GBps"] * 1e9
    rows = []
    for (k, n), case in itertools.product(shapes, cases):
        p = Problem(k, n, parse_counts(case), shuffle, recipe)
        split = split_threshold(p.plan) is not None
        auto = None if split else p.dispatched_choice()
        times, errors = time_checked(p, configs_for(k, n, p.plan, recipe))
        timed = {name: t for name, t in times.items() if t == t}
        best = min(timed, key=timed.get) if timed else None
        rows.append({"K": k, "N": n, "case": case, "rows": p.batch, "deltas": p.num_slots, "split": split,
                     "path": "split: each side on its own path" if split else auto.path.name,
                     "dispatched": "-" if split else _name(auto), "tiles": None if split else tiles_of(auto),
                     "floor_us": p.bytes / bandwidth * 1e6, "base_us": p.base_us() if recipe is None else p.base_only_us(),
                     "times_us": times, "errors": errors,
                     "best": best})
        r = rows[-1]
        print(f"{k}x{n} {case:<12} {r['path']:<12} floor {r['floor_us']:7.1f} base {r['base_us']:7.1f} "
              f"dispatched {times['dispatched']:8.1f} best {best} {timed.get(best, float('nan')):8.1f} "
              f"({len(times) - 1} variants)", flush=True)
        del p
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "ceilings": ceilings, "shuffled": shuffle, "base": recipe or "bf16", "rows": rows, "seconds": time.time() - started}


def markdown(result: dict, command: str) -> str:
    lines = [f"# Kernel sweep ({result['device']})", "",
             f"`{command}`. Per shape (K x N) and case (slots x rows a slot): the dispatched path (the public entry point)"
             " against every other tile of the same path, each checked against the reference first; times in microseconds"
             " (median, CUDA graph, cold L2; NaN: failed the check or the build). dispatched / best < 1.03 means the rule"
             " holds here.", "",
             "| shape | case | path | dispatched config | floor | base | dispatched | best variant | best | dispatched / best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t = r["times_us"]
        best = t.get(r["best"], float("nan"))
        lines.append(f"| {r['K']}x{r['N']} | {r['case']} | {r['path']} | {r['dispatched']} | "
                     f"{r['floor_us']:.1f} | {r['base_us']:.1f} | {t['dispatched']:.1f} | {r['best']} | {best:.1f} | "
                     f"{t['dispatched'] / best:.2f} |")
    lines += ["", "Every variant's time is in kernels_sweep.json (`times_us`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="KxN,KxN,... (K = in features)")
    parser.add_argument("--cases", default=CASES, help="slots x rows a slot, comma-separated; '+' joins groups")
    parser.add_argument("--shuffle", action="store_true", help="rows in random order, not grouped by slot")
    parser.add_argument("--launch-only", action="store_true", help="run every variant twice untimed (for a profiler)")
    parser.add_argument("--base-quant", choices=RECIPES, default=None, help="hold the base quantized by this recipe")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    shapes, cases = parse_shapes(args.shapes), args.cases.split(",")
    if args.launch_only:
        launch_only(shapes, cases, args.shuffle, args.base_quant)
        return
    result = sweep(shapes, cases, args.shuffle, args.base_quant)
    command = "python -m benchmarks.kernels_sweep" + (f" --shapes {args.shapes}" if args.shapes != SHAPES else "") + \
        (f" --cases {args.cases}" if args.cases != CASES else "") + (" --shuffle" if args.shuffle else "") + \
        (f" --base-quant {args.base_quant}" if args.base_quant else "")
    result["command"] = command
    write_report(args.out, "kernels_sweep", result, markdown(result, command))


if __name__ == "__main__":
    main()
