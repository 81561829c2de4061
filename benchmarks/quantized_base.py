"""Decode over a quantized base: the multi-tenant delta matmul over an int8 / fp8 / int4 base against the bf16 base (CUDA).

    python -m benchmarks.quantized_base [--formats bf16,int8,fp8,int4] [--batches 1,4,16,32,64] [--shapes 4096x4096,...]
                                        [--out benchmarks/results]
    python -m benchmarks.quantized_base --product-tiles [--formats int8,fp8,int4] [--batches 1,16,32,64]

For the Llama-2-7B/70B linear shapes at each batch, with every row its own delta and with one
delta shared, and for each base format: our entry point with the deltas, base only (every row on
the base: cuBLAS over bf16, the stored product over a quantized one), a pure read of the base's bytes alone, the
byte floor of the case (its base in its own format, each distinct delta's bits once, x and y) and
a kernel that only reads the same weight bytes. All formats of a case are measured side by side in
one run, so the ratios to the bf16 base hold. Writes quantized_base.json and quantized_base.md to
--out. Timing: `benchmarks/harness.py` (CUDA graphs over rotating buffer sets, cold L2).

--product-tiles re-checks the stored product's tile rule (`base_product_triton.product_tiles`, base
only over a quantized base): per shape, format and batch, the dispatched tiles against other column
widths, K steps, warps, stages, K splits and the transposed product, and over int8/fp8 up to 64 rows the
Gluon product (`base_product_gluon`, not dispatched), each checked against the reference first. Writes
quantized_base_product_tiles.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import triton

from benchmarks.harness import (DECODE_SHAPES, DTYPE, MAX_RELATIVE_ERROR, MIN_GRAPH_CALLS, Problem, graph_us, measure_ceilings,
                                parse_shapes, sm_count, time_checked)
from benchmarks.report import write_report
from bitdelta.kernels.base_product import FORMS, ROW_SCALED, ProductTiles, product_tiles, stored
from bitdelta.kernels.base_product_gluon import MAX_COLS
from bitdelta.kernels.base_product_triton import stored_product
from bitdelta.kernels.paths.problem import next_pow2

BASE_ONLY_GOAL = 0.6  # int8/fp8 base-only decode time over the bf16 base's
FLOOR_GOAL = 1.3  # every multi-tenant case over a pure read of its bytes
# the stored product's decode tiles re-checked by --product-tiles: (block_n, block_k, warps, stages), each with K
# split in SPLITS, and transposed where block_n fills a wgmma (64)
PRODUCT_TILES = ((16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4), (64, 256, 8, 3), (64, 128, 4, 3),
                 (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3))
SPLITS = (1, 2, 4)
# the Gluon product (`base_product_gluon`, int8/fp8, up to 64 rows): (block_n, block_k, warps), 16+ base rows a warp
GLUON_PRODUCT_TILES = ((64, 32, 4), (128, 32, 8), (128, 32, 4), (64, 64, 4), (32, 64, 2))


def measure_case(k: int, n: int, batch: int, distinct: bool, recipe: str | None, bandwidth: float, base_only: dict) -> dict:
    """One case's row; `base_only` holds the base-only times already measured in this run (every row on the
    base: the same call whether the deltas are distinct or shared), by (K, N, batch, base)."""
    p = Problem.decode(k, n, batch, distinct, recipe=recipe)
    key = (k, n, batch, recipe)
    if key not in base_only:
        base_only[key] = p.base_only_us(), p.read_us(deltas=False)
    row = {"K": k, "N": n, "batch": batch, "deltas": "distinct" if distinct else "shared", "base": recipe or "bf16",
           "path": p.dispatched_choice().path.name, "error": p.relative_error(), "floor_us": p.bytes / bandwidth * 1e6,
           "ours_us": p.ours_us(), "base_only_us": base_only[key][0], "base_read_us": base_only[key][1], "read_us": p.read_us()}
    row["ours_over_read"] = row["ours_us"] / row["read_us"]
    if recipe is not None:  # every path that could serve the case: what the quantized bases' dispatch is checked against
        row["paths_us"] = time_checked(p, p.candidate_choices())[0]
    del p
    torch.cuda.empty_cache()
    return row


def suite(shapes: list[tuple[int, int]], formats: list[str], batches: list[int], bandwidth: float) -> list[dict]:
    rows, base_only = [], {}
    for k, n in shapes:
        for distinct in (True, False):
            for batch in batches:
                case = [measure_case(k, n, batch, distinct, None if f == "bf16" else f, bandwidth, base_only) for f in formats]
                bf16 = next((r for r in case if r["base"] == "bf16"), None)
                for r in case:
                    if bf16 is not None:
                        r["ours_over_bf16"] = r["ours_us"] / bf16["ours_us"]
                        r["base_only_over_bf16"] = r["base_only_us"] / bf16["base_only_us"]
                        r["base_read_over_bf16"] = r["base_read_us"] / bf16["base_only_us"]
                    print(_fmt(r), flush=True)
                rows += case
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['K']:>5}x{r['N']:<5} {r['deltas']:>8} b={r['batch']:<3} {r['base']:>4} {r['path']:<12} "
            f"ours={r['ours_us']:7.1f} base-only={r['base_only_us']:7.1f} read={r['read_us']:7.1f} "
            f"ours/read={r['ours_over_read']:5.2f} ours/bf16={r.get('ours_over_bf16', float('nan')):5.2f} "
            f"base-only/bf16={r.get('base_only_over_bf16', float('nan')):5.2f} err={r['error']:.1e}")


def goals(rows: list[dict]) -> dict:
    formats = {r["base"] for r in rows}
    out = {}
    for recipe in sorted(formats - {"bf16"}):
        mine = [r for r in rows if r["base"] == recipe]
        base_only = [r for r in mine if r["deltas"] == "distinct" and "base_only_over_bf16" in r]
        out[recipe] = {
            f"base-only decode within {BASE_ONLY_GOAL}x of bf16": f"{sum(r['base_only_over_bf16'] <= BASE_ONLY_GOAL for r in base_only)}/{len(base_only)}",
            "max base-only/bf16": max((r["base_only_over_bf16"] for r in base_only), default=None),
            # the goal is out of reach where a pure read of the quantized base's bytes already takes longer
            f"cases where a pure read of the base is within {BASE_ONLY_GOAL}x of bf16":
                f"{sum(r['base_read_over_bf16'] <= BASE_ONLY_GOAL for r in base_only)}/{len(base_only)}",
            f"multi-tenant within {FLOOR_GOAL}x of a pure read": f"{sum(r['ours_over_read'] <= FLOOR_GOAL for r in mine)}/{len(mine)}",
            "max ours/read": max(r["ours_over_read"] for r in mine),
            f"multi-tenant within {FLOOR_GOAL}x of a pure read on the case's fastest path":
                f"{sum(_fastest_us(r) <= FLOOR_GOAL * r['read_us'] for r in mine)}/{len(mine)}",
            "median ours/bf16 ours": statistics.median(r["ours_over_bf16"] for r in mine) if "bf16" in formats else None,
        }
    return out


def _fastest_us(row: dict) -> float:
    """The case's time on its fastest path: ours or any path timed beside it (NaN where a path failed its check)."""
    return min(t for t in (row["ours_us"], *row.get("paths_us", {}).values()) if t == t)


