"""Tensor parallelism on the CPU over gloo: the engine split over two processes serves mixed
tenants exactly as the merged fine-tunes, and what it cannot split is refused before any rank starts.

The tests that start their own engine come before `split_engine`'s: a process group exists once per
process, and the module's engine holds it until the module ends."""

from __future__ import annotations

import pytest
import torch

import bitdelta
from bitdelta.engine import Engine, EngineConfig, SamplingParams
from bitdelta.errors import IncompatibleModelsError

PROMPTS = ("The value of", "def parse(self, text):\n", "Return a new list of")


def test_a_split_the_model_cannot_take_is_refused_before_any_rank_starts(pairs, llama_pair):
    with pytest.raises(IncompatibleModelsError, match="--tensor-parallel 3: the model's .* do not split evenly over 3 ranks"):
        Engine(llama_pair[0], EngineConfig(device="cpu", dtype="float32", tensor_parallel=3))
    with pytest.raises(IncompatibleModelsError, match="'gpt_neox' is not supported yet"):
        Engine(pairs["gpt_neox"][0], EngineConfig(device="cpu", dtype="float32", tensor_parallel=2))
    # o_proj's 64 inputs in shares of 32 would cut int4's 128-column groups: the base would quantize otherwise than whole
    with pytest.raises(IncompatibleModelsError, match="--base-quant int4 --tensor-parallel 2: each rank would hold 32 of o_proj's 64 inputs"):
        Engine(llama_pair[0], EngineConfig(device="cpu", dtype="float32", tensor_parallel=2, base_quant="int4"))
    assert not torch.distributed.is_initialized()


def test_qwen2_biases_split_with_their_rows_and_each_row_gets_its_finetunes_own(pairs, tmp_path):
    """Qwen2's q/k/v biases (changed by the fine-tune: per-slot biases) split with the rows over two
    ranks; tied embeddings stay whole. The fine-tune and the base in one batch, each as alone."""
    from transformers import AutoModelForCausalLM

    base, finetuned = pairs["qwen2"]
    delta = bitdelta.compress(base, finetuned, tmp_path / "qwen2", progress=False)
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=4, tensor_parallel=2))
    try:
        engine.store.register("ft", delta, load_now=True)
        prompt = engine.store.get("ft").tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
        names = ["ft", engine.store.names()[0]]
        outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=10, temperature=0)) for name in names])
        q = engine.model.linears["model.layers.0.self_attn.q_proj.weight"]
        assert q.slot_bias is not None and q.slot_bias.shape[1] == q.shard.full_shape[0] // 2
        models = [bitdelta.load(base, delta, dtype="float32"), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)]
        for model, events in zip(models, outputs):
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            assert [token for event in events for token in event.token_ids] == alone
    finally:
        engine.stop()


def test_moe_experts_split_like_an_mlp_and_each_row_gets_its_finetunes_own(tmp_path_factory, tmp_path):
    """Mixtral (w1/w3/w2 experts) and Qwen3-MoE on two ranks: each expert's gate/up rows and down
    columns split, the router whole, one all-reduce after the block; the fine-tune and the base in
    one batch, each as alone."""
    from transformers import AutoModelForCausalLM

    from bitdelta import tiny

    for family in ("mixtral", "qwen3_moe"):
        base, finetuned = tiny.make_pair(tmp_path_factory.mktemp(family), tiny.TinySpec(family=family))
        delta = bitdelta.compress(base, finetuned, tmp_path / family, progress=False)
        engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=4, tensor_parallel=2))
        try:
            engine.store.register("ft", delta, load_now=True)
            layer = engine.model.experts[0]
            assert layer.shapes["down_proj"][2] == layer.cuts["down_proj"].full_shape[1] // 2  # half of each expert's columns
            prompt = engine.store.get("ft").tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
            names = ["ft", engine.store.names()[0]]
            outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=8, temperature=0)) for name in names])
            models = [bitdelta.load(base, delta, dtype="float32"), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)]
            answers = []
            for model, events in zip(models, outputs):
                alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
                answers.append([token for event in events for token in event.token_ids])
                assert answers[-1] == alone, family
            assert answers[0] != answers[1]  # the fine-tune answers otherwise than the base: the test is not vacuous
        finally:
            engine.stop()


