"""Tensor parallelism for the engine: the base and every delta sharded Megatron-style over
`torch.distributed` (NCCL on GPUs, gloo on the CPU).

Each rank holds a share of every block linear: q/k/v and gate/up split by output rows (their sign
rows, per-row scales and biases with them; a fused q/k/v or gate/up, Phi-3's, by each part's rows), o and down split by input columns (packed sign words
split on 32-column boundaries, scales replicated), with one all-reduce after each row-parallel
product. Attention heads and the KV cache split with q/k/v (and OLMo 2's norms over whole q and k
projections, their sums of squares all-reduced); an MoE layer's experts split like an
MLP (gate/up rows, down columns of every expert, the router whole, one all-reduce after the block). Embeddings, norms, lm_head and the
per-slot tables of lossless tensors are replicated, so every rank ends a step with the same logits.
Each rank builds only its share (`load_share`): the checkpoint's model with heads and MLP width
divided by the ranks, loaded from its rows or columns of each linear.

Rank 0 runs the engine (scheduler, delta store, server); `Leader` wraps its model so that each
step's batch, and each delta installed into a slot since the last step, are broadcast first. The
other ranks run `follow`: they read each installed delta from its folder themselves (or receive it,
for a delta given in memory), install their shard, and compute the same steps.
"""

from __future__ import annotations

import multiprocessing.connection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bitdelta.errors import EngineFailedError, IncompatibleModelsError
from bitdelta.pack import BITS_PER_WORD
from bitdelta.quant import GROUP, QuantizedWeight, quantize

