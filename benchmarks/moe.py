"""Multi-tenant decode of a mixture-of-experts model: Qwen3-30B-A3B's layer shapes with random
weights, N fine-tunes served at once (B = N requests, one per fine-tune), against base only and
against one dense model per fine-tune, beside the byte floor of each step.

    python -m benchmarks.moe [--tenants 1,8,32] [--layers auto] [--shape qwen3-30b-a3b|tiny]

The model keeps Qwen3-30B-A3B's layers (128 experts, 8 routed per token, hidden 2048) but only as
many of them as fit on the GPU beside 32 deltas (`--layers auto`; the table says how many). The
floor is the bytes a step must read (attention weights, the router, the experts the batch routes
to, each distinct routed (expert, fine-tune) delta and each fine-tune's attention delta, the
lm_head, the KV cache) over the copy bandwidth measured in the same run. One dense model per
fine-tune is N merged models decoding one request each: N times the measured base step at B = 1,
and N times the model's memory (which does not fit beyond one).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import write_report
from bitdelta.engine import Engine, EngineConfig, EngineObserver, SamplingParams
from bitdelta.engine.model import SlotWeights
from bitdelta.pack import packed_words

SHAPES = {  # hidden, moe intermediate, experts, routed, heads, kv heads, head dim, vocab, layers of the real model
    "qwen3-30b-a3b": (2048, 768, 128, 8, 32, 4, 128, 151936, 48),
    "tiny": (64, 32, 8, 2, 4, 2, 16, 256, 2),
}
DISTINCT_DELTAS = 4  # random deltas made, shared round-robin by the fine-tunes (each still gets its own slot)
GiB = 2**30


def moe_config(shape: str, layers: int):
    from transformers import Qwen3MoeConfig

    hidden, intermediate, experts, routed, heads, kv_heads, head_dim, vocab, _ = SHAPES[shape]
    return Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=routed,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                          num_hidden_layers=layers, decoder_sparse_step=1, max_position_embeddings=4096, tie_word_embeddings=False)


def layer_bytes(config, dtype: torch.dtype) -> tuple[int, int]:
    """(base bytes, one delta's bytes) of one decoder layer of `config`."""
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        layer = Qwen3MoeForCausalLM(config).model.layers[0]
    size = torch.finfo(dtype).bits // 8
    matrices = [p for name, p in layer.named_parameters() if p.ndim >= 2 and "gate.weight" not in name]  # the router stays whole
    base = sum(p.numel() for p in layer.parameters()) * size
    delta = sum(p.numel() // p.shape[-1] * (packed_words(p.shape[-1]) * 4 + 4) for p in matrices)
    return base, delta


def layers_that_fit(shape: str, dtype: torch.dtype, deltas: int, device: torch.device) -> int:
    """Decoder layers that fit beside `deltas` deltas, the embeddings and lm_head, leaving 10% free."""
    config = moe_config(shape, 1)
    base, delta = layer_bytes(config, dtype)
    if device.type != "cuda":
        return SHAPES[shape][-1]
    free = torch.cuda.mem_get_info(device)[0] * 0.9 - 2 * config.vocab_size * config.hidden_size * torch.finfo(dtype).bits // 8
    return max(1, min(SHAPES[shape][-1], int(free // (base + deltas * delta))))


def random_model(config, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0, 0.02, generator=generator)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def random_deltas(engine: Engine, count: int) -> list[SlotWeights]:
    """`count` random deltas in the slot layout: every attention linear and every expert matrix,
    under the checkpoint's per-expert names."""
    model = engine.model
    shapes = [(name, tuple(linear.signs.shape[1:])) for name, linear in model.linears.items()]
    for index, layer in model.experts.items():
        experts, rows, k = layer.shapes["gate_up_proj"]
        for expert in range(experts):
            prefix = f"model.layers.{index}.mlp.experts.{expert}"
            shapes += [(f"{prefix}.gate_proj.weight", (rows // 2, packed_words(k))), (f"{prefix}.up_proj.weight", (rows // 2, packed_words(k))),
                       (f"{prefix}.down_proj.weight", (k, packed_words(rows // 2)))]
    pin = model.device.type == "cuda"
    deltas = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        signs, scales = {}, {}
        for name, shape in shapes:
            words = torch.randint(0, 256, (*shape[:-1], shape[-1] * 4), dtype=torch.uint8, generator=generator).view(torch.int32)
            scale = torch.rand(shape[0], generator=generator) * 2e-3
            signs[name], scales[name] = (words.pin_memory(), scale.pin_memory()) if pin else (words, scale)
        deltas.append(SlotWeights(signs, scales, {}))
    return deltas


class StepRecorder(EngineObserver):
    """Decode step times (while `timing`), and the routing of each MoE layer in eagerly run decode
    steps (a replayed CUDA graph runs no Python)."""

    def __init__(self, engine: Engine):
        self.timing = True
        self.steps: list[float] = []
        self.routes: list[list[tuple[int, int]]] = []  # per decode step, per layer: (distinct experts, distinct (expert, slot) pairs)
        self._pending: list[tuple[int, int]] = []
        self._last, self._decode = None, False
        self._layers = list(engine.model.experts.values())
        for layer in self._layers:
            layer.forward = self._recording(layer.forward, layer.top_k)

    def detach(self) -> None:
        for layer in self._layers:
            del layer.forward  # the class's forward again

    def _recording(self, forward, top_k: int):
        def recorded(x, slots, router_logits):
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return forward(x, slots, router_logits)
            chosen = torch.topk(router_logits.float(), top_k, dim=-1).indices
            pairs = chosen * (slots.max().item() + 2) + (slots[:, None] + 1)
            self._pending.append((chosen.unique().numel(), pairs.unique().numel()))
            return forward(x, slots, router_logits)
        return recorded

    def step(self, sequences, deltas, prefill_tokens, decode_tokens) -> None:
        """Called after each step with its composition: the interval since the last call is this
        step, timed when the step before was a decode step too (no prefill work in the interval)."""
        now = time.perf_counter()
        decoding = prefill_tokens == 0 and decode_tokens > 0
        if self.timing and self._last is not None and self._decode and decoding:
            self.steps.append(now - self._last)
        if decoding and self._pending:
            self.routes.append(self._pending)
        self._pending = []
        self._last, self._decode = now, decoding


def decode(engine: Engine, models: list[str], prompt: int, generate: int, vocab: int) -> tuple[float, StepRecorder]:
    """Median decode step (s) of B = len(models) requests, and what the recorder saw."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, vocab, (len(models), prompt), generator=generator).tolist()
    engine.generate([(model, ids, SamplingParams(max_tokens=2, temperature=0)) for model, ids in zip(models, prompts)])  # warm-up
    recorder = StepRecorder(engine)
    engine.observer = recorder
    engine.generate([(model, ids, SamplingParams(max_tokens=generate, temperature=0)) for model, ids in zip(models, prompts)])
    recorder.timing = False  # the routing of decode steps, run eagerly (untimed)
    graphs, engine.graphs = engine.graphs, None
    engine.generate([(model, ids, SamplingParams(max_tokens=8, temperature=0)) for model, ids in zip(models, prompts)])
    engine.graphs = graphs
    engine.observer = EngineObserver()
    recorder.detach()
    return statistics.median(recorder.steps), recorder


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy (read + write), median of 20."""
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(2**28, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.nbytes / statistics.median(times)


def floor_bytes(engine: Engine, recorder: StepRecorder, batch: int, tenants: int, context: int) -> float:
    """Bytes one decode step must read, from the routing the recorder saw (mean over its steps)."""
    model = engine.model
    size = model.param.element_size()
    layer = next(iter(model.experts.values()))
    experts, rows, k = layer.shapes["gate_up_proj"]
    expert_base = (rows * k + k * (rows // 2)) * size
    expert_delta = rows * (packed_words(k) * 4 + 4) + k * (packed_words(rows // 2) * 4 + 4)
    routed = statistics.mean(sum(e * expert_base + p * expert_delta for e, p in step) for step in recorder.routes)
    attention = sum(linear.weight.nbytes for linear in model.linears.values())
    attention_delta = sum(linear.signs[0].nbytes + linear.scales[0].nbytes for linear in model.linears.values())
    routers = sum(layer.router.nbytes for layer in model.experts.values())
    head = model.model.lm_head.weight.nbytes
    kv = 2 * len(model.layers) * batch * context * model.kv_heads * model.head_dim * size
    return routed + attention + tenants * attention_delta + routers + head + kv


def run(shape: str, tenant_counts: list[int], layers: int | None, prompt: int, generate: int, device: torch.device, dtype: torch.dtype) -> dict:
    most = max(tenant_counts)
    layers = layers or layers_that_fit(shape, dtype, most, device)
    config = moe_config(shape, layers)
    model = random_model(config, device, dtype)
    model_bytes = sum(p.nbytes for p in model.parameters())
    engine = Engine.from_model(model, EngineConfig(max_batch=most, max_gpu_deltas=most, max_cpu_deltas=1, kv_block_size=16,
                                                   kv_blocks=most * -(-(prompt + generate) // 16), prefill_chunk=most * prompt))
    deltas = random_deltas(engine, DISTINCT_DELTAS)
    for tenant in range(most):
        engine.store.add(f"ft{tenant}", deltas[tenant % len(deltas)])
    bandwidth = copy_bandwidth(device)
    base = engine.store.names()[0]
    rows = []
    single, _ = decode(engine, [base], prompt, generate, config.vocab_size)
    for tenants in tenant_counts:
        ours, recorder = decode(engine, [f"ft{t}" for t in range(tenants)], prompt, generate, config.vocab_size)
        base_only, _ = decode(engine, [base] * tenants, prompt, generate, config.vocab_size)
        floor = floor_bytes(engine, recorder, tenants, tenants, prompt + generate // 2)
        mean_experts = statistics.mean(e for step in recorder.routes for e, _ in step)
        rows.append(dict(tenants=tenants, bitdelta_ms=ours * 1e3, base_ms=base_only * 1e3, dense_per_finetune_ms=tenants * single * 1e3,
                         floor_ms=floor / bandwidth * 1e3, floor_gib=floor / GiB, experts_routed=mean_experts,
                         dense_per_finetune_gib=tenants * model_bytes / GiB))
    engine.stop()
    return dict(shape=shape, layers=layers, of_layers=SHAPES[shape][-1], dtype=str(dtype).removeprefix("torch."),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", bandwidth_gbs=bandwidth / 1e9,
                model_gib=model_bytes / GiB, prompt=prompt, generate=generate, rows=rows,
                measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def table(result: dict) -> str:
    lines = [
        f"# Multi-tenant MoE decode ({result['shape']} layers, {result['layers']} of {result['of_layers']}, {result['dtype']}, {result['device']})",
        "",
        f"`python -m benchmarks.moe` — B = N requests, one per fine-tune, {result['prompt']}-token prompts, decode step medians over "
        f"{result['generate']} tokens. Model {result['model_gib']:.1f} GiB; copy bandwidth {result['bandwidth_gbs']:.0f} GB/s measured in the run. "
        "Dense per fine-tune: N x the measured base step at B = 1 (N merged models, one request each), N x the model's memory.",
        "",
        "| N | experts routed a layer | bitdelta ms | base only ms | floor ms (GiB) | bitdelta / floor | dense per fine-tune ms (GiB) | dense / bitdelta |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['tenants']} | {row['experts_routed']:.1f} | {row['bitdelta_ms']:.1f} | {row['base_ms']:.1f} | "
                     f"{row['floor_ms']:.2f} ({row['floor_gib']:.2f}) | {row['bitdelta_ms'] / row['floor_ms']:.1f}x | "
                     f"{row['dense_per_finetune_ms']:.1f} ({row['dense_per_finetune_gib']:.0f}) | {row['dense_per_finetune_ms'] / row['bitdelta_ms']:.1f}x |")
    lines += ["", f"Measured {result['measured']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--tenants", default="1,8,32")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: as many as fit beside the deltas)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--generate", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = run(args.shape, [int(n) for n in args.tenants.split(",")], args.layers, args.prompt, args.generate, device, dtype)
    write_report(args.out, "moe", result, table(result))


if __name__ == "__main__":
    main()
