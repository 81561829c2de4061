"""The multi-tenant engine on tiny genuinely fine-tuned Llama models: rows of several fine-tunes in
every batch, each answering exactly as its merged fine-tune does alone."""

from __future__ import annotations

import functools
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bitdelta import compress, load
from bitdelta.engine import Engine, EngineConfig, EngineObserver, SamplingParams
from bitdelta.errors import IncompatibleModelsError
from bitdelta.multi_tenant_demo import serve_two_in_one_batch

PROMPTS = ("The value of", "def parse(self, text):\n", "Return a new list of")
GREEDY = SamplingParams(max_tokens=16, temperature=0)


class Steps(EngineObserver):
    def __init__(self) -> None:
        self.log: list[tuple[int, int, int, int]] = []

    def step(self, sequences, deltas, prefill_tokens, decode_tokens) -> None:
        self.log.append((sequences, deltas, prefill_tokens, decode_tokens))


def make_engine(base: Path, deltas: dict[str, Path], observer=None, **config) -> Engine:
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", **config), observer)
    for name, path in deltas.items():
        engine.store.register(name, path, load_now=True)  # in the CPU tier: the first step can run them
    return engine


def token_ids(engine: Engine, model: str, text: str) -> list[int]:
    return engine.store.get(model).tokenizer(text, add_special_tokens=False)["input_ids"]


def generated(outputs) -> list[int]:
    return [t for output in outputs for t in output.token_ids]


def alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@functools.cache
def _merged(base: Path, delta: Path):
    return load(base, delta, dtype="float32")


def test_mixed_batches_match_each_merged_finetune_greedy(llama_pair, deltas):
    base = llama_pair[0]
    steps = Steps()
    engine = make_engine(base, deltas, steps, max_batch=16, max_gpu_deltas=4, prefill_chunk=16)
    requests = [(name, token_ids(engine, name, p), GREEDY) for p in PROMPTS for name in [*deltas, "llama-base"]]
    outputs = engine.generate(requests)
    from transformers import AutoModelForCausalLM

    models = {name: _merged(base, path) for name, path in deltas.items()} | {"llama-base": AutoModelForCausalLM.from_pretrained(base)}
    for (name, prompt, params), out in zip(requests, outputs):
        assert generated(out) == alone(models[name], prompt, params.max_tokens), name
    assert max(d for _, d, _, _ in steps.log) == 4  # four fine-tunes (and the base) in one forward pass
    assert len({tuple(generated(out)) for out in outputs}) >= 3  # answers differ: the test is not vacuous


def test_each_row_gets_its_own_finetunes_logits(llama_pair, deltas):
    """Stronger than greedy equality on tiny models: the next-token logits of every row of a
    mixed batch are its merged fine-tune's (1-bit linears, embeddings, norms, lm_head)."""
    base = llama_pair[0]
    engine = make_engine(base, deltas, max_gpu_deltas=4)
    logits = {}
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: logits.setdefault("first", forward(batch, kv))
    requests = [(name, token_ids(engine, name, PROMPTS[2]), GREEDY) for name in deltas]
    for name, prompt, params in requests:
        engine.submit(name, prompt, params, lambda _: None)
    engine.step()
    for row, (name, prompt, _) in enumerate(requests):
        with torch.no_grad():
            expected = _merged(base, deltas[name])(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits["first"][row], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["first"][0], logits["first"][2], atol=1e-2)


def test_more_finetunes_than_gpu_slots_evict_lru_and_stay_exact(llama_pair, deltas):
    base = llama_pair[0]
    engine = make_engine(base, deltas, max_batch=4, max_gpu_deltas=1, max_cpu_deltas=2)
    requests = [(name, token_ids(engine, name, PROMPTS[0]), GREEDY) for name in deltas]
    for (name, prompt, params), out in zip(requests, engine.generate(requests)):
        assert generated(out) == alone(_merged(base, deltas[name]), prompt, params.max_tokens), name
    assert engine.store.resident() == {"gpu": 1, "cpu": 2, "disk": 4}


