"""1-bit deltas over a quantized base: the recipes, compress/merge/distill against Q(base), and the
engine serving Q(base) + delta, with deltas made for another base quantization refused."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bitdelta
from bitdelta.apply import applied_delta
from bitdelta.checkpoint import Checkpoint
from bitdelta.errors import BitDeltaError, IncompatibleModelsError
from bitdelta.fileformat import DeltaReader
from bitdelta.quant import GROUP, RECIPES, quantize
from bitdelta.targets import block_linears
from conftest import needs_triton_interpreter, quantize_in_place, run_in_triton_interpreter

# relative RMS error of each recipe on Gaussian rows: int8 ~ 1/127 of the row's max (~4 sigma) /
# sqrt(12); fp8 e4m3 a 3-bit mantissa (~2-3%); int4 1/7 of a group's max: bounds with 2x margin
ERROR_BOUNDS = {"int8": 0.015, "fp8": 0.05, "int4": 0.25}


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_rounds_to_nearest_within_its_precision_and_is_idempotent(recipe):
    weight = torch.randn(48, 3 * GROUP + 17) * 0.02  # a partial last int4 group
    weight[5] = 0  # an all-zero row dequantizes to zeros, not NaN
    quantized = quantize(weight, recipe)
    values = quantized.dequantize()
    assert values.shape == weight.shape and torch.isfinite(values).all() and (values[5] == 0).all()
    assert (values - weight).norm() / weight.norm() < ERROR_BOUNDS[recipe]
    assert (values - weight).norm() / weight.norm() > 1e-4  # it did quantize
    assert torch.equal(quantize(values, recipe).dequantize(), values)  # Q(Q(w)) = Q(w): a served base re-quantizes exactly
    fp16_bytes = weight.numel() * 2
    assert quantized.nbytes < fp16_bytes * (0.4 if recipe == "int4" else 0.55)  # int4 pads its last group


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantize_goes_a_block_of_rows_at_a_time_as_the_whole(recipe, monkeypatch):
    """Bit for bit the whole matrix's codes and scales (every recipe quantizes a row on its own), with
    a given row scale (a tensor-parallel share's) too; a matrix without rows stays one."""
    import bitdelta.quant as quant

    weight = torch.randn(50, 300) * 0.02
    absmax = None if recipe == "int4" else weight.abs().amax(dim=1, keepdim=True) * 1.5  # the whole row's
    whole = [quantize(weight, recipe), quantize(weight, recipe, absmax)]
    monkeypatch.setattr(quant, "ROW_BLOCK_ELEMENTS", 7 * 300)  # 7 rows a block, the last one short
    for expected, blocked in zip(whole, [quantize(weight, recipe), quantize(weight, recipe, absmax)]):
        assert torch.equal(blocked.data.view(torch.uint8), expected.data.view(torch.uint8))
        assert torch.equal(blocked.scale, expected.scale) and blocked.shape == expected.shape
    if recipe != "int4":  # no rows (an int4 view needs some)
        assert quantize(torch.zeros(0, 300), recipe).dequantize().shape == (0, 300)


def test_int4_stores_two_values_a_byte_and_rows_slice_alike():
    weight = torch.randn(8, 2 * GROUP) * 0.02
    quantized = quantize(weight, "int4")
    assert quantized.data.dtype == torch.uint8 and quantized.data.shape == (8, GROUP)
    assert torch.equal(quantized.rows(slice(2, 5)).dequantize(), quantized.dequantize()[2:5])


def test_an_unknown_recipe_is_refused_in_one_line(llama_pair, tmp_path):
    with pytest.raises(BitDeltaError, match="unknown base quantization 'int3'; use one of int8, fp8, int4"):
        bitdelta.compress(*llama_pair, tmp_path / "d", base_quant="int3", progress=False)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_quantized_base_view_quantizes_a_block_of_rows_at_a_time_as_the_whole(llama_pair, recipe, monkeypatch):
    import bitdelta.quant
    from bitdelta.quant import QuantizedBase

    checkpoint = Checkpoint(llama_pair[0])
    names = sorted(block_linears(checkpoint))[:3]
    whole = {name: quantize(checkpoint.mapped(name), recipe).dequantize() for name in names}
    monkeypatch.setattr(bitdelta.quant, "ROW_BLOCK_ELEMENTS", 5 * checkpoint.tensors[names[0]].shape[1] + 1)  # 5-row blocks
    view = QuantizedBase(checkpoint, recipe, names)
    for name in names:
        assert view.mapped(name).dtype == torch.float32 and torch.equal(view.mapped(name), whole[name])


@pytest.fixture(scope="module")
def quantized_deltas(llama_pair, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("quantized-deltas")
    return {recipe: bitdelta.compress(*llama_pair, folder / recipe, base_quant=recipe, progress=False) for recipe in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES)
def test_merge_writes_the_quantized_base_plus_the_delta(llama_pair, quantized_deltas, recipe, tmp_path):
    base, finetuned = llama_pair
    delta = quantized_deltas[recipe]
    reader = DeltaReader(delta)
    assert reader.config.base_quant["recipe"] == recipe and len(reader.config.base_quant["fingerprint"]) == 32
    merged = bitdelta.merge(base, delta, tmp_path / "merged", progress=False)
    state = {name: t for file in merged.glob("*.safetensors") for name, t in load_file(file).items()}
    fine = {name: t for file in finetuned.glob("*.safetensors") for name, t in load_file(file).items()}
    checkpoint = Checkpoint(base)
    quantized_names = block_linears(checkpoint)
    for name, tensor in state.items():
        if name in reader.config.compressed:
            base_weight = checkpoint.mapped(name)
            expected = applied_delta(reader.binary_delta(name), quantize(base_weight, recipe).dequantize(), tensor.dtype)
            assert torch.equal(tensor, expected), name
            unquantized = applied_delta(reader.binary_delta(name), base_weight, tensor.dtype)
            assert name not in quantized_names or not torch.equal(tensor, unquantized)  # the base was quantized
        else:
            assert torch.equal(tensor, fine[name]), name  # everything else exactly the fine-tune's


def test_eval_scores_the_quantized_base_and_the_delta_over_it(llama_pair, quantized_deltas):
    from bitdelta.errors import EvaluationError
    from bitdelta.eval import evaluate

    result = evaluate(*llama_pair, delta=quantized_deltas["int4"], windows=4, seq_len=32, device="cpu", base_quant="int4",
                      baselines=["int4base"])
    rows = {row["model"]: row for row in result["rows"]}
    assert list(rows) == ["fine-tune", "base", "base-int4", "delta", "int4base"]
    assert rows["delta"]["gain_kept"]["loss"] > 0.5
    assert rows["base-int4"]["loss"] != rows["base"]["loss"]  # the quantized base is another model
    assert rows["int4base"]["loss"] == pytest.approx(rows["delta"]["loss"], rel=1e-4)  # the baseline is the stored delta
    with pytest.raises(EvaluationError, match="compressed with --base-quant int4; evaluate it with the same"):
        evaluate(*llama_pair, delta=quantized_deltas["int4"], windows=4, seq_len=32, device="cpu")


def test_distilling_over_a_quantized_base_trains_against_it(llama_pair, quantized_deltas, tmp_path):
    import shutil

    from bitdelta.distill import DistillConfig, distill

    delta = shutil.copytree(quantized_deltas["int4"], tmp_path / "delta")
    record = distill(*llama_pair, delta, DistillConfig(steps=6, samples=8, heldout=4, seq_len=32, batch_size=4, lr=1e-4), progress=False)
    assert record["heldout_after"]["logit_mse"] < record["heldout_before"]["logit_mse"]
    assert DeltaReader(delta).config.base_quant == DeltaReader(quantized_deltas["int4"]).config.base_quant


@pytest.mark.parametrize("recipe", ["int8", "int4"])
def test_the_engine_serves_a_quantized_base_and_its_deltas_as_merged(llama_pair, quantized_deltas, recipe):
    """One batch: the delta's fine-tune and the quantized base, each row's logits and greedy answer
    exactly its own model's under transformers (merged Q(base) + delta; the quantized base alone),
    not the unquantized base's."""
    from transformers import AutoModelForCausalLM

    from bitdelta.engine import Engine, EngineConfig, SamplingParams

    base = llama_pair[0]
    engine = Engine(base, EngineConfig(device="cpu", dtype="float32", max_batch=4, base_quant=recipe))
    assert all(not isinstance(linear.weight, torch.Tensor) for linear in engine.model.linears.values())  # held quantized
    engine.store.register("ft", quantized_deltas[recipe], load_now=True)
    merged = bitdelta.load(base, quantized_deltas[recipe], dtype="float32")
    plain_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    quantized_base = quantize_in_place(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), engine.model.linears, recipe)
    prompt = engine.store.get("ft").tokenizer("def parse(self, text):\n", add_special_tokens=False)["input_ids"]
    names = ["ft", engine.store.names()[0]]
    steps = []
    engine.model.forward = lambda batch, kv, forward=engine.model.forward: steps.append(forward(batch, kv)) or steps[-1]
    outputs = engine.generate([(name, prompt, SamplingParams(max_tokens=8, temperature=0)) for name in names])
    with torch.no_grad():
        unquantized = plain_base(torch.tensor([prompt])).logits[0, -1]
    for row, (model, out) in enumerate(zip((merged, quantized_base), outputs)):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(steps[0][row], expected, rtol=1e-4, atol=1e-4)
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert [token for output in out for token in output.token_ids] == alone
    assert (steps[0][1] - unquantized).abs().max() > 1e-3  # the served base is the quantized one


@pytest.mark.parametrize("recipe", RECIPES)
def test_served_in_another_dtype_the_engine_quantizes_the_checkpoints_own_values(llama_pair, recipe):
    """An fp32 checkpoint served in bf16 (a GPU's default): the stored codes are those compress made from
    the checkpoint's values, not from their bf16 rounding; everything left unquantized is bf16."""
    from bitdelta.engine import Engine, EngineConfig

    base = llama_pair[0]
    engine = Engine(base, EngineConfig(device="cpu", dtype="bfloat16", max_batch=2, base_quant=recipe))
    checkpoint = Checkpoint(base)
    for name, linear in engine.model.linears.items():
        expected = quantize(checkpoint.mapped(name).float(), recipe)
        assert torch.equal(linear.weight.data.view(torch.uint8), expected.data.view(torch.uint8)), name
        assert torch.equal(linear.weight.scale, expected.scale), name
    assert {parameter.dtype for parameter in engine.model.model.parameters()} == {torch.bfloat16}
    assert engine.model.dtype == torch.bfloat16


def test_over_a_quantized_base_the_engine_moves_and_quantizes_one_layer_at_a_time(tmp_path, monkeypatch):
    """A layer goes to the device only once the one before is quantized, so a base that fits only
    quantized never stands whole in full precision there; an MoE block's full-precision experts go."""
    from transformers import AutoModelForCausalLM

    import bitdelta.engine.model as engine_model
    from bitdelta import tiny
    from bitdelta.engine.model import MultiTenantModel

    base, _ = tiny.make_pair(tmp_path, tiny.TinySpec(family="qwen3_moe"))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    events = []
    for index, layer in enumerate(model.model.layers):
        layer.to = lambda device, index=index, move=layer.to: events.append(("to", index)) or move(device)
    quantize_linears = engine_model.quantize_linears
    monkeypatch.setattr(engine_model, "quantize_linears", lambda linears, stacks, recipe: events.append(
        ("quantize", {int(name.split(".")[2]) for name in linears})) or quantize_linears(linears, stacks, recipe))
    served = MultiTenantModel(model, 2, "int8", device=torch.device("cpu"))
    assert events == [event for index in range(len(model.model.layers)) for event in (("to", index), ("quantize", {index}))]
    assert served.experts and not any(hasattr(layer.module, name) for layer in served.experts.values() for name in layer.weights)
    assert not any("experts" in name for name, _ in model.named_parameters())


@pytest.mark.skipif(not Path("/proc/self/status").exists() or sys.platform != "linux", reason="reads a Linux process's memory")
def test_serving_over_a_quantized_base_never_copies_the_full_precision_checkpoint_into_memory(tmp_path):
    """The engine reads the checkpoint's tensors mapped from its files (transformers maps safetensors) and
    keeps only the quantized base and its delta slots in the process's own memory: a 70B base served
    under INT4 needs no 140 GB of RAM for its bf16 weights. A bf16 checkpoint of ~200 MB of linears,
    served under int4 with one slot, keeps 0.33x their bytes (int4 codes and group scales 0.27x, the
    slot's bits 0.06x) and peaks at 0.85-0.95x while it loads (a layer's stacked q/k/v and gate/up, the
    quantizer's fp32 rows, what the allocator keeps of them); a copy of the checkpoint peaked at 1.46x."""
    import subprocess

    from transformers import LlamaConfig, LlamaForCausalLM

    def write_checkpoint(folder, hidden, width, layers):
        config = LlamaConfig(hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=512)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.02)
        model.save_pretrained(folder)
        return sum(p.numel() * 2 for name, p in model.named_parameters() if "proj" in name)

    write_checkpoint(tmp_path / "warm-up", 64, 128, 1)  # the code's own memory (modules, allocator) comes first
    linear_bytes = write_checkpoint(tmp_path / "base", 1024, 2816, 8)
    code = """
import ctypes, gc, re, sys, threading
from bitdelta.engine import Engine, EngineConfig
def own_memory():  # the process's anonymous pages: not the mapped checkpoint's, which the kernel may drop
    return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
config = EngineConfig(device="cpu", dtype="bfloat16", max_batch=1, max_gpu_deltas=1, kv_blocks=4, base_quant="int4")
Engine(sys.argv[1], config)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the warm-up freed goes back to the system
before, peak, done = own_memory(), [0], threading.Event()
def watch():  # the highest reading while the engine loads, every 2 ms
    while not done.wait(0.002):
        peak[0] = max(peak[0], own_memory())
watcher = threading.Thread(target=watch)
watcher.start()
engine = Engine(sys.argv[2], config)
done.set()
watcher.join()
print(max(peak[0], own_memory()) - before)
"""
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "warm-up"), str(tmp_path / "base")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    grown = int(result.stdout.split()[-1])
    assert grown < 1.25 * linear_bytes, (grown, linear_bytes)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_cpu_path_multiplies_by_the_quantized_base_in_fp32(recipe):
    """bf16 x over a quantized base on the CPU: the base is not rounded to bf16 before the fp32 product
    (the GPU kernels dequantize in fp32 registers)."""
    from bitdelta.kernels import bitdelta_matmul, reference

    n, k = 64, 300
    weight = quantize(torch.randn(n, k) * 0.05, recipe)
    signs = torch.randint(-(2**31), 2**31 - 1, (2, n, (k + 31) // 32), dtype=torch.int32)
    scales, x = torch.rand(2, n) * 0.02, torch.randn(8, k).bfloat16()
    slot_ids = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1])
    expected = reference.bitdelta_matmul(x, weight.dequantize(torch.float32), signs, scales, slot_ids)
    assert torch.equal(bitdelta_matmul(x, weight, signs, scales, slot_ids), expected)


