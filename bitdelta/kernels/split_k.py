"""Split-K's arrival counters (host side; the kernels' half is `split_k_triton.py`).

A kernel that cuts K over programs has each write an fp32 partial; the last program of an output
tile to arrive (counted on one int32 counter per tile) adds the partials in split order, so the
result does not depend on timing, and sets its counter back to zero.
"""

from __future__ import annotations

import torch

_split_counters: dict[torch.device, torch.Tensor] = {}
_retired_counters: list[torch.Tensor] = []


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 arrival counters of the split-K programs on `device`. Each launch
    leaves them at zero again, so one buffer serves every call and every split-K kernel: no memset a
    call. Calls on one stream (the engine's, and graph replays of it) take turns; two streams must not
    run split-K calls at once (a counter left off zero would spoil every later call that uses it).
    Grown only outside CUDA-graph capture (the engine's eager pass before each capture allocates it);
    a buffer that is outgrown is kept, since graphs captured earlier and kernels still queued hold its
    address."""
    counters = _split_counters.get(device)
    if counters is None or counters.numel() < count:
        if device.type == "cuda":
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    raise RuntimeError("split-K counters must be allocated before CUDA-graph capture: "
                                       "run the call once eagerly first")
        if counters is not None:
            _retired_counters.append(counters)
        counters = _split_counters[device] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return counters


def split_buffers(out: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partials [splits, M, N] and the arrival counters of a launch over `grid` (axis 2: the
    split) that writes `out` [M, N]; `out` for both where K is not split (the kernel reads neither)."""
    splits = grid[2]
    if splits == 1:
        return out, out
    m, n = out.shape
    return (torch.empty(splits, m, n, dtype=torch.float32, device=out.device),
            split_counters(out.device, grid[0] * grid[1]))