def markdown(result: dict) -> str:
    lines = [f"# Decode over a quantized base ({result['device']})", "",
             "`python -m benchmarks.quantized_base`. Shapes K x N; times in microseconds (median, CUDA graph, cold L2);"
             " every format of a case measured side by side. ours: the entry point with the case's deltas; base only:"
             " every row on the base; read: a kernel that only reads the case's weight bytes in that format (the"
             " floor as measured); base read: the same over the base's bytes alone (the floor of base only); floor:"
             " the case's bytes over the copy bandwidth "
             f"({result['ceilings']['copy_bandwidth_GBps']:.0f} GB/s). /bf16: over the same case on the bf16 base. each"
             " path: over a quantized base, every decode path a plain base's rules allow for the case, on the tiles"
             " they give it (what the quantized bases' own rules are checked against).", "",
             "| shape | deltas | batch | base | path | ours | base only | base read | read | floor | ours/read | ours/bf16 |"
             " base only/bf16 | base read/bf16 | each path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['deltas']} | {r['batch']} | {r['base']} | {r['path']} | {r['ours_us']:.1f} | "
                     f"{r['base_only_us']:.1f} | {r['base_read_us']:.1f} | {r['read_us']:.1f} | {r['floor_us']:.1f} | "
                     f"{r['ours_over_read']:.2f} | {r.get('ours_over_bf16', float('nan')):.2f} | "
                     f"{r.get('base_only_over_bf16', float('nan')):.2f} | {r.get('base_read_over_bf16', float('nan')):.2f} | "
                     + " · ".join(f"{path} {us:.1f}" for path, us in r.get("paths_us", {}).items()) + " |")
    lines += ["", "## Goals (issue 23)", ""]
    for recipe, goal in result["goals"].items():
        lines.append(f"- {recipe}: " + "; ".join(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}"
                                                 for key, value in goal.items()))
    return "\n".join(lines) + "\n"