@pytest.mark.parametrize("record", [{"recipe": "int4"}, "int4", {"recipe": 4, "fingerprint": "f"}])
def test_a_malformed_quantized_base_record_is_a_format_error(quantized_deltas, record, tmp_path):
    import shutil

    from bitdelta.errors import DeltaFormatError
    from bitdelta.fileformat import CONFIG_FILE

    delta = tmp_path / "delta"
    shutil.copytree(quantized_deltas["int4"], delta)
    config = json.loads((delta / CONFIG_FILE).read_text())
    config["base_quant"] = record
    (delta / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DeltaFormatError, match="records its quantized base as .*; the delta is corrupted, recreate it"):
        DeltaReader(delta)


def test_a_delta_for_another_base_quantization_is_refused_clearly(llama_pair, llama_delta, quantized_deltas, tmp_path):
    from bitdelta.engine import Engine, EngineConfig

    base = llama_pair[0]
    plain = Engine(base, EngineConfig(device="cpu", dtype="float32"))
    with pytest.raises(IncompatibleModelsError, match="made for the quantized int8 base, not the unquantized one; use --base-quant int8"):
        plain.store.register("q", quantized_deltas["int8"])
    fp8 = Engine(base, EngineConfig(device="cpu", dtype="float32", base_quant="fp8"))
    with pytest.raises(IncompatibleModelsError, match="use --base-quant int8"):
        fp8.store.register("q", quantized_deltas["int8"])
    with pytest.raises(IncompatibleModelsError, match="use no --base-quant"):
        fp8.store.register("plain", llama_delta)


