"""Tensor parallelism for the engine: the base and every delta sharded Megatron-style over
`torch.distributed` (NCCL on GPUs, gloo on the CPU).

Each rank holds a share of every block linear: q/k/v and gate/up split by output rows (their sign
rows, per-row scales and biases with them), o and down split by input columns (packed sign words
split on 32-column boundaries, scales replicated), with one all-reduce after each row-parallel
product. Attention heads and the KV cache split with q/k/v. Embeddings, norms, lm_head and the
per-slot tables of lossless tensors are replicated, so every rank ends a step with the same logits.

Rank 0 runs the engine (scheduler, delta store, server); `Leader` wraps its model so that each
step's batch, and each delta installed into a slot since the last step, are broadcast first. The
other ranks run `follow`: they read each installed delta from its folder themselves (or receive it,
for a delta given in memory), install their shard, and compute the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bitdelta.errors import IncompatibleModelsError
from bitdelta.pack import BITS_PER_WORD

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW_PARALLEL = ("o_proj", "down_proj")  # split by input columns, all-reduced


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world: int

    @classmethod
    def current(cls, world: int) -> TensorParallel:
        """This process's place in the initialised default process group of `world` ranks."""
        if not dist.is_initialized() or dist.get_world_size() != world:
            raise RuntimeError(f"tensor parallel {world} needs torch.distributed initialised with {world} ranks")
        return cls(dist.get_rank(), world)

    def part(self, size: int) -> slice:
        share = size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)


@dataclass(frozen=True)
class Shard:
    """A linear's share on one rank: output rows (`dim` 0) or input columns (`dim` 1) `part` of a
    matrix of `full_shape`. Full-size delta tensors are cut to it on install."""

    dim: int
    part: slice
    full_shape: tuple[int, int]

    def signs(self, words: torch.Tensor) -> torch.Tensor:
        """[..., N, Kw] packed signs of the full matrix -> this rank's."""
        if self.dim == 0:
            return words[..., self.part, :]
        return words[..., self.part.start // BITS_PER_WORD : self.part.stop // BITS_PER_WORD]

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-output-row tensor [..., N] (scales, a bias) of the full matrix -> this rank's."""
        return tensor[..., self.part] if self.dim == 0 else tensor


def shard_linears(model: nn.Module, tp: TensorParallel) -> None:
    """Cut every nn.Linear of the decoder blocks (weight, bias) to this rank's share, by its role,
    recording the cut as `linear.shard`: done on the CPU, before the model moves to its GPU, which
    need hold only its share."""
    for index, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules(prefix=f"model.layers.{index}"):
            if isinstance(module, nn.Linear):
                _shard(module, name + ".weight", tp)


def _shard(linear: nn.Linear, name: str, tp: TensorParallel) -> None:
    role = name.removesuffix(".weight").rsplit(".", 1)[-1]
    n, k = linear.weight.shape
    if role in COLUMN_PARALLEL:
        if n % tp.world:
            raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: {name} has {n} output rows, not a multiple of {tp.world}")
        shard = Shard(0, tp.part(n), (n, k))
        linear.weight = nn.Parameter(linear.weight.detach()[shard.part].clone(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach()[shard.part].clone(), requires_grad=False)
        linear.out_features = shard.part.stop - shard.part.start
    elif role in ROW_PARALLEL:
        if k % (tp.world * BITS_PER_WORD):
            raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: {name} reads {k} inputs; each rank's share must be a multiple of 32")
        if linear.bias is not None:
            raise IncompatibleModelsError(f"--tensor-parallel: {name} has a bias, which a row-parallel linear does not support yet")
        shard = Shard(1, tp.part(k), (n, k))
        linear.weight = nn.Parameter(linear.weight.detach()[:, shard.part].clone(), requires_grad=False)
        linear.in_features = shard.part.stop - shard.part.start
    else:
        raise IncompatibleModelsError(f"--tensor-parallel: the engine does not know how to split {name}")
    linear.shard = shard


def check_splittable(experts: dict, attn: nn.Module, head_dim: int, tp: TensorParallel) -> None:
    """Refuse, in one line, what the tensor-parallel engine does not split yet."""
    if experts:
        raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: mixture-of-experts models are not split across GPUs yet")
    norm = getattr(attn, "q_norm", None)
    if norm is not None and norm.weight.numel() != head_dim:
        raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: this model normalises whole query/key projections (OLMo 2), "
                                      "which would need the ranks' shares together; not supported yet")


class AllReduced(nn.Module):
    """A row-parallel linear whose partial products are summed over the ranks."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y)
        return y


class Leader:
    """Rank 0's model: every step is broadcast to the other ranks before it runs, with the deltas
    installed since the last step (their folder where they came from one)."""

    active: Leader | None = None  # the process group serves one engine: a second would talk to the first one's ranks

    def __init__(self, model):
        if Leader.active is not None:
            raise IncompatibleModelsError("a tensor-parallel engine is already running in this process; stop it before starting another")
        Leader.active = self
        self.model = model
        self._installs: list[tuple[int, object]] = []

    def install(self, slot: int, weights) -> None:
        self.model.install(slot, weights)
        self._installs.append((slot, weights.source or weights))

    def forward(self, batch, kv) -> torch.Tensor:
        message = [(self._installs, batch)]
        self._installs = []
        dist.broadcast_object_list(message, src=0)
        return self.model.forward(batch, kv)

    def stop(self) -> None:
        dist.broadcast_object_list([None], src=0)
        Leader.active = None

    def __getattr__(self, attribute: str):
        return getattr(self.model, attribute)


def follow(model, kv, read) -> None:
    """A non-zero rank's loop: install and compute what rank 0 broadcasts, until it stops.
    `read(path)` reads a delta's folder into the slot layout."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        installs, batch = message[0]
        for slot, delta in installs:
            model.install(slot, read(delta) if not hasattr(delta, "signs") else delta)
        model.forward(batch, kv)


def check_split(model_config: dict, world: int) -> None:
    """Refuse, in one line and before any rank starts, a model whose heads do not split over `world` ranks."""
    for key in ("num_attention_heads", "num_key_value_heads"):
        count = model_config.get(key)
        if count is not None and count % world:
            raise IncompatibleModelsError(f"--tensor-parallel {world}: the model's {count} {key.removeprefix('num_').replace('_', ' ')} "
                                          f"do not split evenly over {world} ranks; use a divisor of {count}")


def start_ranks(base: str, config) -> list:
    """Start ranks 1..N-1 of a tensor-parallel engine (`config.tensor_parallel` = N) as processes,
    each building its share of the model and following rank 0, and join their process group as
    rank 0 (NCCL on GPUs, gloo on the CPU)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")  # CUDA cannot be shared with forked children
    ranks = [context.Process(target=_follower, args=(rank, port, base, config), daemon=True) for rank in range(1, config.tensor_parallel)]
    for process in ranks:
        process.start()
    _join_group(0, port, config)
    return ranks


def _join_group(rank: int, port: int, config) -> None:
    from bitdelta.device import resolve_device

    backend = "nccl" if resolve_device(config.device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)  # NCCL's object broadcasts stage through the current device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.tensor_parallel)


def _follower(rank: int, port: int, base: str, config) -> None:
    from bitdelta.engine.engine import Engine

    _join_group(rank, port, config)
    try:
        Engine(base, config).follow()
    finally:
        dist.destroy_process_group()


def stop_ranks(ranks: list) -> None:
    """After rank 0 has broadcast its stop: wait for the other ranks and leave the group."""
    for process in ranks:
        process.join(timeout=60)
    dist.destroy_process_group()
