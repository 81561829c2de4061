"""What each kind of work costs a replica: step durations interpolated from the GPU results
(e2e.json, chunked_prefill.json), a delta's disk read measured on this machine, its PCIe copy assumed."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GB = 1e9
GiB = 1024**3
H2D_GB_S = 25.0  # assumed pinned host-to-device bandwidth of an H100 host (PCIe Gen5 x16 in practice)
CAPTURE_EAGER_PASSES = 2  # a capture step: the engine's eager warm-up pass plus the capture pass (assumed)


@dataclass(frozen=True)
class Costs:
    """Seconds a replica spends on each kind of work, as lookup tables (index = rows or deltas)."""

    graph_base: tuple[float, ...]  # decode step replayed from a CUDA graph, by batch size (the base's cost)
    graph_delta: tuple[float, ...]  # ... plus this, by distinct deltas in the batch
    eager_base: tuple[float, ...]  # the same, issued eagerly (first step of a new composition)
    eager_delta: tuple[float, ...]
    prefill: tuple[float, ...]  # a step carrying k prompts' chunks, by k, nothing decoding
    mix: float  # added to a prefill step when sequences decode in it
    disk: float  # one delta, disk -> CPU (read + verify)
    h2d: float  # one delta, CPU -> GPU slot
    delta_gib: float

    def decode(self, rows: int, deltas: int, kind: str) -> float:
        if kind == "replay":
            return self.graph_base[rows] + self.graph_delta[deltas]
        eager = self.eager_base[rows] + self.eager_delta[deltas]
        return eager if kind == "eager" else CAPTURE_EAGER_PASSES * eager + self.graph_base[rows] + self.graph_delta[deltas]

    def prefill_step(self, prompts: int, decoding: bool) -> float:
        return self.prefill[min(prompts, len(self.prefill) - 1)] + (self.mix if decoding else 0.0)


def load_costs(results: Path, disk_s: float, rows: int = 64, deltas: int = 64, prompts: int = 2048) -> tuple[Costs, dict]:
    """Costs from e2e.json and chunked_prefill.json in `results`; also the model's description."""
    e2e = json.loads((results / "e2e.json").read_text())
    measured = sorted((r for r in e2e["rows"] if r["label"].isdigit()), key=lambda r: r["n"])
    n = np.array([r["n"] for r in measured], dtype=float)

    def table(system: str, size: int, minus: str | None = None) -> tuple[float, ...]:
        ms = np.array([r[system]["decode_ms_median"] - (r[minus]["decode_ms_median"] if minus else 0.0) for r in measured])
        values = np.interp(np.arange(size + 1), n, ms) / 1e3
        values[0] = 0.0
        return tuple(values.tolist())

    ttft = {r["n"]: r["bitdelta"]["ttft_ms"] for r in measured}
    one_chunk = [k for k in sorted(ttft) if k * e2e["setup"]["prompt"] <= 2048]  # prefilled in one step
    ks = np.arange(prompts + 1, dtype=float)
    pre = np.interp(ks, one_chunk, [ttft[k] for k in one_chunk])
    last = one_chunk[-1]
    pre[ks > last] = ttft[last] * ks[ks > last] / last  # beyond the measured, in proportion to the prompts
    pre[0] = 0.0
    # mixing cost: e2e's TTFT is the median over N requests of 128 tokens, 16 a step; at N = 32 it
    # is T1 + T2/2 and at N = 64 T1 + T2 + T3/2, where T1 = TTFT(16) is a pure 16-prompt step and
    # T2, T3 are 16-prompt steps beside 16 and 32 decoders; chunked_prefill's 2048-token steps
    # carry 1 or 4 prompts beside 31 decoders
    t1 = ttft[last]
    t2 = 2 * (ttft[2 * last] - t1)
    t3 = 2 * (ttft[4 * last] - t1 - t2)
    derived = {"e2e N=32: step 2 - step 1": t2 - t1, "e2e N=64: step 3 - step 1": t3 - t1}
    chunked_path = results / "chunked_prefill.json"
    if chunked_path.is_file():
        for row in json.loads(chunked_path.read_text())["rows"]:
            count = int(row["arrivals"].split("x")[0])
            if row["chunk"] == 2048:
                derived[f"chunked_prefill {row['arrivals']} beside 31 decoders"] = row["step_ms_during_median"] - pre[count]
    mix_ms = float(statistics.mean(derived.values()))
    delta_gib = e2e["delta_gib_each"]
    costs = Costs(
        graph_base=table("base", rows), graph_delta=table("bitdelta", deltas, "base"),
        eager_base=table("base-eager", rows), eager_delta=table("bitdelta-eager", deltas, "base-eager"),
        prefill=tuple((pre / 1e3).tolist()), mix=mix_ms / 1e3, disk=disk_s, h2d=delta_gib * GiB / (H2D_GB_S * GB), delta_gib=delta_gib,
    )
    zipf_row = next((r for r in e2e["rows"] if r["label"] == "zipf"), None)
    model = {
        "source": f"e2e.json ({e2e['device']}, {e2e['setup']['shape']}, {e2e['setup']['dtype']}) and chunked_prefill.json",
        "decode_step": (
            "base(B) + [bitdelta(D) - base(D)] from e2e decode medians (CUDA-graph replay; the '-eager' rows for the first step of "
            "a new composition; a capture step = 2 eager passes + replay, assumed)"
        ),
        "prefill_step": f"prefill(k prompts) from e2e TTFT at N <= {last} (one step), + {mix_ms:.0f} ms when sequences decode in the step",
        "prefill_ms": {int(k): round(float(pre[k]), 1) for k in one_chunk},
        "mix_ms": round(mix_ms, 1),
        "mix_ms_derivations": {k: round(float(v), 1) for k, v in derived.items()},
        "delta_gib": delta_gib,
        "h2d_ms": round(costs.h2d * 1e3, 1),
        "h2d_assumption": f"{delta_gib:.3f} GiB at {H2D_GB_S:.0f} GB/s pinned host-to-device (assumed, not measured here)",
        "disk_s": disk_s,
    }
    if zipf_row is not None:
        model["check_e2e_zipf_row"] = {
            "rows": zipf_row["n"], "distinct": zipf_row["distinct"], "measured_ms": round(zipf_row["bitdelta"]["decode_ms_median"], 1),
            "model_ms": round(costs.decode(zipf_row["n"], zipf_row["distinct"], "replay") * 1e3, 1),
        }
    return costs, model