def product_tile_sweep(shapes: list[tuple[int, int]], formats: list[str], batches: list[int]) -> list[dict]:
    rows = []
    for k, n in shapes:
        for recipe in formats:
            for batch in batches:
                p = Problem.decode(k, n, batch, False, recipe=recipe)  # base only: one slot's bits are enough
                ref = p.sets[0]["x"].float() @ p.sets[0]["w"].dequantize().t()
                dispatched = product_tiles(batch, n, sm_count(torch.cuda.current_device()), FORMS[recipe])
                block_m = max(16, next_pow2(batch))
                variants = ({dispatched} | {ProductTiles(block_m, *tiles, False, split) for tiles in PRODUCT_TILES for split in SPLITS}
                            | {ProductTiles(block_m, *tiles, True) for tiles in PRODUCT_TILES if tiles[0] >= 64})
                if FORMS[recipe] == ROW_SCALED and batch <= MAX_COLS:
                    variants |= {ProductTiles(max(8, next_pow2(batch)), bn, bk, warps, 1, False, split, gluon=True)
                                 for bn, bk, warps in GLUON_PRODUCT_TILES for split in SPLITS}
                times = {}
                for tiles in variants:
                    name = (f"{tiles.block_n}x{tiles.block_k} w{tiles.num_warps} s{tiles.num_stages}{' T' if tiles.transposed else ''}"
                            f"{f' k{tiles.split_k}' if tiles.split_k > 1 else ''}{' gluon' if tiles.gluon else ''}")
                    try:
                        out = stored_product(p.sets[0]["x"], stored(p.sets[0]["w"]), None, DTYPE, tiles).float()
                        ok = (out - ref).norm() / ref.norm() < MAX_RELATIVE_ERROR
                        times[name] = graph_us([lambda d=d, t=tiles: stored_product(d["x"], stored(d["w"]), None, DTYPE, t)
                                                for d in p.base_sets], MIN_GRAPH_CALLS) if ok else float("nan")
                    except Exception as error:  # a tiling the GPU cannot launch (shared memory): reported, not fatal
                        print(f"{name}: {type(error).__name__}: {error}"[:200], flush=True)
                        times[name] = float("nan")
                    if tiles == dispatched:
                        dispatched_name = name
                best_us, best = min(((t, name) for name, t in times.items() if t == t), default=(float("nan"), None))
                rows.append({"K": k, "N": n, "base": recipe, "batch": batch, "dispatched": dispatched_name, "best": best,
                             "dispatched_us": times[dispatched_name], "best_us": best_us, "times_us": times})
                print(f"{k}x{n} {recipe} b={batch}: dispatched {dispatched_name} {times[dispatched_name]:.1f} best {best} "
                      f"{best_us:.1f}", flush=True)
                del p
                torch.cuda.empty_cache()
    return rows


def product_tiles_markdown(result: dict) -> str:
    ratios = [r["dispatched_us"] / r["best_us"] for r in result["rows"]]
    timed = [ratio for ratio in ratios if ratio == ratio]  # NaN where a tiling failed its check or its launch
    lines = [f"# The stored product's tiles over a quantized base ({result['device']})", "",
             "`python -m benchmarks.quantized_base --product-tiles`. Base only (every row on the base), shapes K x N, times"
             " in microseconds (median, CUDA graph, cold L2): the tiles `product_tiles` dispatches among"
             f" up to {max(len(r['times_us']) for r in result['rows'])} tilings (block_n x block_k, warps, stages, T: transposed, kS: K split in S),"
             " each checked against the"
             f" reference first. Dispatched / best: mean {statistics.mean(timed):.3f}, max {max(timed):.2f} over the"
             f" {len(timed)} of {len(ratios)} cases where both ran.", "",
             "| shape | base | batch | dispatched | us | best | us | dispatched / best |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['K']}x{r['N']} | {r['base']} | {r['batch']} | {r['dispatched']} | {r['dispatched_us']:.1f} | "
                     f"{r['best']} | {r['best_us']:.1f} | {r['dispatched_us'] / r['best_us']:.2f} |")
    return "\n".join(lines + ["", "Every variant's time is in quantized_base_product_tiles.json (`times_us`).", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default="bf16,int8,fp8,int4")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in DECODE_SHAPES),
                        help="K x N shapes; the engine stacks gate/up: 4096x22016 (7B), 8192x57344 (70B)")
    parser.add_argument("--batches", default="1,4,16,32,64")
    parser.add_argument("--product-tiles", action="store_true", help="re-check the stored product's tile rule instead")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.manual_seed(int(time.time()))
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "dtype": str(DTYPE), "shape_convention": "K x N (in x out features)"}
    formats = args.formats.split(",")
    if args.product_tiles:
        result["rows"] = product_tile_sweep(parse_shapes(args.shapes), [f for f in formats if f != "bf16"],
                                            [int(b) for b in args.batches.split(",")])
        result["seconds"] = time.time() - started
        write_report(args.out, "quantized_base_product_tiles", result, product_tiles_markdown(result))
        return
    result["ceilings"] = measure_ceilings()
    result["decode"] = suite(parse_shapes(args.shapes), formats, [int(b) for b in args.batches.split(",")],
                             result["ceilings"]["copy_bandwidth_GBps"] * 1e9)
    result["goals"] = goals(result["decode"])
    result["seconds"] = time.time() - started
    write_report(args.out, "quantized_base", result, markdown(result))


if __name__ == "__main__":
    main()
