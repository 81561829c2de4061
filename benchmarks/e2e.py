"""End-to-end multi-tenant decoding on a GPU: memory and speed of N fine-tunes served at once.

    python -m benchmarks.e2e [--shape llama2-7b] [--tenants 1,2,4,8,16,32,64] [--zipf 64] [--busy 0]
                             [--prompt 128] [--generate 128] [--out benchmarks/results]

A Llama-2-7B-shaped base in fp16 with random weights, built on the GPU (speed does not depend on
the values), and N fine-tunes; a batch of B = N requests, one per fine-tune, each a 128-token
prompt and 128 generated tokens (greedy, no end-of-sequence stop); then B = 64 requests whose
fine-tunes follow a Zipf law (p ~ 1/rank) over 64; with --busy B, B requests of one fine-tune (the
few-delta kernels: one delta shared by the batch). Compared in one run:

  naive     each fine-tune a separate dense fp16 transformers model, batch = its own requests,
            one model after another each step. As many as fit stay on the GPU; the rest are
            copied in from pinned CPU memory when their turn comes (a swap: the whole model
            crosses PCIe). The host holds one pinned model copy that every swapped fine-tune
            is read from: the bytes moved are the same as with distinct copies, which 64 x 13.5 GB
            would not fit in any host's memory.
  bitdelta  `bitdelta.engine` (Engine.from_model + store.add): one base + N 1-bit deltas in GPU
            slots, every step one batch of all rows, Triton kernels (delta matmul, paged
            attention), continuous batching, paged KV cache.
  base      the same engine and batch with every request on the base model (slot -1): the upper
            bound bitdelta's extra reads are measured against.
  lora-rR   batched LoRA, the S-LoRA / Punica class: each fine-tune a rank-R adapter (R = 16 and 128;
            r = 128 is 0.64 GB a fine-tune against bitdelta's 0.76 GB) on every block linear, served
            by the same engine as bitdelta (continuous batching, paged KV cache, CUDA graphs): each
            linear computes the base product and adds its rows' adapters' products as two batched
            matmuls over the rows grouped by adapter (`benchmarks/lora_baseline.py`).

The random deltas are 8 distinct sets of bits and scales reused round-robin (each fine-tune still
occupies its own GPU slot; reading the slot costs the same whatever the bits are).

Per configuration: GPU memory (peak allocated), time to first token (median over requests), decode
latency per token (median and p99 of the per-step time of decode steps), decode tokens/s
(B / median step), and end-to-end tokens/s (generated tokens / wall time incl. prefill). The naive
run times fewer decode steps than 128 when a step takes long (`steps` in the table); its per-step
cost is constant across the generation. A torch.profiler trace of bitdelta's decode
at N = 32 says where the step's time goes. Writes e2e.json, e2e.md, e2e.png and e2e_profile.txt
to --out (default benchmarks/results); `--report-only` rewrites e2e.md and e2e.png from e2e.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.lora_baseline import LoraGroups, lora_expand_, lora_groups, lora_shrink
from bitdelta.engine import Engine, EngineConfig, EngineObserver, SamplingParams
from bitdelta.engine.model import SlotWeights

HERE = Path(__file__).resolve().parent
REPRODUCE = "python -m benchmarks.e2e"
SHAPES = {  # hidden, intermediate, layers, heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32000),
    "tiny": (256, 688, 2, 4, 1024),
}
DISTINCT_DELTAS = 8
LORA_RANKS = (16, 128)
GiB = 2**30


@dataclass(frozen=True)
class Setup:
    shape: str
    prompt: int
    generate: int
    device: torch.device
    dtype: torch.dtype

    @property
    def kv_tokens(self) -> int:
        return self.prompt + self.generate


# ---- models --------------------------------------------------------------------------------------
def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)


def random_weights(config, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every parameter of the model: N(0, 0.02) matrices, unit norms. The linears the engine stacks
    (q/k/v, gate/up: `STACKED`) are consecutive row blocks of one tensor, so it stacks them without a
    copy (the benchmark keeps these weights for every system it runs)."""
    from transformers import LlamaForCausalLM

    from bitdelta.engine.model import STACKED

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    generator = torch.Generator(device).manual_seed(0)
    weights = {}
    for layer in range(config.num_hidden_layers):
        for block, parts in STACKED:
            names = [f"model.layers.{layer}.{block}.{part}.weight" for part in parts]
            rows = [shapes[name][0] for name in names]
            stacked = torch.empty(sum(rows), shapes[names[0]][1], dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
            weights.update(zip(names, stacked.split(rows)))
    for name, shape in shapes.items():
        if name in weights:
            continue
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            weights[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
    return weights


def model_over(config, weights: dict[str, torch.Tensor]):
    """A transformers model whose parameters are `weights` (shared, not copied)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, assign=True, strict=True)
    device = next(iter(weights.values())).device
    with torch.device(device):  # the rotary embedding's buffers were made on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def model_bytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


@functools.cache
def random_deltas(count: int, shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...], pin: bool) -> list[SlotWeights]:
    """`count` distinct random deltas (linear name, signs shape, scales shape) in the slot layout,
    in (pinned) CPU memory like loaded ones; made once per run."""
    deltas = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        signs, scales = {}, {}
        for name, signs_shape, scales_shape in shapes:
            words = torch.randint(-(2**31), 2**31, signs_shape, dtype=torch.int64, generator=generator).to(torch.int32)
            scale = torch.rand(scales_shape, generator=generator) * 2e-3
            signs[name], scales[name] = (words.pin_memory(), scale.pin_memory()) if pin else (words, scale)
        deltas.append(SlotWeights(signs, scales, {}))
    return deltas


def serve_random_deltas(engine: Engine, tenants: list[int]) -> None:
    """Register fine-tune `ft{t}` for each tenant t, on DISTINCT_DELTAS random deltas round-robin."""
    shapes = tuple((name, tuple(linear.signs.shape[1:]), tuple(linear.scales.shape[1:])) for name, linear in engine.model.linears.items())
    deltas = random_deltas(DISTINCT_DELTAS, shapes, engine.model.device.type == "cuda")
    for index, tenant in enumerate(tenants):
        engine.store.add(f"ft{tenant}", deltas[index % len(deltas)])


def prompts(setup: Setup, count: int) -> list[list[int]]:
    vocab = SHAPES[setup.shape][4]
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (count, setup.prompt), generator=generator).tolist()


def zipf_tenants(count: int, tenants: int) -> list[int]:
    """Fine-tune of each of `count` requests, Zipf over `tenants` (p ~ 1/rank), fixed seed."""
    weights = torch.tensor([1 / rank for rank in range(1, tenants + 1)])
    return torch.multinomial(weights, count, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()


# ---- measuring ---------------------------------------------------------------------------------------
class StepClock(EngineObserver):
    """Wall time of every engine step (the engine syncs on the sampled tokens at each step's end)."""

    def __init__(self) -> None:
        self.decode_steps: list[float] = []
        self._last = None
        self._prefilling = False

    def step(self, sequences, deltas, prefill_tokens, decode_tokens) -> None:
        now = time.perf_counter()
        if self._last is not None and not self._prefilling:
            self.decode_steps.append(now - self._last)
        self._last, self._prefilling = now, prefill_tokens > 0

    def done(self) -> None:
        """Close the last step (step() times the step before it)."""
        self.step(0, 0, 0, 0)


def summary(first_tokens: list[float], decode_steps: list[float], rows: int, generated: int, wall: float, memory: int) -> dict:
    steps = sorted(decode_steps)
    median = statistics.median(steps)
    return {
        "memory_gib": memory / GiB,
        "ttft_ms": statistics.median(first_tokens) * 1e3,
        "decode_ms_median": median * 1e3,
        "decode_ms_p99": steps[min(len(steps) - 1, round(0.99 * (len(steps) - 1)))] * 1e3,
        "decode_tokens_per_s": rows / median,
        "tokens_per_s": generated / wall,
        "steps": len(steps),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


# ---- bitdelta engine and base only --------------------------------------------------------------------
def build_engine(setup: Setup, config, weights, slots: int, batch: int, graphs: bool = True) -> Engine:
    blocks_per_sequence = -(-setup.kv_tokens // 16)
    engine_config = EngineConfig(
        max_batch=batch, max_gpu_deltas=max(1, slots), max_cpu_deltas=1, kv_block_size=16, kv_blocks=batch * blocks_per_sequence,
        prefill_chunk=batch * setup.prompt,  # every prompt in the first step: later steps are pure decode
        cuda_graphs=graphs,
    )
    return Engine.from_model(model_over(config, weights), engine_config)


def run_engine(engine: Engine, setup: Setup, models: list[str]) -> dict:
    requests = [(model, prompt, SamplingParams(max_tokens=setup.generate, temperature=0)) for model, prompt in zip(models, prompts(setup, len(models)))]
    # warm-up: compiles the kernels for this batch and puts the deltas in their slots
    engine.generate([(model, prompt, SamplingParams(max_tokens=4, temperature=0)) for model, prompt, _ in requests])
    clock = StepClock()
    engine.observer = clock
    outputs: list[list] = [[] for _ in requests]
    first_tokens: dict[int, float] = {}  # seconds from the start to each request's first event (its first token)

    def emit(index: int, out) -> None:
        first_tokens.setdefault(index, time.perf_counter() - start)
        outputs[index].append(out)

    synchronize(setup.device)
    start = time.perf_counter()
    for index, (model, prompt, params) in enumerate(requests):
        engine.submit(model, prompt, params, functools.partial(emit, index))
    while engine.has_work():
        engine.step()
    clock.done()
    wall = time.perf_counter() - start
    engine.observer = EngineObserver()
    generated = sum(out[-1].completion_tokens for out in outputs)
    assert generated == len(requests) * setup.generate, "every request generates --generate tokens"
    return summary(list(first_tokens.values()), clock.decode_steps, len(requests), generated, wall, peak_memory(setup.device))


def run_bitdelta(setup: Setup, config, weights, tenants_of_requests: list[int], graphs: bool = True) -> dict:
    distinct = sorted(set(tenants_of_requests))
    reset_peak(setup.device)
    engine = build_engine(setup, config, weights, slots=len(distinct), batch=len(tenants_of_requests), graphs=graphs)
    serve_random_deltas(engine, distinct)
    try:
        result = run_engine(engine, setup, [f"ft{t}" for t in tenants_of_requests])
    finally:
        engine.stop()
    result["delta_gib"] = sum(linear.signs.nbytes + linear.scales.nbytes for linear in engine.model.linears.values()) / GiB
    result["kv_gib"] = engine.kv.keys.nbytes * 2 / GiB
    return result


def drop_delta_buffers(model) -> None:
    """Empty the sign and scale buffers of every delta linear of an engine's model, for the runs that
    never read them (base only, LoRA): the memory figure is then that of what the run serves."""
    for module in [*model.qkv, *model.gate_up, *model.linears.values()]:
        module.signs = module.signs.new_empty(model.max_slots, module.signs.shape[1], 0)
        module.scales = module.scales.new_empty(model.max_slots, 0)
    reset_peak(model.device)


def run_base(setup: Setup, config, weights, tenants_of_requests: list[int], graphs: bool = True) -> dict:
    reset_peak(setup.device)
    engine = build_engine(setup, config, weights, slots=0, batch=len(tenants_of_requests), graphs=graphs)
    drop_delta_buffers(engine.model)
    try:
        return run_engine(engine, setup, ["base"] * len(tenants_of_requests))
    finally:
        engine.stop()


# ---- naive: one dense model per fine-tune -------------------------------------------------------
class DenseTenants:
    """Fine-tunes as separate dense models: the first `resident` live on the GPU (fine-tune 0 is
    the base's own tensors, the others copies); any other is copied from pinned CPU memory into a
    staging set before it runs."""

    def __init__(self, config, weights, tenants: int, setup: Setup):
        self.model = model_over(config, weights)
        self.params = dict(self.model.named_parameters())
        per_model = model_bytes(weights)
        kv = tenants * kv_bytes(config, setup.kv_tokens)
        fits = tenants  # a CPU run (a smoke test of this script) never swaps
        if setup.device.type == "cuda":  # the base's tensors are already there; 4 GiB for activations
            fits = 1 + int((torch.cuda.mem_get_info()[0] - kv - 4 * GiB) // per_model)
        self.resident_count = min(tenants, fits)
        swapping = tenants > self.resident_count
        if swapping:
            self.resident_count -= 1  # one set of GPU tensors becomes the staging area
        self.sets = [weights] + [{n: t.clone() for n, t in weights.items()} for _ in range(self.resident_count - 1)]
        self.staging = {n: torch.empty_like(t) for n, t in weights.items()} if swapping else None
        self.host = host_copy(weights, setup.device.type == "cuda") if swapping else None

    def bind(self, model: int) -> None:
        if model < self.resident_count:
            source = self.sets[model]
        else:  # swap in: the whole model crosses PCIe
            for name, tensor in self.staging.items():
                tensor.copy_(self.host[name], non_blocking=True)
            source = self.staging
        for name, param in self.params.items():
            param.data = source[name]

    def forward(self, model: int, ids: torch.Tensor, cache):
        self.bind(model)
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)


_HOST_COPIES: dict[int, dict[str, torch.Tensor]] = {}


def host_copy(weights: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    """One (pinned) CPU copy of the model that swapped fine-tunes are read from; made once per run."""
    if id(weights) not in _HOST_COPIES:
        _HOST_COPIES[id(weights)] = {n: t.cpu().pin_memory() if pin else t.cpu() for n, t in weights.items()}
    return _HOST_COPIES[id(weights)]


def kv_bytes(config, tokens: int) -> int:
    return 2 * config.num_hidden_layers * tokens * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2


def time_decode_steps(decode_step, setup: Setup, start: float, max_seconds: float) -> list[float]:
    """Seconds of each of up to `generate - 1` calls of `decode_step`; once `max_seconds` have
    passed since `start` it stops after at least 2 (every step costs the same)."""
    steps = []
    for _ in range(setup.generate - 1):
        step_start = time.perf_counter()
        decode_step()
        synchronize(setup.device)
        steps.append(time.perf_counter() - step_start)
        if time.perf_counter() - start > max_seconds and len(steps) >= 2:
            break
    return steps


def run_naive(setup: Setup, config, weights, tenants_of_requests: list[int], max_seconds: float) -> dict:
    from transformers import DynamicCache

    reset_peak(setup.device)
    by_tenant: dict[int, list[int]] = {}
    for request, tenant in enumerate(tenants_of_requests):
        by_tenant.setdefault(tenant, []).append(request)
    groups = list(by_tenant.values())  # dense model i serves the requests groups[i]
    dense = DenseTenants(config, weights, len(groups), setup)
    ids = torch.tensor(prompts(setup, len(tenants_of_requests)), device=setup.device)
    with torch.no_grad():
        for model in range(min(2, len(groups))):  # warm-up
            dense.forward(model, ids[groups[model]][:, :8], DynamicCache(config=config))
        synchronize(setup.device)
        start = time.perf_counter()
        caches, tokens, first_tokens = [], [], []
        for model, requests in enumerate(groups):  # prefill, one fine-tune after another
            caches.append(DynamicCache(config=config))
            tokens.append(dense.forward(model, ids[requests], caches[model])[:, None])
            synchronize(setup.device)
            first_tokens += [time.perf_counter() - start] * len(requests)

        def decode_step() -> None:
            for model in range(len(groups)):
                tokens[model] = dense.forward(model, tokens[model], caches[model])[:, None]

        decode_steps = time_decode_steps(decode_step, setup, start, max_seconds)
    wall = time.perf_counter() - start
    generated = len(tenants_of_requests) * (1 + len(decode_steps))
    result = summary(first_tokens, decode_steps, len(tenants_of_requests), generated, wall, peak_memory(setup.device))
    result.update(resident_models=dense.resident_count, swapping=dense.staging is not None)
    return result


# ---- LoRA: batched per-row adapters in the same engine ------------------------------------------------
class LoraSlots:
    """Rank-r LoRA adapters in every slot of an engine's model, applied instead of its 1-bit deltas.

    Each delta linear computes the base product and adds, for the rows of each slot, that slot's
    adapter product (`lora_baseline`: two batched matmuls over the rows grouped by slot). q/k/v and
    gate/up, which the engine computes as one stacked product, share one shrink over their stacked A
    and expand into their own columns with their own B, as punica-style kernels do. Every fine-tune
    is served as an empty delta, which gives its requests a slot: the engine routes, batches, pages
    the KV cache and captures CUDA graphs exactly as it does for bitdelta. The slots' sign and scale
    buffers are dropped before the adapters are made, so the memory figure is the adapters'."""

    def __init__(self, model, rank: int):
        self.model, self.rank, self.slots = model, rank, model.max_slots
        self.groups: dict[tuple[int, ...], LoraGroups] = {}  # per composition; captured graphs read their tensors
        self.current = LoraGroups(0, 0)
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight name -> (A [S, r, K], B [S, N, r])
        self.bytes = 0
        self._names = {id(linear): name for name, linear in model.linears.items()}
        stacked = [*model.qkv, *model.gate_up]
        in_stacks = {id(part) for stack in stacked for part in stack.parts}
        singles = [linear for linear in model.linears.values() if id(linear) not in in_stacks]
        drop_delta_buffers(model)  # nothing reads them once the forwards are LoRA's
        for stack in stacked:
            self._wrap_stack(stack)
        for linear in singles:
            self._wrap_single(linear)
        route = model.route

        def routed(slots: torch.Tensor, plan) -> None:
            route(slots, plan)
            key = tuple(slots.tolist())
            if key not in self.groups:
                self.groups[key] = lora_groups(key, self.slots, model.device)
            self.current = self.groups[key]

        model.route = routed

    def _adapter(self, *shape: int) -> torch.Tensor:
        tensor = torch.empty(self.slots, *shape, dtype=self.model.dtype, device=self.model.device).normal_(0, 0.02)
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def _wrap_single(self, linear) -> None:
        a, b = self._adapter(self.rank, linear.in_features), self._adapter(linear.out_features, self.rank)
        self.adapters[self._names[id(linear)]] = a, b

        def forward(x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, linear.in_features)
            y = torch.nn.functional.linear(rows, linear.weight, linear.bias)
            if self.current.groups:
                lora_expand_(y, lora_shrink(rows, a, self.current), b, self.current)
            return y.reshape(*x.shape[:-1], linear.out_features)

        linear.forward = forward

    def _wrap_stack(self, stack) -> None:
        a = self._adapter(self.rank * len(stack.parts), stack.in_features)
        bs = [self._adapter(width, self.rank) for width in stack.widths]
        for index, (part, b) in enumerate(zip(stack.parts, bs)):
            self.adapters[self._names[id(part)]] = a[:, index * self.rank:(index + 1) * self.rank], b
        bias = None if all(p.bias is None for p in stack.parts) else torch.cat(
            [p.bias.detach() if p.bias is not None else p.weight.new_zeros(p.out_features) for p in stack.parts])

        def forward(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            rows = x.reshape(-1, stack.in_features)
            outs = torch.nn.functional.linear(rows, stack.weight, bias).split(stack.widths, dim=1)
            if self.current.groups:
                h = lora_shrink(rows, a, self.current)
                for index, (out, b) in enumerate(zip(outs, bs)):
                    lora_expand_(out, h[..., index * self.rank:(index + 1) * self.rank], b, self.current)
            return tuple(out.reshape(*x.shape[:-1], width) for out, width in zip(outs, stack.widths))

        stack.forward = forward


def run_lora(setup: Setup, config, weights, tenants_of_requests: list[int], rank: int) -> dict:
    distinct = sorted(set(tenants_of_requests))
    reset_peak(setup.device)
    engine = build_engine(setup, config, weights, slots=len(distinct), batch=len(tenants_of_requests))
    try:
        adapters = LoraSlots(engine.model, rank)
        for tenant in distinct:
            engine.store.add(f"ft{tenant}", SlotWeights({}, {}, {}))
        result = run_engine(engine, setup, [f"ft{t}" for t in tenants_of_requests])
    finally:
        engine.stop()
    result["adapter_gib"] = adapters.bytes / len(distinct) / GiB
    return result


# ---- profile ------------------------------------------------------------------------------------------
def profile_decode(setup: Setup, config, weights, tenants: int, graphs: bool, steps: int = 5) -> str:
    """Where a bitdelta decode step's time goes: torch.profiler over `steps` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    engine = build_engine(setup, config, weights, slots=tenants, batch=tenants, graphs=graphs)
    serve_random_deltas(engine, list(range(tenants)))
    for tenant, prompt in enumerate(prompts(setup, tenants)):
        engine.submit(f"ft{tenant}", prompt, SamplingParams(max_tokens=steps + 4, temperature=0), lambda _: None)
    for _ in range(3):  # prefill, then two decode steps: the second captures the graph
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    synchronize(setup.device)
    start = time.perf_counter()
    with profile(activities=activities) as trace:
        for _ in range(steps):
            engine.step()
        synchronize(setup.device)
    wall = (time.perf_counter() - start) / steps
    averages = trace.key_averages()
    gpu_busy = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e3 / steps
    sort = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    head = (f"bitdelta decode, N = B = {tenants}, {'CUDA graphs' if graphs else 'eager'}, {steps} steps under the profiler: "
            f"{wall * 1e3:.2f} ms a step wall, {gpu_busy:.2f} ms a step of GPU kernel time ({gpu_busy / (wall * 1e3):.0%} busy)\n\n")
    return head + averages.table(sort_by=sort, row_limit=20) + "\n"


# ---- report ---------------------------------------------------------------------------------------------
def systems_of(row: dict) -> list[str]:
    """The systems a row measured, in the report's order: naive, LoRA by rank, bitdelta and base."""
    loras = sorted((k for k in row if k.startswith("lora-r")), key=lambda k: int(k.removeprefix("lora-r")))
    return [k for k in ("naive", *loras, "bitdelta-eager", "base-eager", "bitdelta", "base") if k in row]


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"# End-to-end multi-tenant decoding ({setup['shape']}, {setup['dtype']}, {result['device']})",
        "",
        f"`{REPRODUCE}` — B = N requests, one per fine-tune (Zipf row: B = 64 over 64 fine-tunes), {setup['prompt']}-token prompts, "
        f"{setup['generate']} generated tokens, greedy. Decode ms = per-step time of decode steps (median / p99); decode tok/s = B / median step; "
        "e2e tok/s = generated tokens / wall time incl. prefill; TTFT = median over requests. Memory = peak GPU memory allocated. "
        f"Model: {result['model_gib']:.2f} GiB fp16" + (f"; one delta {result['delta_gib_each']:.3f} GiB (1/{result['model_gib'] / result['delta_gib_each']:.1f} of the model)." if "delta_gib_each" in result else "."),
        "",
        "| N | system | memory GiB | TTFT ms | decode ms median | p99 | decode tok/s | e2e tok/s | steps timed | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for system in systems_of(row):
            r = row.get(system)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {row['label']} | {system} | | | | | | | | {r['error']} |")
                continue
            note = ""
            if system == "naive":
                note = f"{r['resident_models']} on the GPU" + (", the rest swapped from CPU" if r["swapping"] else "")
            elif system.startswith("lora"):
                note = f"adapters {r['adapter_gib']:.2f} GiB a fine-tune"
            lines.append(
                f"| {row['label']} | {system} | {r['memory_gib']:.1f} | {r['ttft_ms']:.0f} | {r['decode_ms_median']:.1f} | {r['decode_ms_p99']:.1f} | "
                f"{r['decode_tokens_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['steps']} | {note} |"
            )
    calls = sorted({(row.get("call", "?"), row.get("device", result["device"])) for row in result["rows"]})
    if len(calls) > 1:
        lines += ["", "Rows were measured in separate calls (each row holds its own baselines, measured side by side in its call): "
                  + "; ".join(f"{call} on {device}: N = {', '.join(r['label'] for r in result['rows'] if r.get('call') == call)}" for call, device in calls) + "."]
    lines += ["", "## Against the goals", ""] + [f"- {line}" for line in result["goals"]]
    lines += ["", "![memory and decode latency against N](e2e.png)", "",
              "Where a step's time goes (bitdelta at N = 32, eager and with CUDA graphs): e2e_profile.txt; read in README.md."]
    return "\n".join(lines) + "\n"


def goals(result: dict) -> list[str]:
    row = next((r for r in result["rows"] if r["label"] == "32"), None)
    if row is None or "bitdelta" not in row:
        return ["N = 32 was not run"]
    bd, base, naive = row["bitdelta"], row["base"], row.get("naive")
    out = []
    if naive and "error" not in naive:
        ratio = bd["decode_tokens_per_s"] / naive["decode_tokens_per_s"]
        out.append(f"N = 32 decode throughput >= 10x naive: {ratio:.1f}x ({'met' if ratio >= 10 else 'not met'})")
    ratio = bd["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    out.append(f"N = 32 decode throughput >= 0.6x base only: {ratio:.2f}x ({'met' if ratio >= 0.6 else 'not met'})")
    for system in systems_of(row):
        lora = row[system] if system.startswith("lora") else None
        if lora and "error" not in lora:
            out.append(f"N = 32 decode throughput against batched LoRA {system.removeprefix('lora-')}: "
                       f"{bd['decode_tokens_per_s'] / lora['decode_tokens_per_s']:.2f}x, memory {bd['memory_gib']:.1f} against "
                       f"{lora['memory_gib']:.1f} GiB")
    setup = result["setup"]
    kv_read = bd["kv_gib"] * (setup["prompt"] + setup["generate"] / 2) / (setup["prompt"] + setup["generate"])  # mean context of a decode step
    deltas = row["distinct"] * result["delta_gib_each"]
    base_bytes, bitdelta_bytes = result["model_gib"] + kv_read, result["model_gib"] + kv_read + deltas
    out.append(f"bytes a decode step reads at N = 32: base {result['model_gib']:.1f} GiB + KV ~{kv_read:.1f} GiB, plus {deltas:.1f} GiB of delta bits for bitdelta: "
               f"at the memory floor bitdelta/base throughput = {base_bytes / bitdelta_bytes:.2f}x; measured steps are {bd['decode_ms_median'] / base['decode_ms_median']:.2f}x apart")
    budget = result["model_gib"] + 32 * result["model_gib"] / 14 + bd["kv_gib"]
    out.append(f"N = 32 memory under base + 32 x model/14 + KV cache = {budget:.1f} GiB: {bd['memory_gib']:.1f} GiB ({'met' if bd['memory_gib'] < budget else 'not met'})")
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["label"].isdigit()]  # N fine-tunes, one request each
    figure, (memory, latency) = plt.subplots(1, 2, figsize=(11, 4))
    loras = sorted({k for r in rows for k in r if k.startswith("lora-r")}, key=lambda k: int(k.removeprefix("lora-r")))
    for system, style in (("naive", "o-"), *((lora, "^-") for lora in loras), ("bitdelta", "s-"), ("base", "k--")):
        points = [(r["n"], r[system]) for r in rows if system in r and "error" not in r[system]]
        if not points:
            continue
        ns = [n for n, _ in points]
        memory.plot(ns, [p["memory_gib"] for _, p in points], style, label=system)
        latency.plot(ns, [p["decode_ms_median"] for _, p in points], style, label=system)
    for axis, title in ((memory, "GPU memory (GiB)"), (latency, "decode latency per token (ms, median)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("fine-tunes served at once (N = batch)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    latency.set_yscale("log")
    memory.legend()
    figure.suptitle(f"{result['setup']['shape']} fp16, {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write(result: dict, folder: Path) -> None:
    result["goals"] = goals(result)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / "e2e.md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b")
    parser.add_argument("--tenants", default="1,2,4,8,16,32,64")
    parser.add_argument("--zipf", type=int, default=64, help="B = fine-tunes of the Zipf row (0: skip)")
    parser.add_argument("--busy", type=int, default=0,
                        help="a row of B requests of one fine-tune, which takes the few-delta kernels (0: skip)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=128)
    parser.add_argument("--systems", default="naive,lora,bitdelta,eager",
                        help="bitdelta includes base only; lora: batched LoRA at each --lora-ranks; eager: bitdelta and base again "
                             "without CUDA graphs")
    parser.add_argument("--lora-ranks", default=",".join(map(str, LORA_RANKS)))
    parser.add_argument("--max-seconds", type=float, default=6, help="naive: stop timing decode steps after this long (at least 2)")
    parser.add_argument("--profile-tenants", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true", help="rewrite e2e.md and e2e.png from --out's e2e.json, measuring nothing")
    parser.add_argument("--append", action="store_true", help="keep the rows of --out's e2e.json that this run does not measure (a run split over calls)")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads((args.out / "e2e.json").read_text())
        write(result, args.out)
        plot(result, args.out / "e2e.png")
        return

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    device = torch.device(args.device)
    setup = Setup(args.shape, args.prompt, args.generate, device, torch.float16 if device.type == "cuda" else torch.float32)
    config = llama_config(args.shape)
    weights = random_weights(config, device, setup.dtype)
    systems = set(args.systems.split(","))
    result = {
        "command": f"{REPRODUCE} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "device")),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup": {"shape": args.shape, "prompt": args.prompt, "generate": args.generate, "dtype": str(setup.dtype).removeprefix("torch.")},
        "model_gib": model_bytes(weights) / GiB,
        "rows": [],
    }
    earlier = json.loads((args.out / "e2e.json").read_text()) if args.append and (args.out / "e2e.json").is_file() else None
    cases = [(str(n), n, list(range(n))) for n in map(int, args.tenants.split(","))]
    if args.zipf:
        cases.append(("zipf", args.zipf, zipf_tenants(args.zipf, args.zipf)))
    if args.busy:
        cases.append(("busy", args.busy, [0] * args.busy))
    if earlier is not None:
        measuring = {label for label, _, _ in cases}
        result["rows"] = [row for row in earlier["rows"] if row["label"] not in measuring]
        result["delta_gib_each"] = earlier.get("delta_gib_each")
        result["command"] = f"{earlier['command']} ; {result['command']}"
    for label, n, tenants_of_requests in cases:
        row = {"label": label, "n": n, "distinct": len(set(tenants_of_requests)), "device": result["device"], "call": started}
        runs = [("naive", functools.partial(run_naive, max_seconds=args.max_seconds))] if "naive" in systems else []
        if "lora" in systems:
            runs += [(f"lora-r{rank}", functools.partial(run_lora, rank=int(rank))) for rank in args.lora_ranks.split(",")]
        for system, run in runs:
            try:
                row[system] = run(setup, config, weights, tenants_of_requests)
            except torch.OutOfMemoryError as error:
                row[system] = {"error": f"out of GPU memory ({str(error).splitlines()[0][:80]})"}
            reset_peak(device)
        if "bitdelta" in systems:
            row["bitdelta"] = run_bitdelta(setup, config, weights, tenants_of_requests)
            row["base"] = run_base(setup, config, weights, tenants_of_requests)
            result["delta_gib_each"] = row["bitdelta"]["delta_gib"] / row["distinct"]
        if "eager" in systems:  # the same engine issuing every kernel from Python
            row["bitdelta-eager"] = run_bitdelta(setup, config, weights, tenants_of_requests, graphs=False)
            row["base-eager"] = run_base(setup, config, weights, tenants_of_requests, graphs=False)
        result["rows"].append(row)
        result["rows"].sort(key=lambda r: (not r["label"].isdigit(), r["label"] == "zipf", r["n"]))
        print(json.dumps(row), flush=True)
        reset_peak(device)
        write(result, args.out)  # after every row: a run cut short keeps what it measured
    print(markdown(result))
    plot(result, args.out / "e2e.png")
    if args.profile_tenants and "bitdelta" in systems:
        report = [profile_decode(setup, config, weights, args.profile_tenants, graphs) for graphs in (False, True)]
        (args.out / "e2e_profile.txt").write_text("\n\n".join(report))


if __name__ == "__main__":
    main()
