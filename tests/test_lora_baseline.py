"""benchmarks/lora_baseline.py: batched LoRA (two batched matmuls over rows grouped by slot) is
each row's own adapter applied alone."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lora_baseline import apply_lora, lora_expand_, lora_groups, lora_linear, lora_shrink

K, N, RANK, SLOTS = 48, 40, 8, 5


def per_row(x, weight, a, b, slot_ids, bias=None):
    """The definition: one row at a time, its slot's adapter alone."""
    rows = []
    for row, slot in zip(x, slot_ids):
        y = weight @ row + (0 if bias is None else bias)
        if slot >= 0:
            y = y + b[slot] @ (a[slot] @ row)
        rows.append(y)
    return torch.stack(rows)


def random_case(slot_ids, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slot_ids), K, generator=generator)
    weight = torch.randn(N, K, generator=generator)
    a = torch.randn(SLOTS, RANK, K, generator=generator)
    b = torch.randn(SLOTS, N, RANK, generator=generator)
    return x, weight, a, b


BATCHES = {
    "every row its own slot, in order": [0, 1, 2, 3, 4],
    "one slot for the batch": [0] * 7,
    "equal runs in slot order": [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4],
    "shuffled, base-only rows, a slot unused": [3, -1, 0, 3, 3, 1, -1, 0, 3],
    "every row on the base": [-1, -1, -1],
}


@pytest.mark.parametrize("slot_ids", BATCHES.values(), ids=BATCHES.keys())
def test_batched_lora_matches_a_loop_over_rows(slot_ids):
    x, weight, a, b = random_case(slot_ids)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(1))
    got = lora_linear(x, weight, a, b, lora_groups(slot_ids, SLOTS), bias)
    torch.testing.assert_close(got, per_row(x, weight, a, b, slot_ids, bias), rtol=1e-5, atol=1e-4)


def test_rows_in_equal_runs_of_every_slot_are_viewed_not_gathered():
    assert lora_groups([0, 0, 1, 1, 2, 2], 3).rows is None
    assert lora_groups([0, 1, 2], 3).rows is None
    assert lora_groups([1, 1, 0, 0, 2, 2], 3).rows is not None  # out of slot order
    assert lora_groups([0, 0, 1], 2).rows is not None  # unequal runs
    assert lora_groups([0, 0, 1, 1], 3).rows is not None  # a slot without rows


def test_stacked_parts_share_one_shrink_and_expand_into_column_slices():
    # q/k/v-style: one A stacked along r for the parts, each part's own B into its columns of y
    slot_ids = [2, 0, 2, 1, -1, 0]
    x, weight, a, b = random_case(slot_ids)
    b2 = torch.randn(SLOTS, 24, RANK, generator=torch.Generator().manual_seed(2))
    a2 = torch.randn(SLOTS, RANK, K, generator=torch.Generator().manual_seed(3))
    weight2 = torch.randn(24, K, generator=torch.Generator().manual_seed(4))
    groups = lora_groups(slot_ids, SLOTS)
    y = x @ torch.cat([weight, weight2]).T
    h = lora_shrink(x, torch.cat([a, a2], dim=1), groups)
    lora_expand_(y[:, :N], h[..., :RANK], b, groups)
    lora_expand_(y[:, N:], h[..., RANK:], b2, groups)
    torch.testing.assert_close(y[:, :N], per_row(x, weight, a, b, slot_ids), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y[:, N:], per_row(x, weight2, a2, b2, slot_ids), rtol=1e-5, atol=1e-4)


def test_apply_lora_adds_in_place():
    slot_ids = [0, 1, 2, 3, 4]
    x, weight, a, b = random_case(slot_ids)
    y = x @ weight.T
    assert apply_lora(y, x, a, b, lora_groups(slot_ids, SLOTS)) is y


def serve_with_lora(device: str, dtype: torch.dtype, graphs: bool):
    """benchmarks/e2e.py's LoRA system on the tiny Llama: 3 fine-tunes, 4 requests, greedy."""
    from benchmarks import e2e_models, e2e_systems
    from bitdelta.engine import SamplingParams
    from bitdelta.engine.model import SlotWeights

    config = e2e_models.llama_config("tiny")
    setup = e2e_models.Setup("tiny", prompt=8, generate=4, device=torch.device(device), dtype=dtype)
    weights = e2e_models.random_weights(config, setup.device, setup.dtype)
    engine = e2e_systems.build_engine(setup, config, weights, slots=3, batch=4, graphs=graphs)
    lora = e2e_systems.LoraSlots(engine.model, rank=4)
    for _, b in lora.adapters.values():
        b.mul_(40)  # large enough that every fine-tune generates its own tokens
    for tenant in range(3):
        engine.store.add(f"ft{tenant}", SlotWeights({}, {}, {}))
    tenants = [0, 1, 2, 1]
    prompts = e2e_models.prompts(setup, len(tenants))
    params = SamplingParams(max_tokens=setup.generate, temperature=0)
    requests = [(f"ft{t}", prompt, params) for t, prompt in zip(tenants, prompts)]
    engine.generate(requests)  # a first pass: on a GPU the decode compositions are captured by the second
    outputs = engine.generate(requests)
    generated = [[token for out in events for token in out.token_ids] for events in outputs]
    slots = [engine.store.get(f"ft{t}").slot for t in tenants]
    engine.stop()
    return e2e_models, config, weights, lora, prompts, slots, generated, engine


