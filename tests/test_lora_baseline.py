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


def test_the_e2e_lora_engine_serves_each_request_with_its_own_adapter():
    """benchmarks/e2e.py's LoRA system (the engine with every delta linear adding its rows'
    adapters) generates what each fine-tune's merged model W + B A generates, greedy."""
    from benchmarks import e2e

    config = e2e.llama_config("tiny")
    setup = e2e.Setup("tiny", prompt=8, generate=3, device=torch.device("cpu"), dtype=torch.float32)
    weights = e2e.random_weights(config, setup.device, setup.dtype)
    engine = e2e.build_engine(setup, config, weights, slots=3, batch=4, graphs=False)
    lora = e2e.LoraSlots(engine.model, rank=4)
    for a, b in lora.adapters.values():
        b.mul_(40)  # large enough that every fine-tune generates its own tokens
    for tenant in range(3):
        engine.store.add(f"ft{tenant}", e2e.SlotWeights({}, {}, {}))
    tenants = [0, 1, 2, 1]
    prompts = e2e.prompts(setup, len(tenants))
    params = e2e.SamplingParams(max_tokens=setup.generate, temperature=0)
    outputs = engine.generate([(f"ft{t}", prompt, params) for t, prompt in zip(tenants, prompts)])
    generated = [[token for out in events for token in out.token_ids] for events in outputs]
    for tenant, prompt, tokens in zip(tenants, prompts, generated):
        slot = engine.store.get(f"ft{tenant}").slot
        merged = dict(weights)
        for name, (a, b) in lora.adapters.items():
            merged[name] = weights[name] + b[slot] @ a[slot]
        model = e2e.model_over(config, merged)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(setup.generate):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert tokens == ids[0, len(prompt):].tolist()
    assert len({tuple(tokens) for tokens in generated[:3]}) > 1  # the adapters changed what is generated
