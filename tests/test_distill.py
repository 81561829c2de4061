"""Scale distillation on a tiny genuinely fine-tuned pair."""

import hashlib
import shutil

import pytest
import torch

import bitdelta
from bitdelta import tiny
from bitdelta.distill import DistillConfig, distill
from bitdelta.errors import DistillationError, IncompatibleModelsError
from bitdelta.fileformat import DeltaReader
from conftest import run_cli

FAST = dict(samples=32, seq_len=32, steps=40, lr=1e-3, heldout=8, batch_size=4)


@pytest.fixture
def delta(llama_delta, tmp_path):
    copy = tmp_path / "delta"
    shutil.copytree(llama_delta, copy)
    return copy


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prose.txt"
    path.write_text(tiny.finetune_text(200_000))
    return path


@pytest.fixture(scope="session")
def heldout_windows(llama_pair):
    """Fine-tune-domain text that no calibration sample contains (the last part of another source)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_pair[1])
    return tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.finetune_text(400_000)))[1], 8, 64)


def full_logit_mse(llama_pair, delta, windows) -> float:
    """Independent check over the whole vocabulary: merged student vs the fine-tune."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(llama_pair[1])
    student = bitdelta.load(llama_pair[0], delta)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(student(windows).logits, teacher(windows).logits).item()


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("data", ["file", "data-free"])
def test_distillation_lowers_heldout_logit_error(llama_pair, delta, prose_file, heldout_windows, data):
    before = full_logit_mse(llama_pair, delta, heldout_windows)
    record = distill(*llama_pair, delta, DistillConfig(data=str(prose_file) if data == "file" else None, **FAST), progress=False)
    after = full_logit_mse(llama_pair, delta, heldout_windows)
    assert after < 0.9 * before
    assert record["heldout_after"]["logit_mse"] < record["heldout_before"]["logit_mse"]
    assert DeltaReader(delta).config.distillation == record
    assert record["data"].startswith("data-free") == (data == "data-free")


def test_kl_loss_also_improves_the_heldout_kl(llama_pair, delta, prose_file):
    record = distill(*llama_pair, delta, DistillConfig(data=str(prose_file), loss="kl", **FAST), progress=False)
    assert record["loss"] == "kl" and record["heldout_after"]["kl"] < record["heldout_before"]["kl"]


def test_only_scales_change_and_signs_stay_bit_identical(llama_pair, delta):
    old = DeltaReader(delta)
    old_tensors = {n: old.binary_delta(n) for n in old.config.compressed}
    old_dense = {n: old.dense(n) for n in old.config.dense}
    distill(*llama_pair, delta, DistillConfig(**FAST), progress=False)
    new = DeltaReader(delta)
    assert new.config.compressed == old.config.compressed and new.config.dense == old.config.dense
    changed = 0
    for name, binary in old_tensors.items():
        assert torch.equal(new.binary_delta(name).signs, binary.signs)
        assert new.binary_delta(name).scale.shape == binary.scale.shape
        changed += not torch.equal(new.binary_delta(name).scale, binary.scale)
    assert changed == len(old_tensors)
    assert all(torch.equal(new.dense(n), t) for n, t in old_dense.items())


def test_row_scales_stay_row_scales(llama_pair, tmp_path):
    delta = bitdelta.compress(*llama_pair, tmp_path / "rows", scale="row", progress=False,
                              distill=DistillConfig(**FAST))
    reader = DeltaReader(delta)
    name, (n, _) = next(iter(reader.config.compressed.items()))
    assert reader.binary_delta(name).scale.shape == (n,) and reader.config.distillation is not None


def test_same_seed_gives_the_same_scales(llama_pair, llama_delta, tmp_path):
    results = []
    for run in ("a", "b"):
        copy = tmp_path / run
        shutil.copytree(llama_delta, copy)
        distill(*llama_pair, copy, DistillConfig(**FAST), progress=False)
        reader = DeltaReader(copy)
        results.append(torch.cat([reader.binary_delta(n).scale for n in reader.config.compressed]))
    assert torch.equal(*results)


def test_diverging_loss_leaves_the_delta_untouched(llama_pair, delta):
    before = digest(delta)
    with pytest.raises(DistillationError, match="untouched"):
        distill(*llama_pair, delta, DistillConfig(**{**FAST, "lr": 1e30}), progress=False)
    assert digest(delta) == before
    assert not [p for p in delta.parent.iterdir() if p.name.startswith(".")]


def test_delta_of_another_finetune_is_refused(pairs, delta):
    with pytest.raises(IncompatibleModelsError, match="fine-tune"):
        distill(pairs["llama"][0], pairs["qwen2"][1], delta, DistillConfig(**FAST), progress=False)


@pytest.mark.parametrize("content, message", [("", "empty"), ("too short", "windows")])
def test_empty_or_short_data_is_refused(llama_pair, delta, tmp_path, content, message):
    data = tmp_path / "data.txt"
    data.write_text(content)
    before = digest(delta)
    code, _, stderr = run_cli("distill", *llama_pair, delta, "--data", data, "--samples", 32, "--seq-len", 32)
    assert code == 1 and message in stderr and "Traceback" not in stderr
    assert digest(delta) == before


def test_unreachable_dataset_suggests_data_free(llama_pair, delta, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub unreachable, at once (a real attempt retries for ~25 s)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    code, _, stderr = run_cli("distill", *llama_pair, delta, "--data", "nobody/no-such-dataset", "--samples", 4, "--seq-len", 16)
    assert code == 1 and "data-free" in stderr and len(stderr.strip().splitlines()) == 1


def test_jsonl_data_is_read(llama_pair, delta, tmp_path):
    import json

    data = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": tiny.finetune_text(60_000)[i : i + 2000]}) for i in range(0, 60_000, 2000)]
    data.write_text("\n".join(lines))
    record = distill(*llama_pair, delta, DistillConfig(data=str(data), **FAST), progress=False)
    assert record["data"] == str(data)


def test_cli_compress_with_distill_records_the_run(llama_pair, tmp_path):
    out = tmp_path / "distilled"
    code, stdout, _ = run_cli("compress", *llama_pair, "-o", out, "--distill", "--samples", 16, "--seq-len", 32, "--steps", 10, "--heldout", 4, "-q")
    assert code == 0 and "scale distillation" in stdout
    record = DeltaReader(out).config.distillation
    assert record["steps"] == 10 and record["samples"] == 16 and record["peak_memory_bytes"] > 0
