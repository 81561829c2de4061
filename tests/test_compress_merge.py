"""compress -> merge/load on tiny genuinely fine-tuned pairs of three architectures."""

import json

import pytest
import torch
from safetensors.torch import load_file

import bitdelta
from bitdelta import tiny
from bitdelta.checkpoint import Checkpoint
from bitdelta.delta import BinaryDelta
from bitdelta.fileformat import DeltaReader
from bitdelta.targets import select_targets

FAMILY_TARGETS = {  # what the generic finder must pick, per family (7 linears x 2 layers, or 4 x 2 fused)
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}


def _merged_state(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_targets_are_the_block_linears_only(pairs, family):
    base, finetuned = (Checkpoint(p) for p in pairs[family])
    targets = select_targets(finetuned, base)
    assert {name.split(".")[-2] for name in targets} == FAMILY_TARGETS[family]
    assert len(targets) == 2 * len(FAMILY_TARGETS[family])
    assert not any("embed" in n or "lm_head" in n or "norm" in n or n.endswith(".bias") for n in targets)


def test_include_and_exclude_globs_override(llama_pair):
    base, finetuned = (Checkpoint(p) for p in llama_pair)
    assert select_targets(finetuned, base, exclude=["*.mlp.*"]) == [n for n in select_targets(finetuned, base) if ".mlp." not in n]
    assert set(select_targets(finetuned, base, include=["*embed_tokens*", "lm_head.weight"])) == {"model.embed_tokens.weight", "lm_head.weight"}


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_merge_rebuilds_the_finetune_exactly_outside_compressed_linears(pairs, family, tmp_path):
    base_dir, ft_dir = pairs[family]
    delta = bitdelta.compress(base_dir, ft_dir, tmp_path / "delta", progress=False)
    merged = bitdelta.merge(base_dir, delta, tmp_path / "merged", progress=False)
    base, finetuned, got = _merged_state(base_dir), _merged_state(ft_dir), _merged_state(merged)
    config = DeltaReader(delta).config
    assert got.keys() == finetuned.keys() and config.compressed
    for name, tensor in finetuned.items():
        if name in config.compressed:
            delta_ = tensor - base[name]
            expected = base[name] + delta_.abs().mean() * torch.where(delta_ > 0, 1.0, -1.0)
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], tensor), name
    # skipped tensors really were identical, stored ones really differed
    assert all(not torch.equal(base[n], finetuned[n]) for n in config.dense)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_merged_checkpoint_loads_as_a_standard_model_with_its_tokenizer(pairs, family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, ft_dir = pairs[family]
    delta = bitdelta.compress(base_dir, ft_dir, tmp_path / "delta", progress=False)
    merged = bitdelta.merge(base_dir, delta, tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE
    assert json.loads((merged / "config.json").read_text()) == json.loads((ft_dir / "config.json").read_text())
    # the 1-bit delta recovers most of the fine-tune's gain on its own domain
    windows = tiny.eval_windows(tiny.split(tiny.tokenize(tokenizer, tiny.finetune_text(300_000)))[1], 8, 64)
    losses = {name: tiny.heldout_loss(AutoModelForCausalLM.from_pretrained(d), windows) for name, d in (("base", base_dir), ("ft", ft_dir))}
    assert losses["ft"] < tiny.heldout_loss(model, windows) < losses["base"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_load_bitdelta_linears_match_merged_logits(pairs, family, tmp_path):
    base_dir, ft_dir = pairs[family]
    delta = bitdelta.compress(base_dir, ft_dir, tmp_path / "delta", scale="row", progress=False)
    merged = bitdelta.load(base_dir, delta, mode="merged")
    onthefly = bitdelta.load(base_dir, delta, mode="bitdelta")
    assert sum(type(m).__name__ == "BitDeltaLinear" for m in onthefly.modules()) == len(DeltaReader(delta).config.compressed)
    ids = torch.randint(0, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = merged(ids).logits, onthefly(ids).logits
    # fp32 both ways; only the summation order differs (W + s*S)x vs Wx + s(Sx): ~1e-6 relative
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_dtype_option_casts_floating_tensors(llama_pair, llama_delta, tmp_path):
    merged = bitdelta.merge(llama_pair[0], llama_delta, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert {t.dtype for t in _merged_state(merged).values()} == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_input_and_output_give_the_same_delta(llama_pair, llama_delta, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = []
    for source in llama_pair:
        target = tmp_path / source.name
        AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="200KB")
        assert len(list(target.glob("*.safetensors"))) > 1 and (target / "model.safetensors.index.json").is_file()
        sharded.append(target)
    delta = bitdelta.compress(*sharded, tmp_path / "delta", max_shard_bytes=100_000, progress=False)
    assert len(DeltaReader(delta).config.files) > 1 and (delta / "delta.safetensors.index.json").is_file()
    ours, reference = DeltaReader(delta), DeltaReader(llama_delta)
    assert ours.config.compressed == reference.config.compressed and ours.config.dense == reference.config.dense
    for name in reference.config.compressed:
        assert torch.equal(ours.binary_delta(name).signs, reference.binary_delta(name).signs)
    merged = bitdelta.merge(sharded[0], delta, tmp_path / "merged", max_shard_bytes=150_000, progress=False)
    assert (merged / "model.safetensors.index.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(merged).num_parameters() > 0


def test_grown_vocabulary_is_stored_losslessly(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_pair[1])
    tokenizer = AutoTokenizer.from_pretrained(llama_pair[1])
    tokenizer.add_tokens(["<|tool|>", "<|result|>"])
    model.resize_token_embeddings(len(tokenizer))
    grown = tmp_path / "grown"
    model.save_pretrained(grown)
    tokenizer.save_pretrained(grown)
    delta = bitdelta.compress(llama_pair[0], grown, tmp_path / "delta", progress=False)
    config = DeltaReader(delta).config
    assert config.dense["model.embed_tokens.weight"][0] == len(tokenizer)
    loaded = bitdelta.load(llama_pair[0], delta, mode="bitdelta")
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    merged = bitdelta.merge(llama_pair[0], delta, tmp_path / "merged", progress=False)
    assert len(AutoTokenizer.from_pretrained(merged)) == len(tokenizer)


def test_info_reports_tensors_and_compression_factor(llama_delta):
    from conftest import run_cli

    code, stdout, _ = run_cli("info", llama_delta, "--json")
    summary = json.loads(stdout)
    assert code == 0
    assert summary["compressed_count"] == 14 and summary["compression_factor"] > 1
    first = next(t for t in summary["tensors"] if t["stored_as"].startswith("1-bit"))
    n, k = first["shape"]
    assert first["bytes"] == n * ((k + 31) // 32) * 4 + 4
    reader = DeltaReader(llama_delta)
    assert first["scale"] == pytest.approx(reader.binary_delta(first["name"]).scale.item())


def test_binary_delta_round_trips_through_the_file(llama_pair, llama_delta):
    base, finetuned = (Checkpoint(p) for p in llama_pair)
    reader = DeltaReader(llama_delta)
    name = next(iter(reader.config.compressed))
    expected = BinaryDelta.from_weights(base.get(name), finetuned.get(name))
    got = reader.binary_delta(name)
    assert torch.equal(got.signs, expected.signs) and torch.equal(got.scale, expected.scale)