def _split_family_serves_as_merged(base, delta, check_shares, base_quant: str | None = None) -> None:
    """A tensor-parallel engine of two gloo ranks over `base` (held quantized by `base_quant`) with
    `delta` as "ft": the fine-tune and the base in one batch, each row's logits those of its merged
    model alone (Q(base) + delta, and Q(base): every block linear quantized whole; fp32, the ranks'
    partial sums add in another order: 1e-4); then `check_shares(engine)`."""
    from transformers import AutoModelForCausalLM

    from conftest import quantize_in_place

    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=4, tensor_parallel=2, base_quant=base_quant))
    try:
        engine.store.register("ft", delta, load_now=True)
        prompt = engine.store.get("ft").tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
        steps = []
        engine.model.forward = lambda batch, kv, forward=engine.model.forward: steps.append(forward(batch, kv)) or steps[-1]
        engine.generate([(name, prompt, SamplingParams(max_tokens=4, temperature=0)) for name in ("ft", engine.store.names()[0])])
        models = [bitdelta.load(base, delta, dtype="float32"), AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)]
        if base_quant is not None:
            quantize_in_place(models[1], engine.model.linears, base_quant)
        expected = []
        for row, model in enumerate(models):
            with torch.no_grad():
                expected.append(model(torch.tensor([prompt])).logits[0, -1])
            assert (steps[0][row] - expected[row]).norm() / expected[row].norm() < 1e-4
        assert (expected[0] - expected[1]).norm() / expected[1].norm() > 1e-2  # the fine-tune differs: the test is not vacuous
        check_shares(engine)
    finally:
        engine.stop()


