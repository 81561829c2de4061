"""bitdelta eval: metrics, baselines, the lm-eval integration (offline) and the command, on tiny real pairs."""

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from bitdelta import load, tiny
from bitdelta.checkpoint import Checkpoint
from bitdelta.errors import BitDeltaError
from bitdelta.eval import EvaluationError, evaluate
from bitdelta.eval import baselines as bl
from bitdelta.eval.cli import eval_command
from bitdelta.eval.exact_match import exact_match, first_integer, problems
from bitdelta.eval.harness import prepare_tasks, run_tasks
from bitdelta.eval.metrics import fidelity, gain_kept, reference

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the network: lm-eval and datasets read local files only."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def models(llama_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, finetuned = (AutoModelForCausalLM.from_pretrained(p).eval() for p in llama_pair)
    return base, finetuned, AutoTokenizer.from_pretrained(llama_pair[1])


@pytest.fixture(scope="session")
def windows(models):
    return tiny.eval_windows(tiny.split(tiny.tokenize(models[2], tiny.finetune_text(300_000)))[1], 8, 64)


@pytest.fixture(scope="session")
def approximator(llama_pair):
    return bl.Approximator(*llama_pair)


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-data") / "heldout.txt"
    path.write_text(tiny.finetune_text(300_000)[-30_000:])
    return path


def weight_error(approximator, method) -> float:
    """Relative squared error of the method's compressible matrices against the fine-tune's."""
    error = total = 0.0
    for name in approximator.names:
        base, finetuned = approximator.base[name], approximator.finetuned[name].float()
        error += (method.approximate(base, finetuned) - finetuned).pow(2).sum().item()
        total += (finetuned - base.float()).pow(2).sum().item()
    return error / total


def test_finetune_against_itself_is_exact_and_base_is_not(models, windows):
    base, finetuned, _ = models
    ref = reference(finetuned, windows, batch_size=4)
    own, other = fidelity(finetuned, ref), fidelity(base, ref)
    assert own["kl"] == pytest.approx(0, abs=1e-6) and own["logit_mse"] == 0 and own["top1"] == 1
    assert other["kl"] > 0.01 and other["logit_mse"] > 0.01 and other["top1"] < 0.9
    assert other["loss"] > own["loss"] and own["ppl"] == pytest.approx(torch.tensor(own["loss"]).exp().item())


def test_loss_and_perplexity_match_the_models_own_loss(models, windows):
    _, finetuned, _ = models
    scores = fidelity(finetuned, reference(finetuned, windows, batch_size=8))
    assert scores["loss"] == pytest.approx(tiny.heldout_loss(finetuned, windows), rel=1e-5)


def test_gain_kept_is_the_share_of_the_improvement():
    assert gain_kept(4.5, base=5.0, finetuned=4.0) == pytest.approx(0.5)  # a loss
    assert gain_kept(0.6, base=0.2, finetuned=0.6) == pytest.approx(1.0)  # an accuracy
    assert gain_kept(1.0, base=1.0, finetuned=1.0) is None


def test_svd_at_full_rank_reproduces_the_finetune(approximator):
    model = approximator.build(bl.SVD(rank=10_000))
    for name in approximator.names:
        torch.testing.assert_close(model.get_parameter(name).detach(), approximator.finetuned[name].float(), atol=1e-5, rtol=1e-5)


def test_svd_error_falls_with_rank_and_equal_storage_rank_fits_one_bit(approximator):
    errors = [weight_error(approximator, bl.SVD(r)) for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]
    assert approximator.storage_bits(bl.SVD(None)) <= approximator.storage_bits(bl.OneBit())
    assert bl.SVD(None).rank_for(4096, 4096) == 128  # 4096^2 bits / (16 * 8192)


def test_rtn_error_8_bit_below_2_bit_below_1_bit(approximator):
    one, two, eight = (weight_error(approximator, m) for m in (bl.OneBit(), bl.RTN(2), bl.RTN(8)))
    assert eight < 1e-3 < two < one


def test_bitdelta_baseline_equals_the_compressed_delta(approximator, llama_pair, llama_delta):
    model, merged = approximator.build(bl.OneBit()), load(llama_pair[0], llama_delta)
    for name in approximator.names:
        torch.testing.assert_close(model.get_parameter(name).detach(), merged.get_parameter(name).detach())


