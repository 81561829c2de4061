"""compress -> merge on tiny genuinely fine-tuned pairs of current architectures: dense (Qwen3,
Gemma 3, Phi-3, OLMo 2) and mixture-of-experts (Mixtral and Qwen3-MoE with per-expert matrices in
the checkpoint, gpt-oss with stacked 3-D experts)."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bitdelta
from bitdelta import tiny
from bitdelta.checkpoint import Checkpoint
from bitdelta.fileformat import DeltaReader
from bitdelta.kernels import triton_available
from bitdelta.targets import select_targets

# longer than the tiny Gemmas' sliding windows (16, 32 tokens)
PROMPT = "def parse(self, text):\n    return [line.strip() for line in text.splitlines() if line and not line.startswith('#')]\n"
STEPS = {"gpt_oss": 10}  # its experts train ~10x slower on the CPU than the others'; 10 + 10 steps still move every matrix


@pytest.fixture(scope="module")
def recent_pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("recent")
    pairs = {}
    for family in tiny.RECENT_FAMILIES:
        steps = STEPS.get(family)
        options = {} if steps is None else {"base_steps": steps, "finetune_steps": steps}
        pairs[family] = tiny.make_pair(folder, tiny.TinySpec(family=family), **options)
    return pairs


@pytest.fixture(scope="module")
def recent_deltas(recent_pairs, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("recent-deltas")
    return {family: bitdelta.compress(*pair, folder / family, progress=False) for family, pair in recent_pairs.items()}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def _is_router(name: str, tensor: torch.Tensor, state: dict[str, torch.Tensor]) -> bool:
    """A matrix beside the experts of its MoE layer with one row per expert (named gate or router)."""
    layer = name.rsplit(".", 2)[0]
    experts = [t for n, t in state.items() if n.startswith(layer + ".experts.")]
    return tensor.ndim == 2 and bool(experts) and name.endswith((".gate.weight", ".router.weight"))


@pytest.mark.parametrize("family", tiny.MOE_FAMILIES)
def test_every_expert_matrix_is_compressed_and_the_routers_are_kept_whole(recent_pairs, family):
    base, finetuned = (Checkpoint(p) for p in recent_pairs[family])
    targets = set(select_targets(finetuned, base))
    state = _state(finetuned.path)
    experts = {n for n, t in state.items() if ".experts." in n and t.ndim >= 2 and not n.endswith("_bias")}
    routers = {n for n, t in state.items() if _is_router(n, t, state)}
    assert experts and len(routers) == 2  # one MoE layer per block
    assert experts <= targets
    assert not routers & targets
    # and the rest of every block's matrices, as for a dense model
    attention = {n for n in state if ".self_attn." in n and n.endswith("proj.weight")}
    assert attention <= targets


@pytest.mark.parametrize("family", tiny.RECENT_FAMILIES)
def test_merge_writes_base_plus_one_scaled_sign_matrix_per_expert_and_the_rest_exactly(recent_pairs, recent_deltas, family, tmp_path):
    base_dir, ft_dir = recent_pairs[family]
    merged = bitdelta.merge(base_dir, recent_deltas[family], tmp_path / "merged", progress=False)
    base, finetuned, got = _state(base_dir), _state(ft_dir), _state(merged)
    config = DeltaReader(recent_deltas[family]).config
    assert got.keys() == finetuned.keys() and config.compressed
    for name, tensor in finetuned.items():
        if name not in config.compressed:
            assert torch.equal(got[name], tensor), name
            continue
        delta = tensor.double() - base[name].double()
        # one scale per matrix: per expert for a stacked [E, N, K] tensor
        scale = delta.abs().mean(dim=(-2, -1), keepdim=True)
        expected = base[name].double() + scale * torch.where(delta > 0, 1.0, -1.0)
        torch.testing.assert_close(got[name].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", tiny.RECENT_FAMILIES)
def test_the_merged_finetune_keeps_most_of_its_gain(recent_pairs, recent_deltas, family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, ft_dir = recent_pairs[family]
    merged = bitdelta.merge(base_dir, recent_deltas[family], tmp_path / "merged", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(ft_dir)
    windows = tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.finetune_text(300_000)))[1], 8, 64)
    base, finetuned, delta = (tiny.heldout_loss(AutoModelForCausalLM.from_pretrained(d), windows) for d in (base_dir, ft_dir, merged))
    assert finetuned < base
    gain_kept = (base - delta) / (base - finetuned)
    assert gain_kept > 0.5, f"{family}: the 1-bit delta kept {gain_kept:.0%} of the fine-tune's gain"


@pytest.mark.parametrize("family", tiny.MOE_FAMILIES)
def test_a_moe_delta_is_several_times_smaller_than_its_finetune(recent_pairs, recent_deltas, family):
    """Experts stored whole made MoE deltas 1.1-1.2x smaller; one bit per expert weight leaves the
    (untied, fp32) embeddings and norms as most of what remains."""
    finetuned, reader = Checkpoint(recent_pairs[family][1]), DeltaReader(recent_deltas[family])
    lossless = sum(finetuned.tensors[name].nbytes for name in reader.config.dense)
    compressed = sum(finetuned.tensors[name].nbytes for name in reader.config.compressed)
    assert compressed > lossless  # experts are most of the model...
    assert reader.nbytes < lossless + compressed / 16  # ...and cost ~1/32 of their fp32 bytes


@pytest.mark.parametrize("family,scale", [("qwen3_moe", "matrix"), ("mixtral", "row"), ("gpt_oss", "matrix")])
def test_distilling_a_moe_delta_trains_every_scale_experts_included(recent_pairs, recent_deltas, family, scale, tmp_path):
    """Per-expert checkpoint matrices (Qwen3-MoE; Mixtral with row scales) and stacked 3-D experts
    (gpt-oss) train their scales like the linears (an expert when calibration routes to it); signs
    stay bit for bit, and the held-out logit error falls."""
    from bitdelta.distill import DistillConfig, distill

    base_dir, ft_dir = recent_pairs[family]
    delta = bitdelta.compress(base_dir, ft_dir, tmp_path / "delta", scale=scale, progress=False)
    before = DeltaReader(delta)
    scales, signs = ({name: getattr(before.binary_delta(name), part) for name in before.config.compressed} for part in ("scale", "signs"))
    record = distill(base_dir, ft_dir, delta, DistillConfig(steps=8, samples=8, heldout=4, seq_len=32, batch_size=4, lr=1e-4), progress=False)
    after = DeltaReader(delta)
    assert any(".experts." in name for name in after.config.compressed)
    assert record["distilled_scales"] == len(after.config.compressed)
    trained = {name: not torch.equal(after.binary_delta(name).scale, scales[name]) for name in after.config.compressed}
    for name in after.config.compressed:
        assert after.binary_delta(name).scale.shape == scales[name].shape
        assert torch.equal(after.binary_delta(name).signs, signs[name])
    # every linear trains; an expert trains when a calibration token is routed to it (nearly all, with
    # 8 x 32 tokens; per-expert checkpoint matrices each count, stacked ones train as one tensor)
    assert all(changed for name, changed in trained.items() if ".experts" not in name)
    experts = [changed for name, changed in trained.items() if ".experts" in name]
    assert sum(experts) >= 0.75 * len(experts), f"{sum(experts)} of {len(experts)} expert scales trained"
    assert record["heldout_after"]["logit_mse"] < record["heldout_before"]["logit_mse"]


def test_info_shows_a_layers_experts_in_one_row_and_json_keeps_every_matrix(recent_deltas):
    import json

    from conftest import run_cli

    code, table, _ = run_cli("info", recent_deltas["mixtral"])
    assert code == 0
    # 2 layers x w1, w2, w3, each folded over experts 0-3 into a row shaped 4xNxK (a name may wrap)
    assert len(re.findall(r"\b4x\d+x\d+\b", table)) == 6
    assert "0-3" in table.replace("\n", "") and "experts.1." not in table
    code, stdout, _ = run_cli("info", recent_deltas["mixtral"], "--json")
    summary = json.loads(stdout)
    assert sum(".experts." in row["name"] for row in summary["tensors"]) == 2 * 3 * 4


@pytest.mark.parametrize("family", ["qwen3", "phi3", "olmo2", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_the_engine_serves_the_finetunes_of_a_family_as_merged(recent_pairs, recent_deltas, family, tmp_path):
    """Qwen3 normalises each query and key head (q_norm, k_norm) before RoPE, and its fine-tune changed
    those weights; Phi-3 computes q/k/v and gate/up each as one fused linear; OLMo 2 normalises whole
    query and key projections and each block's outputs rather than its inputs; Mixtral and Qwen3-MoE
    route each token to two of four experts, whose matrices the checkpoint names one per expert; Gemma
    2 soft-caps scores and logits. The prompt is longer than Gemma's sliding windows, so their local
    layers see only the window. In one batch of the
    fine-tune (matrix and row scales) and the base, each row's logits and greedy answer are its own
    model's alone."""
    from transformers import AutoModelForCausalLM

    from bitdelta import compress, load
    from bitdelta.engine import Engine, EngineConfig, SamplingParams

    base, finetuned = recent_pairs[family]
    deltas = {f"{family}-ft": recent_deltas[family], f"{family}-ft-row": compress(base, finetuned, tmp_path / "row", scale="row", progress=False)}
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=8, prefill_chunk=512))
    for name, path in deltas.items():
        engine.store.register(name, path, load_now=True)
    names = [*deltas, engine.store.names()[0]]
    models = [load(base, deltas[name], dtype="float32") for name in deltas] + [AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)]
    prompt = engine.store.get(names[0]).tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    steps = []
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: steps.append(forward(batch, kv)) or steps[-1]
    outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=8, temperature=0)) for name in names])
    if family in ("qwen3", "olmo2", "gemma3"):
        assert "model.layers.0.self_attn.q_norm.weight" in engine.model.tables  # the fine-tune's own q/k norms are routed
    windows = [window for window in engine.model.windows if window is not None]
    assert len(prompt) > max(windows, default=0)  # a windowed layer's window is shorter than the prompt
    assert bool(windows) == family.startswith("gemma")
    if family in tiny.MOE_FAMILIES:  # each row routed by its own fine-tune's router to its own fine-tune's experts
        assert "model.layers.0.mlp.gate.weight" in engine.model.tables
        assert all(layer.scales[fused].abs().sum() > 0 for layer in engine.model.experts.values() for fused in layer.scales)
    expected = []
    for row, (model, out) in enumerate(zip(models, outputs)):
        with torch.no_grad():
            expected.append(model(torch.tensor([prompt])).logits[0, -1])
        torch.testing.assert_close(steps[0][row], expected[-1], rtol=1e-4, atol=1e-4)
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert [token for output in out for token in output.token_ids] == alone, names[row]
    assert (expected[0] - expected[2]).abs().max() > 1e-2  # fine-tune and base differ: the comparison is not vacuous