# by the matrix's name in the checkpoint (an expert's too: Mixtral calls gate, down and up w1, w2 and w3)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")  # split by output rows
FUSED_COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")  # Phi-3's stacks: each part split by its output rows
ROW_PARALLEL = ("o_proj", "down_proj", "w2")  # split by input columns, all-reduced
WHOLE_PROJECTION_NORMS = ("q_norm", "k_norm")  # OLMo 2's, over all heads: split with q and k (Qwen3's per-head ones stay whole)


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
    """A linear's share on one rank: output rows (`dim` 0) or input columns (`dim` 1) of a matrix of
    `full_shape`. Rows may be several ranges, one in each part of a fused linear (Phi-3's q/k/v),
    held in that order; columns are one range. Full-size delta tensors are cut to it on install."""

    dim: int
    parts: tuple[slice, ...]
    full_shape: tuple[int, int]

    def signs(self, words: torch.Tensor) -> torch.Tensor:
        """[..., N, Kw] packed signs of the full matrix -> this rank's."""
        if self.dim == 0:
            return self._rows_of(words, -2)
        [part] = self.parts
        return words[..., part.start // BITS_PER_WORD : part.stop // BITS_PER_WORD]

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A per-output-row tensor [..., N] (scales, a bias) of the full matrix -> this rank's."""
        return self._rows_of(tensor, -1) if self.dim == 0 else tensor

    def _rows_of(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        pieces = [tensor.narrow(dim, part.start, part.stop - part.start) for part in self.parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def load_share(checkpoint, tp: TensorParallel, dtype: torch.dtype) -> nn.Module:
    """This rank's model: the checkpoint's architecture with its heads and MLP width divided by the
    ranks, holding this rank's rows or columns of each block linear (read alone from the files)
    and everything else whole. Each linear records its cut as `linear.shard`. No rank ever holds
    the whole model, in CPU memory or on its GPU."""
    import copy

    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    share = copy.deepcopy(config)
    share.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    share.num_attention_heads //= tp.world
    share.num_key_value_heads //= tp.world
    for width in ("intermediate_size", "moe_intermediate_size"):  # an MoE layer's experts split like an MLP
        if getattr(config, width, None):
            setattr(share, width, getattr(config, width) // tp.world)
    widths = _widths(config, share.head_dim)
    cuts, state = {}, {}
    for name, meta in checkpoint.tensors.items():
        cut = _cut(name, tuple(meta.shape), tp, widths)
        if cut is None:
            state[name] = checkpoint.mapped(name).to(dtype)
        elif cut.dim == 0:
            cuts[name] = cut
            state[name] = torch.cat([checkpoint.part(name, part) for part in cut.parts]).to(dtype)
        else:
            cuts[name] = cut
            state[name] = checkpoint.part(name, slice(None), cut.parts[0]).to(dtype)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=share, state_dict=state, dtype=dtype)
    modules = dict(model.named_modules())
    for name, cut in cuts.items():  # experts' matrices sit in fused tensors: ExpertLayer keeps their cuts (expert_cuts)
        if name.removesuffix(".weight") in modules and name.endswith(".weight"):
            modules[name.removesuffix(".weight")].shard = cut  # a linear's, or a whole-projection norm's
    return model


def _widths(config, head_dim: int) -> dict[str, tuple[int, ...]]:
    """By role: the output rows of each part of a fused linear (Phi-3's q/k/v and gate/up), and the
    width of the queries and keys a whole-projection norm spans."""
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"qkv_proj": (q, kv, kv), "gate_up_proj": (getattr(config, "intermediate_size", 0),) * 2,
            "q_norm": (q,), "k_norm": (kv,)}


def _cut(name: str, shape: tuple[int, ...], tp: TensorParallel, widths: dict[str, tuple[int, ...]]) -> Shard | None:
    """How a checkpoint tensor splits over the ranks: a block linear's weight (or a column-parallel
    one's bias) by its role, a norm over a whole q or k projection with its rows; None for what
    every rank holds whole."""
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] not in ("weight", "bias") or ".layers." not in name:
        return None
    role, kind = parts[-2], parts[-1]
    if role in WHOLE_PROJECTION_NORMS and shape == widths[role]:
        return Shard(0, (tp.part(shape[0]),), shape)
    if role in COLUMN_PARALLEL or role in FUSED_COLUMN_PARALLEL:
        part_rows = widths[role] if role in FUSED_COLUMN_PARALLEL else (shape[0],)
        if sum(part_rows) != shape[0] or any(rows % tp.world for rows in part_rows):
            raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: {name} has {shape[0]} output rows, which do not split "
                                          f"into {tp.world} equal shares{' of each part' if len(part_rows) > 1 else ''}")
        shares, start = [], 0
        for rows in part_rows:  # this rank's rows of each part, at the part's offset in the fused matrix
            share = tp.part(rows)
            shares.append(slice(start + share.start, start + share.stop))
            start += rows
        return Shard(0, tuple(shares), shape)
    if role in ROW_PARALLEL:
        if kind == "bias":
            raise IncompatibleModelsError(f"--tensor-parallel: {name} is a bias of a row-parallel linear, which is not supported yet")
        k = shape[1]
        if k % (tp.world * BITS_PER_WORD):
            raise IncompatibleModelsError(f"--tensor-parallel {tp.world}: {name} reads {k} inputs; each rank's share must be a multiple of 32")
        return Shard(1, (tp.part(k),), shape)
    return None


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
    installed since the last step (their folder where they came from one). A step that finds
    another rank's process gone, or fails while one is, raises EngineFailedError: the other ranks'
    shares cannot be rebuilt here, so the engine stops serving rather than failing every request."""

    active: Leader | None = None  # the process group serves one engine: a second would talk to the first one's ranks

    def __init__(self, model, ranks: list):
        if Leader.active is not None:
            raise IncompatibleModelsError("a tensor-parallel engine is already running in this process; stop it before starting another")
        Leader.active = self
        self.model, self.ranks = model, ranks  # ranks: the processes of ranks 1..N-1 where this engine started them
        self._installs: list[tuple[int, object]] = []
        self.failed = False

    def install(self, slot: int, weights) -> None:
        self.model.install(slot, weights)
        self._installs.append((slot, weights.source or weights))

    def forward(self, batch, kv) -> torch.Tensor:
        self._check_ranks()
        message = [(self._installs, batch)]
        self._installs = []
        try:
            dist.broadcast_object_list(message, src=0)
            return self.model.forward(batch, kv)
        except Exception:
            # a peer that died mid-step: say so rather than show the collective's error (a second at most)
            if self.ranks:
                multiprocessing.connection.wait([process.sentinel for process in self.ranks], timeout=1)
            self._check_ranks()
            raise

    def _check_ranks(self) -> None:
        lost = [(rank, process.exitcode) for rank, process in enumerate(self.ranks, start=1) if not process.is_alive()]
        if lost:
            self.failed = True
            rank, code = lost[0]
            raise EngineFailedError(f"tensor-parallel rank {rank} exited (exit code {code}); this engine cannot go on without "
                                    "its share of the model: restart the server")

    def stop(self) -> None:
        if not self.failed:
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
        for slot, delta in installs:  # a delta's folder, or a delta given in memory
            model.install(slot, read(delta) if isinstance(delta, Path) else delta)
        model.forward(batch, kv)


def expert_cuts(shapes: dict[str, tuple[int, int, int]], tp: TensorParallel) -> dict[str, Shard]:
    """How each fused expert tensor of this rank's share ([E, N, K], `ExpertLayer.shapes`) was cut
    from one expert's full matrices: gate/up by rows of the intermediate width, down by its columns."""
    _, rows, hidden = shapes["gate_up_proj"]
    intermediate = rows // 2 * tp.world  # load_share refused a width whose share is not a multiple of 32
    return {"gate_up_proj": Shard(0, (tp.part(intermediate),), (intermediate, hidden)),
            "down_proj": Shard(1, (tp.part(intermediate),), (hidden, intermediate))}