def assert_merged_models_generate(e2e_models, config, weights, lora, prompts, slots, generated):
    for prompt, slot, tokens in zip(prompts, slots, generated):
        merged = dict(weights)
        for name, (a, b) in lora.adapters.items():
            merged[name] = weights[name] + b[slot] @ a[slot]
        model = e2e_models.model_over(config, merged)
        ids = torch.tensor([prompt], device=next(iter(weights.values())).device)
        with torch.no_grad():
            for _ in range(len(tokens)):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert tokens == ids[0, len(prompt):].tolist()
    assert len({tuple(tokens) for tokens in generated[:3]}) > 1  # the adapters changed what is generated


def test_the_e2e_lora_engine_serves_each_request_with_its_own_adapter():
    """Each request generates what its fine-tune's merged model W + B A generates."""
    e2e_models, config, weights, lora, prompts, slots, generated, _ = serve_with_lora("cpu", torch.float32, graphs=False)
    assert_merged_models_generate(e2e_models, config, weights, lora, prompts, slots, generated)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_e2e_lora_engine_on_the_gpu():
    """fp32 eager: each request equals its merged model; fp16 with decode steps replayed as CUDA
    graphs: the same tokens as without graphs (the groups a graph captured stay alive)."""
    assert_merged_models_generate(*serve_with_lora("cuda", torch.float32, graphs=False)[:-1])
    *_, eager, _ = serve_with_lora("cuda", torch.float16, graphs=False)
    *_, replayed, engine = serve_with_lora("cuda", torch.float16, graphs=True)
    assert engine.graphs.replays > 0
    assert replayed == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("slot_ids", BATCHES.values(), ids=BATCHES.keys())
def test_batched_lora_in_bf16_replays_in_a_cuda_graph(slot_ids):
    x, weight, a, b = (t.cuda().bfloat16() for t in random_case(slot_ids))
    groups = lora_groups(slot_ids, SLOTS, "cuda")
    static = x.clone()
    lora_linear(static, weight, a, b, groups)  # outside capture: cuBLAS picks its workspace
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_linear(static, weight, a, b, groups)
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    want = per_row(*(t.float() for t in (fresh, weight, a, b)), slot_ids)
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2


def test_a_shape_too_large_for_fp16_shares_one_layers_weights_and_its_quantized_run_counts_them_once():
    """benchmarks/e2e.py's 70B path on a tiny shape: every layer's fp16 tensors are the first layer's,
    the engine over an int8 base holds a quantized copy per layer, and the run's memory figure leaves
    out the shared fp16 storage once (not once per layer)."""
    from benchmarks import e2e_models, e2e_systems

    config = e2e_models.llama_config("tiny-shared")
    setup = e2e_models.Setup("tiny-shared", prompt=8, generate=2, device=torch.device("cpu"), dtype=torch.float32)
    weights = e2e_models.random_weights(config, setup.device, setup.dtype, shared_layers=True)
    for name in [n for n in weights if n.startswith("model.layers.1.")]:
        assert weights[name].data_ptr() == weights[name.replace("layers.1.", "layers.0.")].data_ptr(), name
    engine = e2e_systems.build_engine(setup, config, weights, slots=1, batch=1, graphs=False, base_quant="int8")
    stacks = [stack.weight.data for stack in engine.model.gate_up]
    assert stacks[0].data_ptr() != stacks[1].data_ptr() and torch.equal(stacks[0], stacks[1])  # a copy per layer
    result = e2e_systems.without_own_copy({"memory_gib": 1.0}, engine, weights)
    shared = sum(weights[f"model.layers.0.{part}.weight"].nbytes for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert result["memory_gib"] == pytest.approx(1.0 - shared / e2e_models.GiB)


def test_the_benchmarks_random_deltas_are_real_deltas_over_their_written_base(tmp_path):
    """The replica and tensor-parallel benchmarks' models on disk: a random checkpoint folder and random
    deltas in the delta format over it, which an engine loads by folder and serves, each changing the
    answers its own way."""
    from benchmarks import e2e_models
    from bitdelta.checkpoint import Checkpoint
    from bitdelta.engine import Engine, EngineConfig, SamplingParams
    from bitdelta.fileformat import DeltaReader

    config = e2e_models.llama_config("tiny")
    base = e2e_models.write_checkpoint(config, e2e_models.random_weights(config, torch.device("cpu"), torch.float32), tmp_path / "base")
    deltas = e2e_models.write_random_deltas(base, ["a", "b"], tmp_path / "deltas")
    DeltaReader(deltas[0]).check_base(Checkpoint(base).fingerprint, "base")
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32"), base_name="base")
    for name, folder in zip(("a", "b"), deltas):
        engine.store.register(name, folder, load_now=True)
    outputs = engine.generate([(name, [1, 2, 3, 4], SamplingParams(max_tokens=6, temperature=0)) for name in ("a", "b", "base")])
    answers = [tuple(token for event in events for token in event.token_ids) for events in outputs]
    assert len(set(answers)) == 3 and all(len(answer) == 6 for answer in answers)
