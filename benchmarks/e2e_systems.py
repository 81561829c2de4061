"""The systems `python -m benchmarks.e2e` compares, one runner each (naive dense models, batched LoRA,
bitdelta, base only; what each is: benchmarks/e2e.py's docstring), and how their steps are timed."""

from __future__ import annotations

import functools
import gc
import statistics
import time
from pathlib import Path

import torch

from benchmarks.e2e_models import GiB, Setup, model_bytes, model_over, prompts, serve_random_deltas
from benchmarks.lora_baseline import LoraGroups, lora_expand_, lora_groups, lora_shrink
from bitdelta.engine import Engine, EngineConfig, EngineObserver, SamplingParams
from bitdelta.engine.model import SlotWeights


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
def build_engine(setup: Setup, config, weights, slots: int, batch: int, graphs: bool = True, base_quant: str | None = None) -> Engine:
    """An engine over `weights` in memory, or over the checkpoint folder `weights` names (tensor
    parallel: each rank loads its share from the files)."""
    blocks_per_sequence = -(-setup.kv_tokens // 16)
    engine_config = EngineConfig(
        max_batch=batch, max_gpu_deltas=max(1, slots), max_cpu_deltas=1, kv_block_size=16, kv_blocks=batch * blocks_per_sequence,
        prefill_chunk=batch * setup.prompt,  # every prompt in the first step: later steps are pure decode
        cuda_graphs=graphs, base_quant=base_quant, tensor_parallel=setup.tensor_parallel,
        device=setup.device.type, dtype=str(setup.dtype).removeprefix("torch."),
    )
    if isinstance(weights, Path):
        engine = Engine(weights, engine_config, base_name="base")  # the name from_model gives it
        # each rank moved its share to its GPU a layer at a time, quantizing each: memory counts from the built engine
        reset_peak(setup.device)
        return engine
    return Engine.from_model(model_over(config, weights), engine_config)


def without_own_copy(result: dict, engine: Engine, weights: dict[str, torch.Tensor]) -> dict:
    """A quantized-base run's memory less the fp16 linears the benchmark itself keeps for the other
    systems (the engine holds them quantized and no longer reads them); none kept for an engine over
    a checkpoint folder."""
    if isinstance(weights, Path):
        return result
    storages = {weights[name].untyped_storage().data_ptr(): weights[name].untyped_storage().nbytes() for name in engine.model.linears}
    kept = sum(storages.values()) / GiB  # views of one tensor (stacked parts, shared layers) counted once
    if not result["memory_gib"]:  # not measured (on a CPU)
        return result
    return result | {"memory_gib": result["memory_gib"] - kept, "memory_note": f"peak less the benchmark's fp16 linears ({kept:.1f} GiB)"}


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


def run_bitdelta(setup: Setup, config, weights, tenants_of_requests: list[int], graphs: bool = True, base_quant: str | None = None) -> dict:
    distinct = sorted(set(tenants_of_requests))
    reset_peak(setup.device)
    engine = build_engine(setup, config, weights, slots=len(distinct), batch=len(tenants_of_requests), graphs=graphs, base_quant=base_quant)
    serve_random_deltas(engine, distinct, weights if isinstance(weights, Path) else None, base_quant)
    try:
        result = run_engine(engine, setup, [f"ft{t}" for t in tenants_of_requests])
    finally:
        engine.stop()
    if base_quant is not None:
        result = without_own_copy(result, engine, weights)
    result["delta_gib"] = sum(linear.signs.nbytes + linear.scales.nbytes for linear in engine.model.linears.values()) / GiB
    result["kv_gib"] = engine.kv.keys.nbytes * 2 / GiB
    return result


def drop_delta_buffers(model) -> None:
    """Empty the sign and scale buffers of every delta linear of an engine's model, for the runs that
    never read them (base only, LoRA): the memory figure is then that of what the run serves."""
    for module in [*model.qkv, *filter(None, model.gate_up), *model.linears.values()]:
        module.signs = module.signs.new_empty(model.max_slots, module.signs.shape[1], 0)
        module.scales = module.scales.new_empty(model.max_slots, 0)
    reset_peak(model.device)


def run_base(setup: Setup, config, weights, tenants_of_requests: list[int], graphs: bool = True, base_quant: str | None = None) -> dict:
    reset_peak(setup.device)
    engine = build_engine(setup, config, weights, slots=0, batch=len(tenants_of_requests), graphs=graphs, base_quant=base_quant)
    drop_delta_buffers(engine.model)
    try:
        result = run_engine(engine, setup, ["base"] * len(tenants_of_requests))
    finally:
        engine.stop()
    return result if base_quant is None else without_own_copy(result, engine, weights)


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
        self._generator = torch.Generator(model.device).manual_seed(0)  # the same adapters every run
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
        tensor = torch.empty(self.slots, *shape, dtype=self.model.dtype, device=self.model.device).normal_(0, 0.02, generator=self._generator)
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
