"""The engine on a CUDA GPU in bf16, where every BitDeltaLinear runs the Triton kernels: each row of
a mixed batch must get its own merged fine-tune's next-token logits. (Skipped without CUDA + Triton.)"""

from __future__ import annotations

import pytest
import torch

from bitdelta import load
from bitdelta.kernels import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")]


def test_rows_of_a_mixed_bf16_batch_match_their_merged_finetunes(llama_pair, tmp_path):
    from bitdelta.engine import Engine, EngineConfig, SamplingParams
    from bitdelta.multi_tenant_demo import make_deltas

    base = llama_pair[0]
    deltas = make_deltas(*llama_pair, tmp_path / "deltas")
    engine = Engine(base, EngineConfig(device="cuda", dtype="bfloat16", max_gpu_deltas=4))
    for name, path in deltas.items():
        engine.store.register(name, path, load_now=True)
    captured = {}
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: captured.setdefault("logits", forward(batch, kv))
    prompt = "Return a new list of"
    requests = []
    for name in deltas:
        ids = engine.store.get(name).tokenizer(prompt, add_special_tokens=False)["input_ids"]
        requests.append((name, ids))
        engine.submit(name, ids, SamplingParams(max_tokens=1, temperature=0), lambda _: None)
    engine.step()
    for row, (name, ids) in enumerate(requests):
        merged = load(base, deltas[name], dtype="bfloat16", device="cuda")
        with torch.no_grad():
            expected = merged(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        got = captured["logits"][row].float()
        # bf16 weights and activations through a few layers: both paths round differently
        # (W + s*sign merged in fp32 then rounded, versus x@W and x@sign accumulated in fp32);
        # a few 1e-3 relative per layer, well under 3e-2 at the logits.
        assert (got - expected).norm() / expected.norm() < 3e-2, name
        assert got.argmax() == expected.argmax(), name


def graph_checked_engine(base, **config):
    """An engine whose every CUDA-graph replay is checked against an eager forward of the same step
    (which rewrites the same keys and values); returns the engine and the list of relative errors."""
    from bitdelta.engine import Engine, EngineConfig

    engine = Engine(base, EngineConfig(device="cuda", dtype="bfloat16", **config))
    replay, errors = engine.graphs.forward, []

    def checked(batch):
        before = engine.graphs.replays
        logits = replay(batch).clone()
        if engine.graphs.replays > before:
            eager = engine.model.forward(batch, engine.kv)
            errors.append(float((logits - eager).norm() / eager.norm()))
        return logits

    engine.graphs.forward = checked
    return engine, errors


# Same kernels on the same inputs; cuBLAS may pick other algorithms under capture, so allow bf16
# accumulation-order noise, far below what a stale input or a stale table would cause (~1).
REPLAY_BOUND = 1e-2
PROMPTS = ("The value of", "def parse(self, text):\n", "Return a new list of")


def test_decode_steps_replayed_as_cuda_graphs_compute_what_eager_steps_do(llama_pair, tmp_path):
    """Graphs capture a batch's composition; tokens, positions, KV rows and block tables change at
    every replay, and compositions change as requests of different lengths finish."""
    from bitdelta.engine import SamplingParams
    from bitdelta.multi_tenant_demo import make_deltas

    deltas = make_deltas(*llama_pair, tmp_path / "deltas")
    engine, errors = graph_checked_engine(llama_pair[0], max_gpu_deltas=4, max_batch=8)
    for name, path in deltas.items():
        engine.store.register(name, path, load_now=True)
    tokenizer = engine.store.get(next(iter(deltas))).tokenizer
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    requests = [(name, prompt, SamplingParams(max_tokens=16 + 4 * i, temperature=0)) for i, (name, prompt) in enumerate((n, p) for n in deltas for p in prompts)]
    engine.generate(requests)
    assert len(errors) >= 10 and len(engine.graphs.graphs) >= 2
    assert max(errors) < REPLAY_BOUND, max(errors)


def test_a_slot_reused_by_a_finetune_with_its_own_lm_head_drops_older_graphs(llama_pair, tmp_path):
    """One slot, served first to a bits-only delta (no per-slot tables: its graph reads the base's
    lm_head and norms), then to the full fine-tune whose lm_head, embeddings and norms differ: the
    same composition, which must not replay the graph captured before those tables existed."""
    from bitdelta.engine import SamplingParams
    from bitdelta.engine.model import SlotWeights
    from bitdelta.multi_tenant_demo import make_deltas

    name, path = next(iter(make_deltas(*llama_pair, tmp_path / "deltas").items()))
    engine, errors = graph_checked_engine(llama_pair[0], max_gpu_deltas=1, max_batch=1)
    full = engine.store.register(name, path, load_now=True)
    assert engine.model.head_name in full.weights.dense  # the fine-tune changed its lm_head
    engine.store.add("bits-only", SlotWeights(full.weights.signs, full.weights.scales, {}))
    prompt = full.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    engine.generate([(model, prompt, SamplingParams(max_tokens=12, temperature=0)) for model in ("bits-only", name)])
    assert len(errors) >= 12
    assert max(errors) < REPLAY_BOUND, max(errors)