@pytest.mark.parametrize("family", tiny.MOE_FAMILIES)
def test_eval_reports_the_gain_a_moe_delta_keeps_and_its_baselines(recent_pairs, recent_deltas, family):
    """Gain kept by the delta; the baselines approximate every expert matrix in the model's fused
    tensors (the 1-bit baseline then equals the stored delta), except stacked 3-D experts (gpt-oss),
    refused in one line."""
    from bitdelta.errors import EvaluationError
    from bitdelta.eval import evaluate

    base, finetuned = recent_pairs[family]
    result = evaluate(base, finetuned, recent_deltas[family], windows=8, seq_len=64, device="cpu")
    rows = {row["model"]: row for row in result["rows"]}
    assert 0.5 < rows["delta"]["gain_kept"]["loss"] <= 1.2 and rows["delta"]["kl"] < rows["base"]["kl"]
    if family == "gpt_oss":
        with pytest.raises(EvaluationError, match="stacks a layer's experts in one 3-D tensor"):
            evaluate(base, finetuned, baselines=["svd:equal"], windows=4, seq_len=32, device="cpu")
        return
    result = evaluate(base, finetuned, recent_deltas[family], baselines=["bitdelta", "rtn:2"], windows=8, seq_len=64, device="cpu")
    rows = {row["model"]: row for row in result["rows"]}
    assert rows["bitdelta"]["kl"] == pytest.approx(rows["delta"]["kl"], rel=1e-3)  # the baseline is the stored delta, experts included
    assert rows["rtn:2"]["kl"] < rows["base"]["kl"]


