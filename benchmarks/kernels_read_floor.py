"""How close can one launch get to the floor? Per decode shape, in the graph harness of
`benchmarks/kernels.py` (cold L2, R buffer sets): a kernel that only streams the bytes of a batch-1
call (the base weight and one delta's bits, summed so the loads stay) at several grid sizes,
cuBLAS's batch-1 product, and the dispatched batch-1 path, against the floor.

    PYTHONPATH=. python3 benchmarks/kernels_read_floor.py [--out DIR]     (H100; KERNEL_NOTES.md round 8)
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.kernels import DECODE_SHAPES, Problem, graph_us, measure_ceilings, write_results

BLOCK = 4096  # int32 words a program reads per step: 16 KB


@triton.jit
def _stream_kernel(a_ptr, a_words, b_ptr, b_words, out_ptr, BLOCK: tl.constexpr):
    """Program p sums words p*BLOCK, (p + P)*BLOCK, ... of a then b (P programs): a pure read stream."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(tl.program_id(0) * BLOCK, a_words, tl.num_programs(0) * BLOCK):
        acc += tl.load(a_ptr + start + offs, mask=start + offs < a_words, other=0)
    for start in range(tl.program_id(0) * BLOCK, b_words, tl.num_programs(0) * BLOCK):
        acc += tl.load(b_ptr + start + offs, mask=start + offs < b_words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def stream_us(p: Problem, programs: int, warps: int) -> float:
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    def call(d):
        a = d["w"].view(torch.int32).reshape(-1)
        b = d["signs"][0].reshape(-1)
        _stream_kernel[(programs,)](a, a.numel(), b, b.numel(), out, BLOCK=BLOCK, num_warps=warps)

    return graph_us([lambda d=d: call(d) for d in p.sets])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grids = {f"stream {m}xSM w{w}": (m * sms, w) for m, w in ((1, 8), (2, 8), (4, 4), (8, 4), (16, 4))}
    rows = []
    print("| KxN | floor | " + " | ".join(grids) + " | cuBLAS b=1 | ours b=1 | best stream / floor |")
    print("|---" * (len(grids) + 5) + "|")
    for k, n in DECODE_SHAPES:
        p = Problem(k, n, 1, True)
        floor_us = p.bytes / bandwidth * 1e6
        times = {name: stream_us(p, programs, warps) for name, (programs, warps) in grids.items()}
        times["cuBLAS b=1"] = p.base_us()
        times["ours b=1"] = p.ours_us()
        best = min(times[name] for name in grids)
        rows.append({"K": k, "N": n, "floor_us": floor_us, "times_us": times})
        print(f"| {k}x{n} | {floor_us:.1f} | " + " | ".join(f"{t:.1f}" for t in times.values())
              + f" | {best / floor_us:.2f} |", flush=True)
        del p
        torch.cuda.empty_cache()
    write_results(args.out, "kernels_read_floor.json", rows)


if __name__ == "__main__":
    main()