def check_split(model_config: dict, world: int, base_quant: str | None = None) -> None:
    """Refuse, in one line and before any rank starts, a model whose heads do not split over `world`
    ranks, and an int4 base whose 128-column groups a rank's share of the inputs would cut (o_proj
    and down_proj split their inputs: each share must be whole groups to quantize as the whole matrix)."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "moe_intermediate_size"):
        count = model_config.get(key)
        if count is not None and count % world:
            raise IncompatibleModelsError(f"--tensor-parallel {world}: the model's {count} {key.removeprefix('num_').replace('_', ' ')} "
                                          f"do not split evenly over {world} ranks; use a divisor of {count}")
    if base_quant != "int4":
        return
    heads = model_config["num_attention_heads"]
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // heads
    inputs = {"o_proj": heads * head_dim, "down_proj": model_config.get("intermediate_size"),
              "experts' down_proj": model_config.get("moe_intermediate_size")}
    for name, width in inputs.items():
        if width and width // world % GROUP:
            raise IncompatibleModelsError(
                f"--base-quant int4 --tensor-parallel {world}: each rank would hold {width // world} of {name}'s {width} inputs, "
                f"not whole {GROUP}-column groups; use fewer ranks or --base-quant int8")


def quantize_share(weight: torch.Tensor, recipe: str, shard: Shard | None) -> QuantizedWeight:
    """A rank's share of a matrix quantized as it is inside the whole matrix (what `compress
    --base-quant` took the delta against): a share of the columns takes each row's scale over the
    whole row, the ranks' maxima all-reduced (int8, fp8; int4's groups lie inside a share,
    `check_split`). Rows, and the whole matrix, quantize on their own."""
    if shard is None or shard.dim == 0 or recipe == "int4":
        return quantize(weight, recipe)
    row_absmax = weight.detach().abs().amax(dim=1, keepdim=True).float()  # exact in any float dtype: no fp32 copy of the share
    dist.all_reduce(row_absmax, op=dist.ReduceOp.MAX)
    return quantize(weight, recipe, row_absmax)


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


def abort_ranks(ranks: list) -> None:
    """Rank 0 failed to start: end the other ranks and leave the group."""
    for process in ranks:
        process.terminate()
        process.join(timeout=30)
    Leader.active = None
    dist.destroy_process_group()


def stop_ranks(ranks: list) -> None:
    """After rank 0 has broadcast its stop: wait for the other ranks and leave the group."""
    for process in ranks:
        process.join(timeout=60)
    dist.destroy_process_group()