def test_phi3_fused_linears_split_by_their_parts_and_each_row_gets_its_finetunes_own(tmp_path_factory, tmp_path):
    """Phi-3's fused q/k/v and gate/up on two ranks: each rank holds its rows of every part (its q, k
    and v heads; its gate and up columns), their sign rows and row scales cut alike."""
    from transformers import AutoConfig

    from bitdelta import tiny

    base, finetuned = tiny.make_pair(tmp_path_factory.mktemp("phi3"), tiny.TinySpec(family="phi3"))
    config = AutoConfig.from_pretrained(base)
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

    def check_shares(engine):
        qkv = engine.model.linears["model.layers.0.self_attn.qkv_proj.weight"]
        assert [(part.start, part.stop) for part in qkv.shard.parts] == [(0, q // 2), (q, q + kv // 2), (q + kv, q + kv + kv // 2)]
        assert qkv.weight.shape[0] == (q + 2 * kv) // 2

    _split_family_serves_as_merged(base, bitdelta.compress(base, finetuned, tmp_path / "phi3", scale="row", progress=False), check_shares)


def test_olmo2_norms_over_whole_projections_split_with_them_and_each_row_gets_its_finetunes_own(tmp_path_factory, tmp_path):
    """OLMo 2's query and key norms span all heads: each rank holds the norm weights of its heads (and
    of the fine-tune's changed norms) and the shares' sums of squares are all-reduced."""
    from bitdelta import tiny

    base, finetuned = tiny.make_pair(tmp_path_factory.mktemp("olmo2"), tiny.TinySpec(family="olmo2"))
    delta = bitdelta.compress(base, finetuned, tmp_path / "olmo2", progress=False)

    def check_shares(engine):
        name = "model.layers.0.self_attn.q_norm.weight"
        full = engine.model.split_norms[name].full_shape[0]
        assert engine.model.base_tensors[name].shape[0] == full // 2 == engine.model.q_heads * engine.model.head_dim
        assert name in engine.model.tables and engine.model.tables[name].shape[1] == full // 2  # the fine-tune's own norm, cut

    _split_family_serves_as_merged(base, delta, check_shares)


def test_a_rank_that_exits_fails_the_engine_in_one_line_and_it_refuses_what_comes_after(llama_pair):
    """A follower killed while serving: the next step fails its requests with an error naming the
    rank, without running each alone; later requests are refused with the same error; the serving
    thread ends (so /health answers 503); stop() ends the group without waiting on the dead rank."""
    from bitdelta.engine import EngineFailedError

    engine = Engine(llama_pair[0], EngineConfig(device="cpu", dtype="float32", max_batch=2, tensor_parallel=2))
    try:
        base = engine.store.names()[0]
        prompt = engine.store.get(base).tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=3, temperature=0)
        assert engine.generate([(base, prompt, params)])[0][-1].finish_reason == "length"
        engine.start()
        follower = engine._ranks[0]
        follower.kill()
        follower.join()
        finished = []
        engine.submit(base, prompt, params, finished.append)
        engine.submit(base, prompt, params, finished.append)
        engine._thread.join(timeout=60)
        assert not engine.running
        assert [out.finish_reason for out in finished] == ["error", "error"]
        assert all(f"tensor-parallel rank 1 exited (exit code {follower.exitcode})" in out.error for out in finished)
        with pytest.raises(EngineFailedError, match="rank 1 exited .* restart the server"):
            engine.submit(base, prompt, params, finished.append)
    finally:
        engine.stop()
    assert not torch.distributed.is_initialized()


def test_an_int8_base_splits_as_the_whole_matrices_quantize(llama_pair, tmp_path):
    """An int8 base over two ranks: o_proj and down_proj hold half their inputs and scale each row by
    the whole row's maximum (the ranks' all-reduced), so the fine-tune and the base served are the
    ones `compress --base-quant int8` took the delta against. Quantizing each share on its own changes
    most of those rows' scales: the logits would miss by far more than 1e-4."""
    delta = bitdelta.compress(*llama_pair, tmp_path / "int8", base_quant="int8", progress=False)

    def check_shares(engine):
        down = engine.model.linears["model.layers.0.mlp.down_proj.weight"]
        assert down.weight.recipe == "int8" and down.weight.shape[1] == down.shard.full_shape[1] // 2

    _split_family_serves_as_merged(llama_pair[0], delta, check_shares, base_quant="int8")


def test_an_int8_moe_base_quantizes_each_experts_share_as_inside_its_whole_matrix(tmp_path_factory):
    """Qwen3-MoE over two ranks with an int8 base: rank 0's half of each expert's down_proj inputs holds
    exactly the left half of the whole matrices' int8 values and the whole rows' scales."""
    from bitdelta import tiny
    from bitdelta.checkpoint import Checkpoint
    from bitdelta.quant import quantize

    base, _ = tiny.make_pair(tmp_path_factory.mktemp("moe-int8"), tiny.TinySpec(family="qwen3_moe"))
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=2, tensor_parallel=2, base_quant="int8"))
    try:
        layer = engine.model.experts[0]
        count, n, k = layer.shapes["down_proj"]
        checkpoint = Checkpoint(base)
        full = torch.stack([checkpoint.mapped(f"model.layers.0.mlp.experts.{e}.down_proj.weight").float() for e in range(count)])
        assert full.shape[-1] == 2 * k  # this rank holds half of the inputs
        whole, share = quantize(full.reshape(count * n, -1), "int8"), layer.weights["down_proj"]
        assert torch.equal(share.scale, whole.scale) and torch.equal(share.data, whole.data[:, :k])
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def split_engine(llama_pair, deltas):
    engine = Engine(llama_pair[0], EngineConfig(device="cpu", dtype="float32", max_batch=6, tensor_parallel=2))
    for name, path in deltas.items():
        engine.store.register(name, path, load_now=True)
    yield engine
    engine.stop()


