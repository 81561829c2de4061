"""How close can the all-distinct decode batch get, as two passes (cuBLAS's base product, then the
delta kernel)? Per case: the floor, the dispatched path, cuBLAS's base product alone, and two pure
reads of the rows' bits: one in the delta kernel's program structure (program = one row x 128
columns, 1024-bit K steps, best of 2-4 pipeline stages and 4 or 8 warps), one as a balanced stream
(`Problem.read_us` without the base: best of 2-16 programs an SM); base + each read: two passes that
each ran at a pure read's speed. With --waves, v9 alone against the row count around one wave of
programs (5 an SM).

    PYTHONPATH=. python3 benchmarks/kernels_distinct_bounds.py [--out DIR] [--waves]

(H100; KERNEL_NOTES.md round 13)
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.kernels import DECODE_SHAPES, Problem, graph_us, measure_ceilings, write_results
from bitdelta.kernels import sm_count
from bitdelta.kernels.configs import choose_config

BATCHES = [4, 16, 32, 64]
WAVE_ROWS = {(8192, 8192): [8, 10, 11, 12, 16, 20, 21, 22], (11008, 4096): [16, 20, 21, 22, 32, 40, 41, 42, 44]}


@triton.jit
def _read_bits_kernel(signs_ptr, out_ptr, KW, stride_n4, stride_s4, BN: tl.constexpr, BKW: tl.constexpr,
                      STAGES: tl.constexpr):
    """Program (row r, column block c) xors words [c BN, c BN + BN) x [0, KW) of delta r, BKW a step
    (strides in 16-byte units, so the loads are 16-byte vectors)."""
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.arange(0, BKW)
    base = (signs_ptr + tl.program_id(0).to(tl.int64) * stride_s4 * 4 + rows[:, None].to(tl.int64) * stride_n4 * 4
            + cols[None, :])
    acc = tl.zeros([BN, BKW], tl.int32)
    for k0 in tl.range(0, KW, BKW, num_stages=STAGES):
        acc ^= tl.load(base + k0, mask=(k0 + cols < KW)[None, :], other=0)
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(acc, 1), 0))


def read_bits_us(p: Problem) -> float:
    """The best pure read of p's bits in the delta kernel's program structure."""
    assert p.sets[0]["signs"].stride(1) % 4 == 0, "rows of whole 16-byte vectors (every decode shape's K % 128 == 0)"
    out = torch.empty(p.batch * triton.cdiv(p.n, 128), dtype=torch.int32, device="cuda")
    best = float("inf")
    for stages in (2, 3, 4):
        for warps in (4, 8):
            calls = [lambda d=d: _read_bits_kernel[(p.batch, triton.cdiv(p.n, 128))](
                d["signs"], out, p.kw, d["signs"].stride(1) // 4, d["signs"].stride(0) // 4, BN=128, BKW=32,
                STAGES=stages, num_warps=warps) for d in p.sets]
            best = min(best, graph_us(calls))
    return best


def v9_alone_us(p: Problem) -> float:
    from bitdelta.kernels.decode_bitmma import bitmma_delta

    v9 = choose_config(p.n, p.plan, k=p.k)  # the dispatched one-row tiles (every row its own delta)
    for d in p.sets:
        d["ws"] = torch.zeros(p.batch, p.n, device="cuda")
        d["y"] = torch.empty(p.batch, p.n, device="cuda", dtype=d["x"].dtype)
    return graph_us([lambda d=d: bitmma_delta(d["x"], d["ws"], None, d["signs"], d["scales"], p.plan, v9, d["y"])
                     for d in p.sets])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--waves", action="store_true")
    args = parser.parse_args()
    bandwidth = measure_ceilings()["copy_bandwidth_GBps"] * 1e9
    rows = []
    print("| KxN | rows | floor | ours | base | read bits | stream bits | base + read | base + stream | (base + read) "
          "/ floor | (base + stream) / floor | ours / (base + read) |")
    print("|---" * 12 + "|")
    for k, n in DECODE_SHAPES:
        for batch in BATCHES:
            p = Problem(k, n, batch, True)
            floor, ours, base = p.bytes / bandwidth * 1e6, p.ours_us(), p.base_us()
            read, stream = read_bits_us(p), p.read_us(base=False)
            rows.append({"K": k, "N": n, "batch": batch, "floor_us": floor, "ours_us": ours, "base_us": base,
                         "read_bits_us": read, "stream_bits_us": stream})
            print(f"| {k}x{n} | {batch} | {floor:.1f} | {ours:.1f} | {base:.1f} | {read:.1f} | {stream:.1f} | "
                  f"{base + read:.1f} | {base + stream:.1f} | {(base + read) / floor:.2f} | "
                  f"{(base + stream) / floor:.2f} | {ours / (base + read):.2f} |", flush=True)
            del p
    waves = []
    if args.waves:
        sms = sm_count(torch.cuda.current_device())
        print("\n| KxN | rows | v9 programs / (5 x SMs) | v9 alone | bits floor |\n|---|---|---|---|---|")
        for (k, n), counts in WAVE_ROWS.items():
            for batch in counts:
                p = Problem(k, n, batch, True)
                us, bits = v9_alone_us(p), batch * n * p.kw * 4 / bandwidth * 1e6
                waves.append({"K": k, "N": n, "batch": batch, "v9_us": us, "bits_floor_us": bits})
                print(f"| {k}x{n} | {batch} | {batch * triton.cdiv(n, 128) / (5 * sms):.2f} | {us:.1f} | {bits:.1f} |",
                      flush=True)
                del p
    write_results(args.out, "kernels_distinct_bounds.json", {"bounds": rows, "v9_waves": waves})


if __name__ == "__main__":
    main()
