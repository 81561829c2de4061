"""Mistakes that used to pass silently (issue 19): a wrong or swapped base, globs that select nothing,
an output that exists only found after the models were read, calibration data smaller than the defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import bitdelta
from bitdelta import tiny
from bitdelta.checkpoint import Checkpoint
from bitdelta.errors import IncompatibleModelsError
from bitdelta.fileformat import DeltaReader
from conftest import run_cli
from test_errors import assert_clean_failure, assert_nothing_written


@pytest.fixture(scope="module")
def other_base(llama_pair, tmp_path_factory) -> Path:
    """A llama of the same shape and tokenizer as the tiny base, initialised and trained on its own
    (another seed; a few steps: 40 steps measured the same cosine to the fine-tune, 0.00): the wrong
    base for the tiny fine-tune."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_pair[0])
    model = tiny.build_model(tiny.TinySpec(), tokenizer, seed=1)
    tiny.train(model, tiny.tokenize(tokenizer, tiny.base_text(100_000)), 10, seed=1)
    folder = tmp_path_factory.mktemp("other-base") / "llama-base"
    tiny._save(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def grown(llama_pair, tmp_path_factory) -> Path:
    """The tiny fine-tune with two tokens added to its vocabulary (as chat fine-tunes do)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_pair[1])
    tokenizer = AutoTokenizer.from_pretrained(llama_pair[1])
    tokenizer.add_tokens(["<|tool|>", "<|result|>"])
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("grown") / "grown"
    tiny._save(model, tokenizer, folder)
    return folder


def test_weight_cosine_separates_finetunes_from_unrelated_models(pairs, other_base):
    from bitdelta.lineage import weight_cosine
    from bitdelta.targets import select_targets

    for base_dir, ft_dir in pairs.values():
        base, finetuned = Checkpoint(base_dir), Checkpoint(ft_dir)
        assert weight_cosine(base, finetuned, select_targets(finetuned, base)) > 0.9
    base, finetuned = Checkpoint(other_base), Checkpoint(pairs["llama"][1])
    assert abs(weight_cosine(base, finetuned, select_targets(finetuned, base))) < 0.05


def test_a_finetune_of_another_base_is_refused_before_anything_is_written(llama_pair, other_base, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", other_base, llama_pair[1], "-o", out), "--allow-unrelated-base", "not a fine-tune of")
    assert_nothing_written(out)


def test_allow_unrelated_base_compresses_anyway(llama_pair, other_base, tmp_path):
    with pytest.raises(IncompatibleModelsError, match="allow-unrelated-base"):
        bitdelta.compress(other_base, llama_pair[1], tmp_path / "refused", progress=False)
    delta = bitdelta.compress(other_base, llama_pair[1], tmp_path / "delta", allow_unrelated_base=True, progress=False)
    assert DeltaReader(delta).config.compressed
    code, _, stderr = run_cli("compress", other_base, llama_pair[1], "-o", tmp_path / "cli", "--allow-unrelated-base", "-q")
    assert code == 0, stderr


def test_a_swapped_pair_is_named(llama_pair, grown, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", grown, llama_pair[0], "-o", out), "swapped", "514", "512")
    assert_nothing_written(out)


@pytest.mark.parametrize("option, glob, named", [("--include", "q_proj", "'*q_proj*' would match model.layers.0.self_attn.q_proj.weight"),
                                                 ("--exclude", "*.mlp_proj.*", "model.layers.0.mlp.down_proj.weight")])
def test_a_glob_that_matches_nothing_is_refused_with_names_that_exist(llama_pair, tmp_path, option, glob, named):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("compress", *llama_pair, "-o", out, option, glob)
    assert_clean_failure(code, stdout, stderr, f"{option} {glob!r} matches no tensor", named)
    assert_nothing_written(out)


@pytest.mark.parametrize("options", [("--include", "*norm*"), ("--exclude", "*")])
def test_a_selection_with_nothing_to_compress_is_refused(llama_pair, tmp_path, options):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", out, *options), "nothing to compress")
    assert_nothing_written(out)


@pytest.mark.parametrize("command", ["compress", "merge"])
def test_an_existing_output_is_refused_before_the_models_are_read(llama_pair, llama_delta, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    second = llama_pair[1] if command == "compress" else llama_delta
    # the base does not exist: only a command that looks at -o first names the output
    assert_clean_failure(*run_cli(command, tmp_path / "no-such-base", second, "-o", out), "already exists", "--overwrite")


def test_compress_with_a_bad_distillation_option_fails_before_compressing(llama_pair, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", tmp_path / "no-such-base", llama_pair[1], "-o", out, "--distill", "--loss", "l1"), "loss")


def test_distill_on_a_small_file_uses_every_window_it_has_and_says_so(llama_pair, llama_delta, tmp_path):
    from transformers import AutoTokenizer

    from bitdelta.calibration import tokenize_texts

    delta = tmp_path / "delta"
    shutil.copytree(llama_delta, delta)
    data = tmp_path / "small.txt"
    data.write_text(tiny.finetune_text(12_000))
    windows = len(tokenize_texts([data.read_text()], AutoTokenizer.from_pretrained(llama_pair[1]))) // 32
    assert 8 < windows < 800
    code, _, stderr = run_cli("distill", *llama_pair, delta, "--data", data, "--seq-len", 32, "--steps", 2, "-q")  # defaults: 800 + 64
    assert code == 0, stderr
    record = DeltaReader(delta).config.distillation
    assert record["samples"] + record["heldout_sequences"] == windows and 0 < record["heldout_sequences"] < record["samples"]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"{windows} windows" in lines[0] and f"{record['samples']} samples" in lines[0], stderr