def test_two_ranks_hold_half_of_every_block_linear_and_of_the_heads(split_engine, llama_pair):
    from transformers import AutoConfig

    model, config = split_engine.model, AutoConfig.from_pretrained(llama_pair[0])
    assert model.q_heads == config.num_attention_heads // 2 and model.kv_heads == config.num_key_value_heads // 2
    q = model.linears["model.layers.0.self_attn.q_proj.weight"]
    down = model.linears["model.layers.0.mlp.down_proj.weight"]
    assert q.weight.shape == (config.num_attention_heads * model.head_dim // 2, config.hidden_size)
    assert down.weight.shape == (config.hidden_size, config.intermediate_size // 2)
    assert down.signs.shape[-1] == config.intermediate_size // 2 // 32  # packed words split on 32-column boundaries
    assert model.base_shape("model.layers.0.mlp.down_proj.weight") == (config.hidden_size, config.intermediate_size)


def test_mixed_tenants_on_two_ranks_generate_what_each_merged_finetune_generates(split_engine, llama_pair, deltas):
    names = [*deltas, split_engine.store.names()[0]]
    models = {name: bitdelta.load(llama_pair[0], path, dtype="float32") for name, path in deltas.items()}
    from transformers import AutoModelForCausalLM

    models[names[-1]] = AutoModelForCausalLM.from_pretrained(llama_pair[0], dtype=torch.float32)
    tokenizer = split_engine.store.get(names[0]).tokenizer
    requests = [(name, tokenizer(text, add_special_tokens=False)["input_ids"]) for name in names for text in PROMPTS[:2]]
    streamed: dict[int, list[int]] = {}
    outputs = split_engine.generate([(name, ids, SamplingParams(max_tokens=10, temperature=0)) for name, ids in requests])
    for index, ((name, ids), events) in enumerate(zip(requests, outputs)):
        tokens = [token for event in events for token in event.token_ids]
        streamed[index] = tokens
        alone = models[name].generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
        assert tokens == alone, (name, index)
        assert len(events) > 1  # events arrive token by token (what the server streams)
    assert len({tuple(tokens) for tokens in streamed.values()}) > len(PROMPTS[:2])  # the fine-tunes answer differently


def test_serve_with_tensor_parallel_streams_each_finetunes_merged_answer(llama_pair, deltas, tmp_path):
    """`bitdelta serve --tensor-parallel 2 --device cpu`: two gloo ranks behind one OpenAI endpoint;
    streamed and whole answers both equal the merged fine-tune's greedy answer."""
    import subprocess
    import sys

    import openai
    from test_server import free_port, wait_healthy
    from transformers import AutoTokenizer

    from test_engine import _merged, alone

    import shutil

    folder = tmp_path / "deltas"
    for name, path in deltas.items():
        shutil.copytree(path, folder / name)
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "bitdelta.server", str(llama_pair[0]), "--deltas", str(folder), "--port", str(port),
               "--device", "cpu", "--tensor-parallel", "2", "--max-gpu-deltas", "4"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log=log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        name = sorted(deltas)[0]
        tokenizer = AutoTokenizer.from_pretrained(deltas[name])
        ids = tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
        expected = tokenizer.decode(alone(_merged(llama_pair[0], deltas[name]), ids, 12), skip_special_tokens=True)
        whole = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0)
        chunks = list(client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0, stream=True))
        assert whole.choices[0].text == expected
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    finally:
        process.terminate()
        process.wait(30)


def test_a_tensor_parallel_ray_replica_is_one_actor_holding_its_gpus(tmp_path):
    from bitdelta.ray.app import RayServeConfig

    split = RayServeConfig("base", str(tmp_path), EngineConfig(device="cuda", tensor_parallel=4), replicas=2)
    assert split.replica_options()["ray_actor_options"]["num_gpus"] == 4
    assert RayServeConfig("base", str(tmp_path), EngineConfig(device="cuda")).replica_options()["ray_actor_options"]["num_gpus"] == 1


def test_a_ray_serve_replica_spans_two_ranks(llama_pair, deltas, tmp_path):
    """One Ray Serve replica with tensor_parallel 2 (two gloo ranks on the CPU): answers through the
    ingress, streamed too, equal the merged fine-tune's."""
    import shutil

    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from test_ray import complete
    from test_server import free_port, merged_answer
    from transformers import AutoTokenizer

    from bitdelta.ray import RayServeConfig, build_app

    folder = tmp_path / "deltas"
    name = "prose-row"
    shutil.copytree(deltas[name], folder / name)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        engine = EngineConfig(device="cpu", dtype="float32", max_batch=4, tensor_parallel=2)
        serve.run(build_app(RayServeConfig(str(llama_pair[0]), str(folder), engine, replicas=1)), name="bitdelta", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        ids = AutoTokenizer.from_pretrained(folder / name)(PROMPTS[0], add_special_tokens=False)["input_ids"]
        expected = merged_answer(llama_pair, folder, name, ids, 8)
        for stream in (False, True):
            text, _, status = complete(url, name, PROMPTS[0], 8, stream=stream)
            assert status == 200 and text == expected, stream
    finally:
        serve.shutdown()
        ray.shutdown()