def test_baselines_take_everything_else_from_the_finetune(approximator, llama_pair):
    model, finetuned = approximator.build(bl.RTN(2)), Checkpoint(llama_pair[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(model.get_parameter(name).detach(), finetuned.get(name))


@pytest.mark.parametrize("recipe,closeness", [("int8", 1.5), ("fp8", 2.0), ("int4", 6.0)])
def test_bitdelta_over_a_quantized_base_stays_close_and_equals_the_stored_delta(approximator, models, windows, llama_pair, recipe, closeness, tmp_path):
    """The baseline is BitDelta-Initial over Q(base): what `compress --base-quant` stores, merged,
    weight for weight; its KL to the fine-tune stays near the unquantized base's delta's (coarser
    recipes lose more)."""
    from bitdelta import compress

    ref = reference(models[1], windows)
    one_bit = fidelity(approximator.build(bl.OneBit()), ref)
    over = approximator.build(bl.OverQuantizedBase(recipe))
    quantized = fidelity(over, ref)
    base = fidelity(models[0], ref)
    assert quantized["kl"] < closeness * one_bit["kl"] and quantized["kl"] < 0.5 * base["kl"]
    merged = load(llama_pair[0], compress(*llama_pair, tmp_path / "d", base_quant=recipe, progress=False))
    for name in approximator.names:
        torch.testing.assert_close(over.get_parameter(name).detach(), merged.get_parameter(name).detach())


@pytest.mark.parametrize("spec, method", [("svd:64", bl.SVD(64)), ("svd:equal", bl.SVD(None)), ("rtn:3", bl.RTN(3)),
                                          ("rtn:4:matrix", bl.RTN(4, "matrix")), ("int8base", bl.OverQuantizedBase("int8")), ("int4base", bl.OverQuantizedBase("int4")), ("bitdelta-row", bl.OneBit("row"))])
def test_baseline_specs_parse(spec, method):
    assert bl.parse(spec) == method


@pytest.mark.parametrize("spec", ["svd", "svd:0", "rtn:1", "rtn:9", "gptq:4"])
def test_unknown_baseline_is_a_clear_error(spec):
    with pytest.raises(EvaluationError, match="unknown baseline"):
        bl.parse(spec)


def test_lm_eval_runs_local_tasks_offline(models):
    _, finetuned, tokenizer = models
    tasks = prepare_tasks([str(DATA / "arith_mc.yaml"), str(DATA / "arith_gen.yaml")])
    scores = run_tasks(finetuned, tokenizer, tasks, batch_size=4)
    assert set(scores) == {"bitdelta_arith_mc", "bitdelta_arith_gen"}
    assert 0 <= scores["bitdelta_arith_mc"]["acc"] <= 1 and 0 <= scores["bitdelta_arith_gen"]["exact_match"] <= 1


def test_arithmetic_problems_are_reproducible_and_checkable(models):
    first, again = problems(50, seed=3), problems(50, seed=3)
    assert first == again and first != problems(50, seed=4)
    assert first_integer(" 42\nQuestion") == 42 and first_integer(" forty") is None
    assert 0 <= exact_match(models[1], models[2], first[:8], batch_size=4) <= 1


def test_eval_command_writes_results_json(llama_pair, llama_delta, prose_file, tmp_path):
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # two commands, so typer keeps the command name
    output = tmp_path / "results.json"
    result = CliRunner().invoke(app, [
        "eval", str(llama_pair[0]), "--finetuned", str(llama_pair[1]), "--delta", str(llama_delta), "--data", str(prose_file),
        "--tasks", str(DATA / "arith_mc.yaml"), "--baseline", "svd:equal", "--output", str(output), "--windows", "4", "--seq-len", "64",
    ])
    assert result.exit_code == 0, result.output
    saved = json.loads(output.read_text())
    rows = {row["model"]: row for row in saved["rows"]}
    assert list(rows) == ["fine-tune", "base", "delta", "svd:equal"]
    assert rows["fine-tune"]["kl"] == pytest.approx(0, abs=1e-6) and rows["fine-tune"]["gain_kept"]["loss"] == 1
    assert rows["delta"]["kl"] < rows["base"]["kl"] and rows["delta"]["gain_kept"]["loss"] > 0.5
    assert "acc" in rows["delta"]["tasks"]["bitdelta_arith_mc"] and rows["svd:equal"]["bits_per_weight"] <= 1


def test_missing_delta_is_a_clear_error(llama_pair, tmp_path):
    with pytest.raises(BitDeltaError):
        evaluate(*llama_pair, tmp_path / "no-such-delta")


def test_unknown_task_is_a_clear_error(llama_pair, llama_delta):
    with pytest.raises(EvaluationError, match="unknown lm-eval task no_such_task"):
        evaluate(*llama_pair, llama_delta, tasks=["no_such_task"])
    with pytest.raises(EvaluationError, match="no such file"):
        evaluate(*llama_pair, llama_delta, tasks=["missing.yaml"])


def test_nothing_to_evaluate_is_a_clear_error(llama_pair):
    with pytest.raises(EvaluationError, match="nothing to evaluate"):
        evaluate(*llama_pair)


def test_a_hub_task_offline_is_one_clear_line_before_any_model_loads(llama_pair, llama_delta, tmp_path, monkeypatch):
    """Offline, lm-eval would retry the hub for minutes and end in a long traceback: refuse at once."""
    import socket

    from datasets import config as datasets_config
    from huggingface_hub import constants
    from conftest import run_cli

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    with pytest.raises(EvaluationError, match="truthfulqa_mc2 needs the data set truthfulqa/truthful_qa .* cannot be reached"):
        prepare_tasks(["truthfulqa_mc2"])
    code, _, err = run_cli("eval", llama_pair[0], "--finetuned", llama_pair[1], "--delta", llama_delta, "--tasks", "truthfulqa_mc2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: lm-eval task truthfulqa_mc2"), err
    closed.close()