def test_a_delta_for_another_base_and_recipe_names_the_base_first(quantized_deltas):
    from bitdelta.engine.store import check_base

    reader = DeltaReader(quantized_deltas["int8"])
    with pytest.raises(IncompatibleModelsError, match="has other weights .*; pass the base it was made from"):
        reader.check_base("0" * 32, "other-base", {"recipe": "fp8"})
    with pytest.raises(IncompatibleModelsError, match="not the served base"):
        check_base(reader.config, "0" * 32, reader.config.model_type, reader.path, {"recipe": "fp8"})


def test_the_cli_compresses_over_a_quantized_base_and_refuses_an_unknown_recipe_in_one_line(llama_pair, tmp_path):
    from conftest import run_cli

    base, finetuned = (str(path) for path in llama_pair)
    code, out, _ = run_cli("compress", base, finetuned, "-o", str(tmp_path / "d"), "--base-quant", "fp8", "--quiet")
    assert code == 0 and "wrote" in out
    assert DeltaReader(tmp_path / "d").config.base_quant["recipe"] == "fp8"
    code, _, err = run_cli("compress", base, finetuned, "-o", str(tmp_path / "e"), "--base-quant", "int3")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "unknown base quantization 'int3'" in err
    assert not (tmp_path / "e").exists()


