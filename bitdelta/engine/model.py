"""The engine's model: one base in memory, every row of a batch computed with its own fine-tune.

Block linears become BitDeltaLinear (1-bit deltas in `max_slots` slots, Triton on a GPU, the
PyTorch reference on a CPU). A fine-tune also changes tensors that are stored losslessly
(embeddings, norms, lm_head, biases; DeltaConfig.dense): each of those gets a per-slot table
[max_slots + 1, ...] (the last entry is the base) from which every row gathers its own version,
so a row computes exactly its merged fine-tune. Tables are created only for tensors some loaded
delta actually changes.

The forward runs a packed batch: the new tokens of many sequences side by side (decode rows and
prefill chunks), no padding. Attention reads each sequence's keys straight from the paged KV cache
(ops.paged_attention: Triton on a GPU, decode rows one program each and prefill chunks in
tiles of rows sharing each key block; per-sequence SDPA on a CPU). It is
written over the transformers modules of the Llama family (Llama, Mistral, Qwen2 share the
structure: RMSNorm, RoPE, GQA, gated MLP; Qwen3 adds an RMSNorm of each query and key head before
RoPE; Phi-3 computes q/k/v and gate/up each as one fused linear; OLMo 2 normalises the whole query
and key projections, and each block's attention and MLP outputs instead of their inputs; Gemma 3
normalises both inputs and outputs, with (1 + weight) norms, scaled embeddings and a RoPE base per
layer type; Gemma 2 the same with one RoPE and soft-capped attention scores and logits). Sliding-
window layers (Mistral, Gemma's local layers) attend to their window alone, as transformers' own
attention does, so no sequence is cut at the window. Mixture-of-experts blocks (Mixtral, Qwen3-MoE) route each row with its own
fine-tune's router and compute its experts with its own fine-tune's expert deltas (experts.py).
Other families are refused with a clear error.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from bitdelta.errors import IncompatibleModelsError
from bitdelta.kernels import build_plan
from bitdelta.model_names import CheckpointNames
from bitdelta.nn import DeltaRouting

from .experts import ExpertLayer, is_moe_block
from .linears import full_shape, quantize_linears, swap_layer_linears
from .ops.norm import add_rms_norm, silu_and_mul
from .ops.paged_attention import QuerySplit, paged_attention, query_split
from .ops.rotary import rotary_and_cache
from .parallel import TensorParallel, expert_cuts

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3_text", "mixtral", "qwen3_moe")
QK_NORMS = ("q_norm", "k_norm")  # RMSNorms of the queries and keys before RoPE: per head (Qwen3) or whole (OLMo 2)


@dataclass
class StepBatch:
    """One packed step on the host; the model moves it to its device."""

    token_ids: torch.Tensor  # long [T]
    positions: torch.Tensor  # long [T]
    slots: torch.Tensor  # int32 [T], -1 = base
    row_sequence: torch.Tensor  # int32 [T]: the sequence (row of block_tables) each row belongs to
    block_tables: torch.Tensor  # int32 [S, max blocks]: each sequence's KV cache pages
    write_rows: torch.Tensor  # long [T]: pool row of each new token
    logit_rows: torch.Tensor  # long [B]: rows whose next-token logits are needed

    def to(self, device: torch.device) -> StepBatch:
        return StepBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


@dataclass(frozen=True)
class SlotWeights:
    """One delta as the model stores it in a slot (the CPU tier holds these)."""

    signs: dict[str, torch.Tensor]  # weight name -> int32 [N, Kw]
    scales: dict[str, torch.Tensor]  # weight name -> fp32 [N]
    dense: dict[str, torch.Tensor]  # routable tensor name -> tensor in the model's dtype
    source: Path | None = None  # the delta folder it was read from (tensor-parallel ranks read their own copy)

    @property
    def nbytes(self) -> int:
        tensors = [*self.signs.values(), *self.scales.values(), *self.dense.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class MultiTenantModel:
    def __init__(self, model: nn.Module, max_slots: int, base_quant: str | None = None, tp: TensorParallel | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        """`device`: where the model goes, a layer at a time (None: where it is). `dtype`: the parameters
        left unquantized are cast to it once the base is quantized (the model then comes in the
        checkpoint's own dtype, so that the quantized base is the one compress made)."""
        _check_supported(model.config)
        self.model, self.config, self.max_slots, self.base_quant = model, model.config, max_slots, base_quant
        self.param = next(model.parameters())
        decoder = model.model
        self.layers = list(decoder.layers)
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        # this rank's heads: with tensor parallelism the model is a rank's share, its config divided (parallel.load_share)
        self.q_heads, self.kv_heads = self.config.num_attention_heads, self.config.num_key_value_heads
        self.routing = DeltaRouting()
        self.checkpoint_names = CheckpointNames(self.config.model_type)
        # a layer at a time, so that over a quantized base only one layer's full-precision weights are
        # ever on `device` (the model can come in on the CPU): its linears get delta slots (q/k/v and
        # gate/up stacked; not an MoE block's experts, which ExpertLayer holds), then it is quantized
        self.experts, self.linears, self.qkv, self.gate_up = {}, {}, [], []
        for index, layer in enumerate(self.layers):
            if device is not None:
                layer.to(device)
            if is_moe_block(layer.mlp):
                self.experts[index] = ExpertLayer(layer.mlp, max_slots, getattr(self.config, "norm_topk_prob", True))
                if tp is not None:  # before quantizing: a share quantizes by its cut
                    self.experts[index].cuts = expert_cuts(self.experts[index].shapes, tp)
            linears, attention, mlp = swap_layer_linears(model, index, max_slots, self.routing, index in self.experts)
            self.linears.update(linears)
            self.qkv.append(attention)
            self.gate_up.append(mlp)
            if base_quant is not None:
                quantize_linears(linears, [attention, mlp], base_quant)
                if index in self.experts:
                    self.experts[index].quantize(base_quant)
        if device is not None:
            model.to(device)  # the embeddings, final norm and head
        if base_quant is not None and dtype is not None and dtype != self.param.dtype:
            self._cast(dtype)
        self.embed_name = "model.embed_tokens.weight"
        self.head_name = self.embed_name if self.config.tie_word_embeddings else "lm_head.weight"
        self.qk_norms = all(hasattr(attn, norm) for norm in QK_NORMS)
        # OLMo 2 and Gemma 3 normalise the attention's and the MLP's outputs (OLMo 2 instead of their inputs)
        self.output_norms = hasattr(self.layers[0], "post_feedforward_layernorm")
        self.norm_offset = _norm_offset(decoder.norm)  # Gemma's norms multiply by (1 + weight)
        # Gemma scales its embeddings: Gemma 3 in its embedding module, Gemma 2 in the decoder's forward
        self.decoder_embed_scale = torch.tensor(self.config.hidden_size**0.5) if self.config.model_type == "gemma2" else None
        self.embed_scale = getattr(decoder.embed_tokens, "embed_scale", self.decoder_embed_scale)
        # each layer's sliding window (what transformers' attention of the layer applies), or None
        self.windows = [getattr(layer.self_attn, "sliding_window", getattr(self.config, "sliding_window", None)) for layer in self.layers]
        self.attention_softcap = getattr(self.config, "attn_logit_softcapping", None)
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
        # Gemma 3 has a RoPE base per layer type (local, global); its rotary embedding takes the type
        types = getattr(self.config, "layer_types", None)
        self.rope_types = types if types is not None and "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters else None
        self.norm_names = [f"model.layers.{i}.{name}" for i, layer in enumerate(self.layers)
                           for name, _ in layer.named_parameters() if "norm" in name] + ["model.norm.weight"]
        self.router_names = {index: f"model.layers.{index}.mlp.gate.weight" for index in self.experts}
        params = dict(model.named_parameters())
        self.base_tensors = {n: params[n] for n in {self.embed_name, self.head_name, *self.norm_names, *self.router_names.values()}}
        # with tensor parallelism, the norms held as this rank's share (OLMo 2's over whole q and k projections)
        self.split_norms = {f"{name}.weight": module.shard for name, module in model.named_modules()
                            if getattr(module, "shard", None) is not None and f"{name}.weight" in self.base_tensors}
        # fused expert tensor name -> (its layer, the tensor's name in the layer's ExpertLayer)
        self.fused_experts = {f"model.layers.{index}.mlp.experts.{name}": (layer, name)
                              for index, layer in self.experts.items() for name in layer.weights}
        self.bias_names = {name.removesuffix(".weight") + ".bias": lin for name, lin in self.linears.items() if lin.bias is not None}
        self.tables: dict[str, torch.Tensor] = {}  # per-slot copies of the lossless tensors deltas change
        self.layout_version = 0  # bumped when a table or per-slot bias appears: captured graphs predate it

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def context(self) -> int:
        """Longest sequence: the position table's size."""
        return self.config.max_position_embeddings

    @property
    def graphable(self) -> bool:
        """Whether a decode step can be a CUDA graph: with MoE blocks, only where each computes its
        experts in one launch (ExpertLayer.graphable)."""
        return all(layer.graphable(self.device) for layer in self.experts.values())

    def model_name(self, name: str) -> str:
        """The model's name for checkpoint tensor `name` (Mixtral's `block_sparse_moe` is `mlp` in the model)."""
        return self.checkpoint_names.renamed(name)

    def expert_matrix(self, name: str) -> tuple[ExpertLayer, str, int, slice] | None:
        """Where checkpoint matrix `name` lives if it is one expert's matrix of an MoE block: the
        layer, its fused tensor, the expert, the rows."""
        part = self.checkpoint_names.fused_expert(name) if self.experts else None
        if part is None or part.fused not in self.fused_experts:
            return None
        layer, fused = self.fused_experts[part.fused]
        if not 0 <= part.expert < layer.num_experts:
            return None
        return layer, fused, part.expert, part.rows(layer.shapes[fused][1])

    def _cast(self, dtype: torch.dtype) -> None:
        """Every floating parameter in `dtype`, in place (whoever holds a parameter sees it cast), and the
        stacks' biases stacked again from them."""
        for parameter in self.model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        for stack in filter(None, [*self.qkv, *self.gate_up]):
            stack.stack_biases()

    def quantized_names(self, base_dir: Path | None) -> set[str]:
        """The checkpoint names of what `base_quant` quantizes: the block linears and, read from the
        base's checkpoint at `base_dir`, the experts' matrices (the set `compress --base-quant` uses)."""
        from bitdelta.checkpoint import Checkpoint

        experts = [] if base_dir is None or not self.experts else Checkpoint(base_dir).tensors
        return set(self.linears) | {name for name in experts if self.expert_matrix(name) is not None}

    def delta_shape(self, name: str) -> tuple[int, int] | None:
        """[N, K] of the matrix a 1-bit delta named `name` (checkpoint name) applies to: a block
        linear, or one expert's matrix; None where the engine has no such matrix."""
        if name in self.linears:
            return full_shape(self.linears[name])
        where = self.expert_matrix(name)
        if where is None:
            return None
        layer, fused, _, rows = where
        if layer.cuts is not None:  # a rank's share: the delta holds the full matrix
            return layer.cuts[fused].full_shape
        return rows.stop - rows.start, layer.shapes[fused][2]

    def routable(self, name: str) -> bool:
        """Whether a lossless tensor (model name) can differ per row: embeddings, norms, lm_head,
        linear biases, MoE routers."""
        return name in self.base_tensors or name in self.bias_names

    def base_shape(self, name: str) -> tuple[int, ...]:
        if name in self.linears:
            return full_shape(self.linears[name])
        if name in self.split_norms:
            return self.split_norms[name].full_shape
        tensor = self.base_tensors.get(name)
        return tuple(tensor.shape) if tensor is not None else full_shape(self.bias_names[name])[:1]

    def install(self, slot: int, weights: SlotWeights) -> None:
        """Put a delta into `slot`, replacing whatever was there (called between steps)."""
        for name, linear in self.linears.items():
            if name in weights.signs:
                shard = linear.shard  # with tensor parallelism, this rank's share of the full delta
                linear.signs[slot].copy_(weights.signs[name] if shard is None else shard.signs(weights.signs[name]), non_blocking=True)
                linear.scales[slot].copy_(weights.scales[name] if shard is None else shard.rows(weights.scales[name]), non_blocking=True)
            else:  # the fine-tune left this linear unchanged: a zero delta
                linear.scales[slot].zero_()
        for layer in self.experts.values():
            layer.clear(slot)
        for name in weights.signs.keys() - self.linears.keys():
            layer, fused, expert, rows = self.expert_matrix(name)
            layer.install(slot, fused, expert, rows, weights.signs[name], weights.scales[name])
        for name in weights.dense:
            self._ensure_table(name)
        for name, linear in self.bias_names.items():
            if linear.slot_bias is not None:
                own, shard = weights.dense.get(name), linear.shard
                own = linear.bias if own is None else own if shard is None else shard.rows(own)
                linear.slot_bias[slot].copy_(own, non_blocking=True)
        for name, table in self.tables.items():
            own = weights.dense.get(name)
            if own is not None and name in self.split_norms:
                own = self.split_norms[name].rows(own)
            table[slot].copy_(self.base_tensors[name] if own is None else own, non_blocking=True)

    def _ensure_table(self, name: str) -> None:
        if name in self.bias_names:
            linear = self.bias_names[name]
            if linear.slot_bias is None:
                linear.slot_bias = linear.bias.detach().expand(self.max_slots, -1).clone()
                self.layout_version += 1
        elif name not in self.tables:
            base = self.base_tensors[name].detach()
            self.tables[name] = base.expand(self.max_slots + 1, *base.shape).clone()  # entry max_slots: the base
            self.layout_version += 1

    @torch.no_grad()
    def forward(self, batch: StepBatch, kv) -> torch.Tensor:
        """fp32 logits [B, vocab] for `batch.logit_rows`; writes the new tokens' keys and values."""
        head_groups = self.head_groups(batch.slots[batch.logit_rows])
        cuda = self.device.type == "cuda"  # only the kernels read the plan and the query split
        split = query_split(batch.row_sequence, batch.positions) if cuda else None
        batch = batch.to(self.device)
        self.route(batch.slots, build_plan(batch.slots) if cuda else None)
        return self.compute(batch, kv, head_groups, None if split is None else split.to(self.device))

    def route(self, slots: torch.Tensor, plan) -> None:
        """Tell every BitDeltaLinear which slot each row of the next pass uses."""
        self.routing.slot_ids, self.routing.plan = slots, plan

    @torch.no_grad()
    def compute(self, batch: StepBatch, kv, head_groups: list[tuple[int, torch.Tensor]] | None,
                split: QuerySplit | None = None) -> torch.Tensor:
        """The forward pass of a batch already on the device and routed (`head_groups` from
        `head_groups`, `split` from `query_split`: prefill chunks' rows as attention tiles): device
        work only, so a CUDA graph can capture it (graphs.py)."""
        slots = batch.slots
        table_rows = torch.where(slots < 0, self.max_slots, slots).long()  # slot -1 reads the base entry
        embed = self.tables.get(self.embed_name)
        if embed is None:
            h = self.model.model.embed_tokens(batch.token_ids)
            if self.decoder_embed_scale is not None:  # Gemma 3's embedding module scales itself
                h = h * self.decoder_embed_scale.to(h.dtype)
        else:
            h = embed[table_rows, batch.token_ids]
            h = h if self.embed_scale is None else h * self.embed_scale.to(h.dtype)
        rope = self._rope(h, batch.positions)
        if self.output_norms:
            return self._compute_output_norms(batch, kv, head_groups, split, h, rope, table_rows)
        residual = None  # each block's output, added to h by the norm after it
        for index, layer in enumerate(self.layers):
            h, x = self._add_norm(h, residual, layer.input_layernorm, f"model.layers.{index}.input_layernorm.weight",
                                  table_rows)
            attention = self._attention(layer.self_attn, index, x, *rope[index], batch, kv, split, table_rows)
            h, x = self._add_norm(h, attention, layer.post_attention_layernorm,
                                  f"model.layers.{index}.post_attention_layernorm.weight", table_rows)
            residual = self._mlp(index, layer.mlp, x, slots, table_rows)
        rows = batch.logit_rows
        _, h = self._add_norm(h[rows], residual[rows], self.model.model.norm, "model.norm.weight", table_rows[rows])
        return self._lm_head(h, head_groups)

    def _compute_output_norms(self, batch: StepBatch, kv, head_groups, split: QuerySplit | None, h: torch.Tensor,
                              rope: list[tuple[torch.Tensor, torch.Tensor]], table_rows: torch.Tensor) -> torch.Tensor:
        """`compute` for blocks that normalise their attention's and MLP's outputs, and their inputs
        where they have those norms (Gemma 3; OLMo 2 has none): h += norm(attention(norm(h)));
        h += norm(mlp(norm(h)))."""
        def norm(x: torch.Tensor, layer: nn.Module, index: int, name: str) -> torch.Tensor:
            if not hasattr(layer, name):
                return x
            return self._add_norm(x, None, getattr(layer, name), f"model.layers.{index}.{name}.weight", table_rows)[1]

        for index, layer in enumerate(self.layers):
            x = norm(h, layer, index, "input_layernorm")
            h = h + norm(self._attention(layer.self_attn, index, x, *rope[index], batch, kv, split, table_rows), layer, index,
                         "post_attention_layernorm")
            x = norm(h, layer, index, "pre_feedforward_layernorm")
            h = h + norm(self._mlp(index, layer.mlp, x, batch.slots, table_rows), layer, index, "post_feedforward_layernorm")
        rows = batch.logit_rows
        _, h = self._add_norm(h[rows], None, self.model.model.norm, "model.norm.weight", table_rows[rows])
        return self._lm_head(h, head_groups)

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for each layer: one RoPE for all, or one per layer type (Gemma 3: local and global bases)."""
        rotary = self.model.model.rotary_emb
        if self.rope_types is None:
            cos, sin = (table[0] for table in rotary(h[None], positions[None]))
            return [(cos, sin)] * len(self.layers)
        per_type = {kind: tuple(table[0] for table in rotary(h[None], positions[None], kind)) for kind in set(self.rope_types)}
        return [per_type[kind] for kind in self.rope_types]

    def _add_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module, name: str,
                  table_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h + residual and its RMSNorm (LlamaRMSNorm's arithmetic) with each row's own fine-tune's
        weight: one kernel on a GPU (ops/norm.py)."""
        table = self.tables.get(name)
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        weight = norm.weight if table is None else table
        if self.norm_offset:
            weight = weight + self.norm_offset
        return add_rms_norm(h, residual, weight, eps, None if table is None else table_rows)

    def _qk_norm(self, heads: torch.Tensor, norm: nn.Module, name: str, table_rows: torch.Tensor) -> torch.Tensor:
        """RMSNorm of queries or keys [T, heads, head_dim], per head or over all heads (the norm's
        width says which), with each row's own fine-tune's weight."""
        if name in self.split_norms:
            return self._split_norm(heads, norm, name, table_rows)
        width = norm.weight.numel()
        pieces = heads[0].numel() // width  # a row's norms: its heads, or one
        _, normed = self._add_norm(heads.reshape(-1, width), None, norm, name, table_rows.repeat_interleave(pieces))
        return normed.view(heads.shape)

    def _split_norm(self, heads: torch.Tensor, norm: nn.Module, name: str, table_rows: torch.Tensor) -> torch.Tensor:
        """RMSNorm over all of a projection's heads when this rank holds a share of them (OLMo 2 under
        tensor parallelism): the shares' sums of squares all-reduced, then this rank's columns scaled."""
        x = heads.reshape(heads.shape[0], -1).float()
        squares = x.square().sum(dim=-1, keepdim=True)
        torch.distributed.all_reduce(squares)
        table = self.tables.get(name)
        weight = norm.weight if table is None else table[table_rows]
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        normed = x * torch.rsqrt(squares / self.split_norms[name].full_shape[0] + eps)
        return (weight.float() * normed).to(heads.dtype).view(heads.shape)

    def _mlp(self, index: int, mlp: nn.Module, x: torch.Tensor, slots: torch.Tensor, table_rows: torch.Tensor) -> torch.Tensor:
        """The block's gated MLP, or its mixture of experts routed by each row's own router."""
        experts = self.experts.get(index)
        if experts is None:
            return mlp.down_proj(self._gated_activation(mlp, *_unfused(self.gate_up[index](x), 2)))
        return experts.forward(x, slots, self._per_row_product(x, self.router_names[index], table_rows))

    def _per_row_product(self, x: torch.Tensor, name: str, table_rows: torch.Tensor) -> torch.Tensor:
        """x @ W.T with each row's own fine-tune's version of the small matrix `name` (a router), with
        no read of the rows' entries on the host (a CUDA graph can hold it): with fewer rows than
        table entries (decode), each row's own matrix gathered; else one product against every entry,
        each row keeping its own entry's columns. Either reads at most min(rows, entries) matrices."""
        table = self.tables.get(name)
        if table is None:
            return x @ self.base_tensors[name].T
        entries, width, _ = table.shape
        if x.shape[0] < entries:
            return torch.bmm(table[table_rows], x[:, :, None])[:, :, 0]
        products = (x @ table.flatten(0, 1).T).view(x.shape[0], entries, width)
        return products[torch.arange(x.shape[0], device=x.device), table_rows]

    def _gated_activation(self, mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if getattr(self.config, "hidden_act", None) == "silu":  # the Llama family's SwiGLU: one kernel on a GPU
            return silu_and_mul(gate, up)
        activation = getattr(mlp, "act_fn", None) or mlp.activation_fn  # Phi-3 names it activation_fn
        return activation(gate) * up

    def _attention(self, attn: nn.Module, layer: int, x: torch.Tensor, cos, sin, batch: StepBatch, kv,
                   split: QuerySplit | None, table_rows: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        queries = self.q_heads * self.head_dim
        q, k, v = (part.view(t, -1, self.head_dim) for part in _unfused(self.qkv[layer](x), (queries, *2 * [self.kv_heads * self.head_dim])))
        if self.qk_norms:
            q, k = (self._qk_norm(heads, getattr(attn, norm), f"model.layers.{layer}.self_attn.{norm}.weight", table_rows)
                    for heads, norm in zip((q, k), QK_NORMS))
        q = rotary_and_cache(q, k, v, cos, sin, kv.keys[layer], kv.values[layer], batch.write_rows)
        out = paged_attention(
            q, kv.keys[layer], kv.values[layer], batch.block_tables,
            batch.row_sequence, batch.positions, kv.block_size, self.scaling, split, self.windows[layer], self.attention_softcap,
        )
        return attn.o_proj(out.reshape(t, -1))

    def head_groups(self, logit_slots: torch.Tensor) -> list[tuple[int, torch.Tensor]] | None:
        """The logit rows grouped by lm_head table entry, from the host copy of their slots: (entry,
        row indices on the device) per entry, or None while no delta changes the lm_head. Built on
        the host so that the forward has no device sync and a CUDA graph can capture it."""
        if self.head_name not in self.tables:
            return None
        entries = torch.where(logit_slots < 0, self.max_slots, logit_slots)
        return [(entry, (entries == entry).nonzero(as_tuple=True)[0].to(self.device)) for entry in torch.unique(entries).tolist()]

    def _lm_head(self, h: torch.Tensor, head_groups: list[tuple[int, torch.Tensor]] | None) -> torch.Tensor:
        if head_groups is None:
            logits = self.model.lm_head(h).float()
        else:
            table = self.tables[self.head_name]
            logits = torch.empty(h.shape[0], table.shape[1], dtype=torch.float32, device=h.device)
            # grouped by slot: gathering a [vocab, hidden] matrix per row would cost a copy per row
            for entry, rows in head_groups:
                logits[rows] = (h[rows] @ table[entry].T).float()
        if self.logit_softcap is not None:  # Gemma 2
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits


def check_model_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise IncompatibleModelsError(f"the engine serves these model types: {', '.join(SUPPORTED_MODEL_TYPES)}; {model_type!r} is not supported yet")


def _check_supported(config) -> None:
    """Refuse, in one line, a model this engine would compute wrongly."""
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        raise IncompatibleModelsError(f"the engine applies RoPE to whole heads; this {model_type} model rotates a part of each "
                                      f"(partial_rotary_factor {config.partial_rotary_factor}) and is not supported yet")


@torch.no_grad()
def _norm_offset(norm: nn.Module) -> float:
    """1.0 for an RMSNorm that multiplies by (1 + weight) (Gemma's), 0.0 for one that multiplies by
    the weight: told apart by what it makes of a row of ones, which RMS normalisation leaves as is."""
    weight = norm.weight.float()
    out = norm(torch.ones(1, weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device)).float()[0]
    return 1.0 if (out - (1 + weight)).abs().max() < (out - weight).abs().max() else 0.0


def _unfused(outputs: tuple[torch.Tensor, ...], split: int | tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The parts of a stacked product; one fused linear's output (Phi-3) cut into them: into `split`
    equal chunks, or widths."""
    if len(outputs) > 1:
        return outputs
    return outputs[0].chunk(split, dim=-1) if isinstance(split, int) else outputs[0].split(split, dim=-1)