def measure_disk_load(fraction: float = 1.0, repeats: int = 3) -> dict:
    """Seconds to read and verify a Llama-2-7B-shaped delta (1-bit block linears, per-row scales)
    as the engine's loader does (DeltaReader with checksums, then every matrix's signs and scales),
    with the file's pages dropped from the page cache first (posix_fadvise; a VM's host may still
    cache them) and again with them cached. `fraction` < 1 writes that share of the layers and
    scales the times up (quick runs)."""
    import torch

    from bitdelta.fileformat import DeltaConfig, DeltaReader, write_delta
    from bitdelta.pack import packed_words

    hidden, inner, layers = 4096, 11008, max(1, round(32 * fraction))
    shapes = {}
    for layer in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"model.layers.{layer}.self_attn.{name}.weight"] = [hidden, hidden]
        for name, shape in (("gate_proj", [inner, hidden]), ("up_proj", [inner, hidden]), ("down_proj", [hidden, inner])):
            shapes[f"model.layers.{layer}.mlp.{name}.weight"] = shape

    def tensors():
        generator = torch.Generator().manual_seed(0)
        for name, (n, k) in shapes.items():
            yield name + ".sign", torch.randint(-(2**31), 2**31 - 1, (n, packed_words(k)), dtype=torch.int32, generator=generator)
            yield name + ".scale", torch.rand(n, generator=generator)

    def config(files):
        return DeltaConfig("base", "-", "finetune", "-", "llama", "float16", 0, "row", shapes, {}, [], {}, files)

    def read(path: Path) -> float:
        started = time.perf_counter()
        reader = DeltaReader(path, verify=True)
        for name in reader.config.compressed:
            delta = reader.binary_delta(name)
            delta.signs.contiguous(), delta.row_scales()
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bitdelta-routing-") as folder:
        path = write_delta(Path(folder) / "delta", tensors(), config, [])
        files = [path / f for f in os.listdir(path) if f.endswith(".safetensors")]
        size = sum(f.stat().st_size for f in files)
        cold, warm = [], []
        for _ in range(repeats):
            for file in files:
                descriptor = os.open(file, os.O_RDONLY)
                os.fsync(descriptor)
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(descriptor)
            cold.append(read(path))
            warm.append(read(path))
    scale = 32 / layers
    return {
        "gib": size * scale / GiB, "layers_written": layers, "scaled_by": scale,
        "cold_s": [t * scale for t in cold], "warm_s": [t * scale for t in warm],
        "cold_median_s": statistics.median(cold) * scale, "warm_median_s": statistics.median(warm) * scale,
        "cold_min_s": min(cold) * scale, "warm_min_s": min(warm) * scale,
    }