def test_prefill_is_chunked_so_decoding_never_stalls(llama_pair, deltas):
    steps = Steps()
    engine = make_engine(llama_pair[0], deltas, steps, prefill_chunk=8)
    short = token_ids(engine, "prose-row", PROMPTS[0])
    got = []
    engine.submit("prose-row", short, SamplingParams(max_tokens=30, temperature=0), got.append)
    engine.step()
    long = token_ids(engine, "prose-matrix", "The quick brown fox jumps over the lazy dog. " * 3)
    engine.submit("prose-matrix", long, GREEDY, lambda _: None)
    while len(got) < 12:
        engine.step()
    assert len(long) > 40
    prefilling = steps.log[1:][: -(-len(long) // 8)]
    assert all(prefill <= 8 and decode >= 1 for _, _, prefill, decode in prefilling)


def test_kv_cache_holds_only_whole_blocks_of_real_tokens(llama_pair, deltas):
    engine = make_engine(llama_pair[0], deltas, kv_block_size=8)
    lengths = []
    for index, name in enumerate(deltas):
        engine.submit(name, token_ids(engine, name, PROMPTS[index % 3] * (index + 1)), GREEDY, lambda _: None)
    for _ in range(5):
        engine.step()
        lengths = [s.computed for s in engine._running]
        assert engine.kv.blocks_used == sum(-(-n // 8) for n in lengths)  # < 8 slots of waste per sequence
    assert len(set(lengths)) > 1
    while engine.has_work():
        engine.step()
    assert engine.kv.blocks_used == 0 and engine.stats()["kv_tokens"] == 0


def test_a_cold_delta_delays_only_its_own_requests(llama_pair, deltas, monkeypatch):
    from bitdelta.engine import store

    release = threading.Event()
    real = store.read_weights
    monkeypatch.setattr(store, "read_weights", lambda *a: (release.wait(10), real(*a))[1])
    engine = make_engine(llama_pair[0], {})
    engine.store.register("prose-late", deltas["prose-late"])  # on disk only: cold
    engine.start()
    try:
        done = {name: threading.Event() for name in ("llama-base", "prose-late")}
        for name in done:
            engine.submit(name, token_ids(engine, name, PROMPTS[1]), GREEDY, lambda out, n=name: out.finish_reason and done[n].set())
        assert done["llama-base"].wait(10) and not done["prose-late"].is_set()
        release.set()
        assert done["prose-late"].wait(10)
    finally:
        release.set()
        engine.stop()


def test_seeded_sampling_repeats_and_stop_strings_cut(llama_pair, deltas):
    engine = make_engine(llama_pair[0], deltas)
    prompt = token_ids(engine, "prose-row", PROMPTS[0])
    sampled = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    first, second, other = engine.generate([("prose-row", prompt, sampled)] * 2 + [("prose-row", prompt, SamplingParams(20, 0.9, 0.9, seed=8))])
    assert generated(first) == generated(second) != generated(other)
    full = "".join(o.text for o in engine.generate([("prose-row", prompt, GREEDY)])[0])
    stop = full[5:8]
    cut = engine.generate([("prose-row", prompt, SamplingParams(16, 0, stop=(stop,)))])[0]
    assert "".join(o.text for o in cut) == full[: full.index(stop)] and cut[-1].finish_reason == "stop"


def test_ignore_eos_runs_through_end_of_sequence_to_max_tokens(llama_pair, deltas):
    engine = make_engine(llama_pair[0], deltas)
    prompt = token_ids(engine, "prose-row", PROMPTS[0])
    full = generated(engine.generate([("prose-row", prompt, GREEDY)])[0])
    engine.store.get("prose-row").__dict__["eos_ids"] = frozenset({full[2]})  # the third greedy token now ends a sequence
    stopped, through = engine.generate([("prose-row", prompt, GREEDY), ("prose-row", prompt, replace(GREEDY, ignore_eos=True))])
    assert generated(stopped) == full[: full.index(full[2]) + 1] and stopped[-1].finish_reason == "stop"
    assert generated(through) == full and through[-1].finish_reason == "length"


def test_refuses_other_families_other_bases_and_unroutable_tensors(pairs, llama_pair, deltas, tmp_path):
    with pytest.raises(IncompatibleModelsError, match="gpt_neox.* is not supported"):
        Engine(pairs["gpt_neox"][0], EngineConfig(device="cpu"))
    engine = make_engine(llama_pair[0], {})
    foreign = compress(*pairs["qwen2"], tmp_path / "qwen2", progress=False)
    with pytest.raises(IncompatibleModelsError, match="fingerprint"):
        engine.store.register("foreign", foreign)
    dense_linear = compress(*llama_pair, tmp_path / "dense-mlp", exclude=["*.mlp.down_proj.*"], progress=False)
    with pytest.raises(IncompatibleModelsError, match="down_proj.weight losslessly"):
        engine.store.register("dense-mlp", dense_linear)
    assert engine.store.names() == ["llama-base"]


def test_demo_serves_two_finetunes_in_one_batch_identically(llama_pair, deltas):
    rows = serve_two_in_one_batch(llama_pair[0], {n: deltas[n] for n in ("prose-matrix", "code-chat")}, max_tokens=12)
    assert len(rows) == 4 and all(row.identical for row in rows)
    assert rows[0].mixed_steps > 0 and rows[0].served != rows[-1].served


def test_an_engine_over_an_in_memory_model_serves_in_memory_deltas_exactly(llama_pair, deltas):
    """Engine.from_model + store.add (how benchmarks serve random deltas): token ids in and out,
    no tokenizer, no end-of-sequence stop, each row still its own merged fine-tune; an in-memory
    delta outlives the CPU-tier budget since nothing could reload it."""
    from transformers import AutoModelForCausalLM

    from bitdelta.engine.store import read_weights

    base = llama_pair[0]
    on_disk = make_engine(base, {})
    engine = Engine.from_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), EngineConfig(max_gpu_deltas=2, max_cpu_deltas=1))
    names = list(deltas)[:3]
    for name in names:
        engine.store.add(name, read_weights(deltas[name], on_disk.model, on_disk.store.base_fingerprint))
    prompt = on_disk.store.get_base().tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=12, temperature=0)
    outputs = engine.generate([(name, prompt, params) for name in names])
    for name, out in zip(names, outputs):
        assert generated(out) == alone(_merged(base, deltas[name]), prompt, params.max_tokens), name
        assert out[-1].completion_tokens == params.max_tokens and all(o.text == "" for o in out)
    assert engine.store.resident() == {"gpu": 2, "cpu": 3, "disk": 0}
    wrong = read_weights(deltas[names[0]], on_disk.model, on_disk.store.base_fingerprint)
    first = next(iter(wrong.signs))
    wrong.signs[first] = wrong.signs[first][:, :-1]
    with pytest.raises(IncompatibleModelsError, match=first):
        engine.store.add("broken", wrong)


def test_qwen2_finetune_brings_its_own_biases_beside_the_base(pairs, tmp_path):
    """Qwen2's q/k/v have biases, and its fine-tune changed them: the stacked q/k/v product adds each
    row's own biases, so the first-step logits of a batch mixing the fine-tune and the base are each
    one's alone."""
    from transformers import AutoModelForCausalLM

    base, finetuned = pairs["qwen2"]
    engine = make_engine(base, {})
    base_name = engine.store.names()[0]
    delta = compress(base, finetuned, tmp_path / "qwen2-ft", progress=False)
    engine.store.register("ft", delta, load_now=True)
    logits = {}
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: logits.setdefault("first", forward(batch, kv))
    prompt = token_ids(engine, "ft", PROMPTS[0])
    for name in ("ft", base_name):
        engine.submit(name, prompt, GREEDY, lambda _: None)
    engine.step()
    assert any(part.slot_bias is not None for stacked in engine.model.qkv for part in stacked.parts)
    for row, model in enumerate((_merged(base, delta), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits["first"][row], expected, rtol=1e-4, atol=1e-4)


def test_a_finetune_saved_without_a_chat_template_uses_its_bases(llama_pair, deltas, tmp_path):
    import json

    folder = tmp_path / "no-template"
    shutil.copytree(deltas["prose-row"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    engine = make_engine(llama_pair[0], {"no-template": folder, "code-chat": deltas["code-chat"]})
    entry, base = engine.store.get("no-template"), engine.store.get_base()
    assert entry.tokenizer.chat_template is None and base.tokenizer.chat_template
    assert entry.chat_template == base.tokenizer.chat_template  # same vocabulary: the base's template fits
    assert engine.store.get("code-chat").chat_template == engine.store.get("code-chat").tokenizer.chat_template != base.tokenizer.chat_template


def test_the_engine_imports_none_of_the_offline_pipeline():
    """Serving reads deltas; it never compresses, merges or trains: no module of the engine imports
    those, at the top or inside a function."""
    import ast

    import bitdelta.engine

    offline = {"bitdelta.compress", "bitdelta.apply", "bitdelta.distill", "bitdelta.tiny", "bitdelta.demo",
               "bitdelta.multi_tenant_demo"}
    found = []
    for path in Path(bitdelta.engine.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            found += [f"{path.name}: {name}" for name in names if name in offline]
    assert not found
