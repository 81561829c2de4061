"""The tensor pipe's rate for the two integer mmas a one-row delta kernel can use: int8 m16n8k32
(v9: four weights a register after expansion) and 1-bit m16n8k256 with AND + POPC (v11, round 13:
the packed words as they lie in memory). Each thread chains the mma on its own registers; 16-64
warps an SM hide the latency. Also checks the 1-bit mma's fragment layout (PTX ISA) on one warp.

    PYTHONPATH=. python3 benchmarks/kernels_mma_rate.py [--out DIR]

(H100; KERNEL_NOTES.md round 13)
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.kernels import write_results
from bitdelta.kernels import sm_count

OPERANDS = "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};"
IMMA = tl.constexpr("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 " + OPERANDS)
BMMA = tl.constexpr("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc " + OPERANDS)
ITERATIONS = 4096


@triton.jit
def _mma_chain_kernel(out_ptr, iterations, ASM: tl.constexpr):
    offs = tl.arange(0, 128) + tl.program_id(0) * 128
    a0, a1, a2, a3 = offs * 7 + 1, offs * 13 + 5, offs ^ 0x5555, offs * 3
    b0, b1 = offs + 11, offs * 5 + 2
    c0 = offs * 0
    c1, c2, c3 = c0, c0, c0
    for _ in range(iterations):
        c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                                   [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        b0 = b0 + 1
    tl.store(out_ptr + offs, c0 + c1 + c2 + c3)


@triton.jit
def _one_bmma_kernel(a_ptr, b_ptr, d_ptr):
    lane = tl.arange(0, 32)
    a0, a1 = tl.load(a_ptr + lane * 4), tl.load(a_ptr + lane * 4 + 1)
    a2, a3 = tl.load(a_ptr + lane * 4 + 2), tl.load(a_ptr + lane * 4 + 3)
    b0, b1 = tl.load(b_ptr + lane * 2), tl.load(b_ptr + lane * 2 + 1)
    zero = lane * 0
    d0, d1, d2, d3 = tl.inline_asm_elementwise(BMMA, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                               [a0, a1, a2, a3, b0, b1, zero, zero, zero, zero],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    tl.store(d_ptr + lane * 4, d0)
    tl.store(d_ptr + lane * 4 + 1, d1)
    tl.store(d_ptr + lane * 4 + 2, d2)
    tl.store(d_ptr + lane * 4 + 3, d3)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    value = (bits * (1 << torch.arange(32))).sum(-1)  # bit i = element i
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def bmma_layout_matches() -> bool:
    """D = popc(A_row & B_col) for a random 16 x 256 A and 256 x 8 B placed in the PTX fragments:
    lane 4g + t holds A rows g, g + 8 of k 32t.. and 128 + 32t.., B column g of the same k, D rows g,
    g + 8 of columns 2t, 2t + 1."""
    a = torch.randint(0, 2, (16, 256))
    b = torch.randint(0, 2, (256, 8))
    a_frag, b_frag, want = torch.empty(32, 4, dtype=torch.int32), torch.empty(32, 2, dtype=torch.int32), a @ b
    expected = torch.empty(32, 4, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i, (row, k0) in enumerate([(g, 32 * t), (g + 8, 32 * t), (g, 128 + 32 * t), (g + 8, 128 + 32 * t)]):
            a_frag[lane, i] = _pack(a[row, k0:k0 + 32])
        b_frag[lane, 0], b_frag[lane, 1] = _pack(b[32 * t:32 * t + 32, g]), _pack(b[128 + 32 * t:160 + 32 * t, g])
        expected[lane] = torch.stack([want[g, 2 * t], want[g, 2 * t + 1], want[g + 8, 2 * t], want[g + 8, 2 * t + 1]])
    d = torch.empty(32, 4, dtype=torch.int32, device="cuda")
    _one_bmma_kernel[(1,)](a_frag.cuda(), b_frag.cuda(), d, num_warps=1)
    return torch.equal(d.cpu().long(), expected)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sms = sm_count(torch.cuda.current_device())
    rows = []
    print("| mma | warps an SM | mma/s (T) | int ops/s (T) | mma an SM and us |\n|---|---|---|---|---|")
    for name, asm, macs in (("int8 m16n8k32", IMMA, 16 * 8 * 32), ("1-bit m16n8k256 and.popc", BMMA, 16 * 8 * 256)):
        for blocks_per_sm in (4, 8, 16):
            grid = sms * blocks_per_sm
            out = torch.empty(grid * 128, dtype=torch.int32, device="cuda")
            ms = triton.testing.do_bench(lambda: _mma_chain_kernel[(grid,)](out, ITERATIONS, ASM=asm, num_warps=4),
                                         warmup=5, rep=50)
            rate = grid * 4 * ITERATIONS / (ms * 1e-3)
            rows.append({"mma": name, "warps_per_sm": 4 * blocks_per_sm, "mma_per_s": rate})
            print(f"| {name} | {4 * blocks_per_sm} | {rate / 1e12:.3f} | {rate * macs * 2 / 1e12:.0f} | "
                  f"{rate / sms / 1e6:.0f} |")
    layout = bmma_layout_matches()
    print(f"1-bit mma fragment layout as the PTX ISA gives it: {layout}")
    write_results(args.out, "kernels_mma_rate.json", {"rates": rows, "bmma_layout_matches": layout})


if __name__ == "__main__":
    main()
