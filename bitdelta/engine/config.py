"""EngineConfig: the engine's settings (torch-free, so `bitdelta serve --help` needs no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from bitdelta.errors import BitDeltaError


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 64  # sequences in the running batch
    max_gpu_deltas: int = 32  # delta slots in the model (the GPU tier)
    max_cpu_deltas: int = 256  # verified deltas kept in (pinned) CPU memory
    max_queue: int = 1024  # requests waiting to join the batch; more are refused
    # prompt tokens per step, shared by the prefilling sequences. Steps with prefill run eagerly and
    # cost 100-170 ms of launches on a 7B model whatever the chunk up to 2048 tokens (H100,
    # benchmarks/chunked_prefill.py): larger chunks cut time to first token 4.5-8x for about the
    # same pause of the decoders, and reach the merged-weight GEMM's 512 rows a delta (1024 when the
    # rows of more than two deltas must be gathered)
    prefill_chunk: int = 2048
    kv_block_size: int = 16
    kv_blocks: int | None = None  # None: enough for max_batch sequences at full context
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs on a GPU (graphs.py)
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: float32 on a CPU, the base's dtype on a GPU
    tensor_parallel: int = 1  # ranks the model is split over (engine/parallel.py); rank 0 runs this engine
    base_quant: str | None = None  # hold the base's block matrices quantized by this recipe (bitdelta.quant); serves deltas made for it

    def __post_init__(self) -> None:
        if self.base_quant is not None and self.base_quant not in ("int8", "fp8", "int4"):
            raise BitDeltaError(f"unknown base quantization {self.base_quant!r}; use int8, fp8 or int4")
        for name in ("max_batch", "max_gpu_deltas", "max_cpu_deltas", "max_queue", "prefill_chunk", "kv_block_size", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise BitDeltaError(f"EngineConfig.{name} is {getattr(self, name)}; it must be at least 1")