def test_info_says_which_quantized_base_a_delta_needs(quantized_deltas):
    from conftest import run_cli

    code, out, _ = run_cli("info", str(quantized_deltas["fp8"]))
    assert code == 0 and "quantized fp8: apply and serve with --base-quant fp8" in " ".join(out.split())
    code, out, _ = run_cli("info", str(quantized_deltas["int8"]), "--json")
    assert json.loads(out)["base_quant"]["recipe"] == "int8"


# a batch for each kernel path: (rows, slot ids, the path `choose` gives them)
PATH_BATCHES = [
    ("one row (MERGED_TILES split; GEMV run as well)", [0], "MERGED_TILES"),
    ("two rows of two slots (GEMV)", [0, 1], "GEMV"),
    ("no delta rows (DENSE)", [-1] * 6, "DENSE"),
    ("40 rows, none with a delta (DENSE, the product transposed)", [-1] * 40, "DENSE"),
    ("16 rows of one slot and base rows (MERGED_TILES)", [0] * 16 + [-1] * 3, "MERGED_TILES"),
    ("a prompt of 200 rows (MERGED_TILES, prefill tiles)", [1] * 200, "MERGED_TILES"),
    ("24 rows of three slots (BITMMA, or DOT without Gluon)", [0, 1, 2] * 8, "BITMMA"),
    ("two prompts of 520 rows and base rows (MERGED_GEMM)", [0] * 520 + [2] * 520 + [-1] * 5, "MERGED_GEMM"),
]


