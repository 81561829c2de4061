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
    from bitdelta.engine.demo import make_deltas

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


def test_decode_steps_replayed_as_cuda_graphs_generate_what_eager_steps_do(llama_pair, tmp_path):
    """Graphs capture a batch's composition; tokens, positions, KV rows and block tables change at
    every replay. Same kernels, same inputs: the tokens must be identical, and graphs must be used."""
    from bitdelta.engine import Engine, EngineConfig, SamplingParams
    from bitdelta.engine.demo import make_deltas

    deltas = make_deltas(*llama_pair, tmp_path / "deltas")
    results = {}
    for graphs in (False, True):
        engine = Engine(llama_pair[0], EngineConfig(device="cuda", dtype="bfloat16", max_gpu_deltas=4, max_batch=8, cuda_graphs=graphs))
        for name, path in deltas.items():
            engine.store.register(name, path, load_now=True)
        tokenizer = engine.store.get(next(iter(deltas))).tokenizer
        prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("The value of", "def parse(self, text):\n", "Return a new list of")]
        requests = [(name, prompt, SamplingParams(max_tokens=24, temperature=0)) for name in deltas for prompt in prompts]
        requests += [(engine.store.get_base().name, prompts[0], SamplingParams(max_tokens=5, temperature=0))]  # leaves early: a new composition
        outputs = engine.generate(requests)
        results[graphs] = [[t for out in outs for t in out.token_ids] for outs in outputs]
        if graphs:
            assert engine.graphs.replays >= 10 and len(engine.graphs.graphs) >= 2
    assert results[True] == results[False]
    assert len({tuple(tokens) for tokens in results[True]}) >= 4
