"""Programmatic dependent launch (PDL) for the decode kernels, side by side in one run.

In the graph harness of `benchmarks/kernels.py` (R calls back to back on R buffer sets, cold L2) each
call also pays the gap between kernels: the launch, the first loads' latency and the last wave's
tail. Under PDL a kernel may start while its predecessor finishes and waits for it
(`griddepcontrol.wait`) before reading its inputs; pdl 2 also has each program ask L2 for its base
rows before that wait. Per decode shape: the pure read stream of `kernels_read_floor.py` (no PDL,
waiting first, waiting only before its store), cuBLAS at batch 1, and the dispatched path (gemv for
one row, the fused merged pass or gemv for one shared delta) at pdl 0, 1 and 2. Each PDL output is
checked equal to the pdl-0 output, bit for bit.

    PYTHONPATH=. python3 benchmarks/kernels_pdl.py [--shapes KxN,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from benchmarks.kernels import DECODE_SHAPES, Problem, measure_ceilings, parse_shapes, write_results
from benchmarks.kernels_read_floor import stream_us
from bitdelta.kernels.configs import choose_config
from bitdelta.kernels.triton_segments import segment_matmul

SHARED_BATCHES = [1, 4, 16, 32, 64]
PDL_MODES = (0, 1, 2, 3, 4)
STREAM_MODES = (0, 1, 2, 3)


def ours_output(p: Problem, config) -> torch.Tensor:
    d = p.sets[0]
    return segment_matmul(d["x"], d["w"], d["signs"], d["scales"], p.plan, None, config)


def case_row(p: Problem, bandwidth: float, label: str) -> dict:
    config = choose_config(p.n, p.plan, k=p.k)
    reference = ours_output(p, config)
    times, equal = {}, {}
    for mode in PDL_MODES:
        variant = dataclasses.replace(config, pdl=mode)
        equal[mode] = bool(torch.equal(ours_output(p, variant), reference))
        times[f"pdl {mode}"] = p.ours_us(variant)
    return {"K": p.k, "N": p.n, "case": label, "batch": p.batch, "config": str(config),
            "floor_us": p.bytes / bandwidth * 1e6, "times_us": times, "equal_to_pdl0": equal}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="", help="KxN,... (default: the decode suite's shapes)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes) if args.shapes else DECODE_SHAPES
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    print("| KxN | case | floor | " + " | ".join(f"pdl {mode}" for mode in PDL_MODES) + " | best/floor | equal |")
    print("|---" * (len(PDL_MODES) + 5) + "|")
    for k, n in shapes:
        p = Problem(k, n, 1, True)
        stream = {f"stream {m}xSM pdl {mode}": stream_us(p, m * sms, 4, mode) for m in (2, 8) for mode in STREAM_MODES}
        stream["cuBLAS b=1"] = p.base_us()
        floor_us = p.bytes / bandwidth * 1e6
        rows.append({"K": k, "N": n, "case": "read stream", "floor_us": floor_us, "times_us": stream})
        for m in (2, 8):
            t = [stream[f"stream {m}xSM pdl {mode}"] for mode in STREAM_MODES]
            print(f"| {k}x{n} | stream {m}xSM | {floor_us:.1f} | " + " | ".join(f"{x:.1f}" for x in t)
                  + f" | {min(t) / floor_us:.2f} | |", flush=True)
        print(f"| {k}x{n} | cuBLAS b=1 | {floor_us:.1f} | {stream['cuBLAS b=1']:.1f} |" + " |" * (len(PDL_MODES) - 1) + " "
              f"{stream['cuBLAS b=1'] / floor_us:.2f} | |")
        del p
        for batch in SHARED_BATCHES:
            p = Problem(k, n, batch, False)
            row = case_row(p, bandwidth, "shared")
            rows.append(row)
            t = list(row["times_us"].values())
            print(f"| {k}x{n} | shared b={batch} | {row['floor_us']:.1f} | " + " | ".join(f"{x:.1f}" for x in t)
                  + f" | {min(t) / row['floor_us']:.2f} | {all(row['equal_to_pdl0'].values())} |", flush=True)
            del p
        torch.cuda.empty_cache()
    write_results(args.out, "kernels_pdl.json", rows)


if __name__ == "__main__":
    main()