@needs_triton_interpreter
@pytest.mark.parametrize("recipe", ["int8", "int4"])  # the interpreter has no fp8: GPU tests only
def test_every_triton_path_reads_a_quantized_base_as_stored_in_the_interpreter(recipe):
    """Each Triton path over an int8 or int4 base in the CPU interpreter (GEMV, MERGED_TILES with K
    split and transposed, DOT, MERGED_GEMM, DENSE at 5, 20 and 70 rows, and the stored product with K
    split, plain and transposed: all but BITMMA, which is Gluon): tiles dequantized in registers
    (row scales; int4 nibbles and group scales), as the reference computes over the dequantized base
    (fp16 activations, a K tail inside a group, bias: half an ulp, x3). A scale or nibble misread
    would cost whole units of the weights."""
    code = """
import torch
from bitdelta.kernels import reference
from bitdelta.kernels.grouping import build_plan
from bitdelta.kernels.paths import GemvTiles, KernelPath, MergedGemmTiles, MergedTiles, Tiles, run_path
from bitdelta.quant import quantize
n, k = 48, 1000
weight = quantize(torch.randn(n, k) * 0.05, "RECIPE")
signs = torch.randint(-(2**31), 2**31 - 1, (3, n, (k + 31) // 32), dtype=torch.int32)
signs[..., -1] &= (1 << (k % 32)) - 1
scales, bias = torch.rand(3, n) * 0.02 + 0.002, torch.randn(n).half()
cases = [(KernelPath.GEMV, GemvTiles(2, 8, 512, 2, 1), [0, 1]),
         (KernelPath.DENSE, None, [-1] * 5),
         (KernelPath.DENSE, None, [-1] * 20),  # decode tiles past 16 rows: shorter K steps
         (KernelPath.DENSE, None, [-1] * 70),  # prompt tiles: transposed, K steps shorter than an int4 group
         (KernelPath.MERGED_TILES, MergedTiles(8, 16, 64, 4, 1, split_k=3), [0] * 5 + [-1] * 2 + [2]),
         (KernelPath.MERGED_TILES, MergedTiles(16, 16, 256, 4, 1, transposed=True), [1] * 18 + [0] * 3),  # two groups a K step
         (KernelPath.DOT, Tiles(8, 16, 64, 4, 1), [0, 1, 2, -1, 1]),
         (KernelPath.MERGED_GEMM, MergedGemmTiles(32, 256, 4), [0] * 3 + [-1] * 2)]
for path, tiles, ids in cases:
    slot_ids = torch.tensor(ids)
    x = torch.randn(len(ids), k).half()
    out = torch.full((len(ids), n), float("nan")).half()
    run_path(path, tiles, x, weight, signs, scales, build_plan(slot_ids), bias, out=out)
    ref = reference.bitdelta_matmul(x.float(), weight.dequantize(), signs, scales, slot_ids, bias)
    print(((out.float() - ref).norm() / ref.norm()).item())
from bitdelta.kernels.base_product import stored
from bitdelta.kernels.base_product_triton import ProductTiles, stored_product
from bitdelta.kernels.split_k import split_counters
for m, tiles in [(6, ProductTiles(16, 16, 128, 4, 1, False, split_k=3)), (20, ProductTiles(32, 16, 64, 4, 1, True, split_k=4))]:
    x = torch.randn(m, k).half()
    ref = x.float() @ weight.dequantize().t() + bias.float()
    print(((stored_product(x, stored(weight), bias, torch.float16, tiles).float() - ref).norm() / ref.norm()).item())
print(int(split_counters(torch.device("cpu"), 1).abs().sum()))
"""
    *errors, counters = run_in_triton_interpreter(code.replace("RECIPE", recipe)).split()
    assert len(errors) == 10 and all(float(e) < 1e-3 for e in errors), errors
    assert counters == "0"  # each split launch left its arrival counters at zero


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("batch", PATH_BATCHES, ids=[b[0] for b in PATH_BATCHES])
def test_on_a_gpu_each_path_reads_a_quantized_base_as_stored(recipe, batch):
    """bitdelta_matmul over an int8, fp8 or int4 base on the GPU, a batch for each path: each row
    equals the reference over the dequantized base (bf16: one rounding of each merged weight and of
    the output, ~2^-8 relative; bound 1e-2)."""
    from bitdelta.kernels import bitdelta_matmul, gluon_available, reference
    from bitdelta.kernels.base_product import form_of
    from bitdelta.kernels.grouping import build_plan
    from bitdelta.kernels.paths import GemvTiles, KernelPath, plan_choice, run_path

    _, ids, expected_path = batch
    n, k = 384, 1000
    weight = quantize(torch.randn(n, k) * 0.05, recipe).to("cuda")
    signs = torch.randint(-(2**31), 2**31 - 1, (3, n, (k + 31) // 32), dtype=torch.int32, device="cuda")
    scales = torch.rand(3, n, device="cuda") * 0.02 + 0.002
    bias = torch.randn(n, device="cuda").bfloat16()
    slot_ids = torch.tensor(ids, device="cuda")
    x = torch.randn(len(ids), k, device="cuda").bfloat16()
    plan = build_plan(slot_ids)
    if expected_path != "BITMMA" or gluon_available():
        assert plan_choice(plan, n, k, base_form=form_of(weight)).path.name == expected_path
    outs = [bitdelta_matmul(x, weight, signs, scales, slot_ids, bias, plan=plan)]
    if len(ids) == 1:  # a quantized base's wider layers keep one row on the gemv: its one-row kernel too
        outs.append(run_path(KernelPath.GEMV, GemvTiles(1, 8, 512, 2, 1), x, weight, signs, scales, plan, bias))
    ref = reference.bitdelta_matmul(x.float(), weight.dequantize(), signs, scales, slot_ids, bias.float())
    for out in outs:
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_on_a_gpu_the_gluon_stored_product_matches_the_reference(recipe):
    """The Gluon product (`base_product_gluon`, not dispatched; the product-tile sweep times it): 5, 20
    and 64 rows; K of 96 (a split with no K at all), 1000 (unaligned: byte loads) and 1040 (aligned, a
    16-column tail: the vector loads real layers get); N off its tiles; every tiling the sweep runs, K
    whole and split in 3; fp16 without bias as well. Each launch gets fresh x and an output filled with
    NaN (an unwritten element fails), and a split launch must leave its arrival counters at zero.
    Against x @ Q(W).T in fp32 (one rounding of the output: ~2^-8 relative in bf16; bound 6e-3)."""
    from bitdelta.kernels import gluon_available
    from bitdelta.kernels.base_product import ProductTiles, stored
    from bitdelta.kernels.base_product_gluon import stored_product_gluon
    from bitdelta.kernels.paths.problem import next_pow2
    from bitdelta.kernels.split_k import split_counters
    from benchmarks.quantized_base import GLUON_PRODUCT_TILES

    if not gluon_available():
        pytest.skip("needs Triton with Gluon")
    n = 200
    for k, m in itertools.product((96, 1000, 1040), (5, 20, 64)):
        base = stored(quantize(torch.randn(n, k) * 0.05, recipe).to("cuda"))
        w = base.values.float() * base.scale[:, None]
        for (block_n, block_k, warps), split_k in itertools.product(GLUON_PRODUCT_TILES, (1, 3)):
            tiles = ProductTiles(max(8, next_pow2(m)), block_n, block_k, warps, 1, False, split_k, gluon=True)
            for dtype, with_bias in ((torch.bfloat16, True), (torch.float16, False)):
                x = torch.randn(m, k, device="cuda").to(dtype)
                bias = torch.randn(n, device="cuda").to(dtype) if with_bias else None
                ref = x.float() @ w.t() + (bias.float() if with_bias else 0)
                out = stored_product_gluon(x, base, bias, torch.full((m, n), float("nan"), device="cuda", dtype=dtype), tiles)
                assert ((out.float() - ref).norm() / ref.norm()).item() < 6e-3, (k, m, tiles, dtype)  # NaN fails too
                if split_k > 1:
                    grid = math.ceil(n / block_n) * math.ceil(m / tiles.block_m)
                    assert not split_counters(out.device, grid)[:grid].any(), (k, m, tiles)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", RECIPES)
def test_on_a_gpu_in_bf16_a_quantized_base_and_its_delta_give_the_merged_logits(llama_pair, quantized_deltas, recipe):
    """The engine over a quantized base on the GPU (int8 and fp8 read as stored, int4 dequantized),
    decode steps as CUDA graphs: each row's logits near its merged model's."""
    from bitdelta.apply import quantized_base_model
    from bitdelta.engine import Engine, EngineConfig, SamplingParams

    base = llama_pair[0]
    engine = Engine(base, EngineConfig(device="cuda", dtype="bfloat16", max_gpu_deltas=2, base_quant=recipe))
    engine.store.register("ft", quantized_deltas[recipe], load_now=True)
    prompt = engine.store.get("ft").tokenizer("def parse(self, text):\n", add_special_tokens=False)["input_ids"]
    for names in (["ft"], ["ft", engine.store.names()[0]]):  # one row (the gemv), then two
        steps = []
        engine.model.forward = lambda batch, kv, forward=type(engine.model).forward.__get__(engine.model): steps.append(forward(batch, kv)) or steps[-1]
        engine.generate([(name, prompt, SamplingParams(max_tokens=4, temperature=0)) for name in names])
        models = {"ft": bitdelta.load(base, quantized_deltas[recipe], dtype="bfloat16", device="cuda")}
        if len(names) > 1:
            models[names[1]] = quantized_base_model(base, recipe, torch.bfloat16).cuda()
        for row, name in enumerate(names):
            with torch.no_grad():
                expected = models[name](torch.tensor([prompt], device="cuda")).logits[0, -1].float()
            got = steps[0][row].float()
            # bf16 through two layers, Q(base) + delta rounded once versus x@Q(W) + s*(x@sign) in fp32: ~1e-3 a layer
            assert (got - expected).norm() / expected.norm() < 3e-2 and got.argmax() == expected.argmax(), (names, name)