def test_the_engine_refuses_a_partial_rotary_embedding_in_one_line(recent_pairs, tmp_path):
    import json
    import shutil

    from bitdelta.engine import Engine, EngineConfig
    from bitdelta.errors import IncompatibleModelsError

    base = shutil.copytree(recent_pairs["phi3"][0], tmp_path / "partial")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"partial_rotary_factor": 0.5}))
    with pytest.raises(IncompatibleModelsError, match="partial_rotary_factor 0.5"):
        Engine(base, EngineConfig(device="cpu", dtype="float32"))


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("family", ["qwen3", "phi3", "olmo2", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_on_a_gpu_in_bf16_each_row_of_a_mixed_batch_gets_its_merged_finetunes_logits(recent_pairs, recent_deltas, family):
    """The families' own pieces (q/k norms through the norm kernel with per-row tables, fused linears,
    output norms, offset norms, experts grouped per expert and slot) on the Triton path, then decode
    steps replayed as CUDA graphs."""
    from bitdelta import load
    from bitdelta.engine import Engine, EngineConfig, SamplingParams

    base = recent_pairs[family][0]
    engine = Engine(base, EngineConfig(device="cuda", dtype="bfloat16", max_gpu_deltas=2))
    engine.store.register("ft", recent_deltas[family], load_now=True)
    names = ["ft", engine.store.names()[0]]
    prompt = engine.store.get("ft").tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    steps = []
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: steps.append(forward(batch, kv)) or steps[-1]
    outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=8, temperature=0)) for name in names])
    from transformers import AutoModelForCausalLM

    models = [load(base, recent_deltas[family], dtype="bfloat16", device="cuda"), AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()]
    for row, model in enumerate(models):
        with torch.no_grad():
            expected = model(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        got = steps[0][row].float()
        # bf16 through two layers, merged weights rounded once versus x@W + s*(x@sign) in fp32: ~1e-3 a layer
        assert (got - expected).norm() / expected.norm() < 3e-2, names[row]
        assert got.argmax() == expected.argmax(), names[row]
    assert all(out[-1].finish_reason is not None for out in outputs)
    assert engine.graphs.replays > 0  # MoE blocks too: their experts run in one launch each, read on the device


@pytest.mark.parametrize("model_type,name,fused,expert,part", [
    ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w3.weight", "model.layers.3.mlp.experts.gate_up_proj", 7, 1),
    ("mixtral", "model.layers.0.block_sparse_moe.experts.0.w2.weight", "model.layers.0.mlp.experts.down_proj", 0, 0),
    ("qwen3_moe", "model.layers.5.mlp.experts.12.gate_proj.weight", "model.layers.5.mlp.experts.gate_up_proj", 12, 0),
])
def test_checkpoint_expert_names_are_placed_in_the_models_fused_tensors_by_transformers_rules(model_type, name, fused, expert, part):
    from bitdelta.model_names import CheckpointNames

    names = CheckpointNames(model_type)
    placed = names.fused_expert(name)
    assert (placed.fused, placed.expert, placed.part) == (fused, expert, part)
    assert placed.rows(10) == (slice(5 * part, 5 * part + 5) if placed.parts == 2 else slice(0, 10))
    assert names.fused_expert("model.layers.3.self_attn.q_proj.weight") is None
    router = name.rsplit(".experts.", 1)[0] + ".gate.weight"  # Mixtral's block_sparse_moe is the model's mlp
    assert names.renamed(router) == fused.rsplit(".experts.", 1)[0] + ".gate.weight"


def test_over_a_quantized_base_the_experts_are_quantized_too_and_each_row_is_served_as_merged(recent_pairs, tmp_path):
    """compress --base-quant int4 on Mixtral quantizes the experts' matrices as well as the linears
    (they are most of the model); the engine holds them quantized, and a batch of the fine-tune and
    the quantized base gets each one's logits and greedy answer."""
    from transformers import AutoModelForCausalLM

    from bitdelta import compress, load
    from bitdelta.apply import quantized_base_model
    from bitdelta.engine import Engine, EngineConfig, SamplingParams

    base, finetuned = recent_pairs["mixtral"]
    delta = compress(base, finetuned, tmp_path / "int4", base_quant="int4", progress=False)
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=4, prefill_chunk=512, base_quant="int4"))
    assert all(not isinstance(weight, torch.Tensor) for layer in engine.model.experts.values() for weight in layer.weights.values())
    engine.store.register("ft", delta, load_now=True)
    quantized = quantized_base_model(base, "int4", torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(quantized.get_parameter(experts), plain.get_parameter(experts))
    prompt = engine.store.get("ft").tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    steps = []
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: steps.append(forward(batch, kv)) or steps[-1]
    names = ["ft", engine.store.names()[0]]
    outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=6, temperature=0)) for name in names])
    for row, (model, out) in enumerate(zip((load(base, delta, dtype="float32"), quantized), outputs)):
        with torch.no_grad():
            torch.testing.assert_close(steps[0][row], model(torch.tensor([prompt])).logits[0, -1], rtol=1e-4, atol=1e-4)
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert [token for output in out for token in output.token_ids] == alone


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_served_over_http_a_familys_finetune_streams_its_merged_answer(recent_pairs, recent_deltas, family, tmp_path):
    """`bitdelta serve` on a newer family (Gemma 2's soft-capping and windows; Qwen3-MoE's experts):
    streamed and whole completions both equal the merged fine-tune's greedy answer under transformers."""
    import shutil
    import subprocess
    import sys

    import openai
    from test_server import free_port, wait_healthy
    from transformers import AutoTokenizer

    from bitdelta import load

    base = recent_pairs[family][0]
    shutil.copytree(recent_deltas[family], tmp_path / "deltas" / "ft")
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "bitdelta.server", str(base), "--deltas", str(tmp_path / "deltas"),
                                    "--port", str(port), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log=log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        tokenizer = AutoTokenizer.from_pretrained(recent_deltas[family])
        ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
        merged = load(base, recent_deltas[family], dtype="float32")
        expected = tokenizer.decode(merged.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):],
                                    skip_special_tokens=True)
        whole = client.completions.create(model="ft", prompt=ids, max_tokens=10, temperature=0)
        chunks = list(client.completions.create(model="ft", prompt=ids, max_tokens=10, temperature=0, stream=True))
        assert whole.choices[0].text == expected
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == expected
    finally:
        process.terminate()
        process.wait(30)
