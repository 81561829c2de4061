"""Every bad input: one line naming the problem and the fix, exit 1, nothing left behind."""

import json
import shutil

import pytest

from conftest import run_cli


def assert_clean_failure(code, stdout, stderr, *words):
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr + stdout
    for word in words:
        assert word in lines[0]


def assert_nothing_written(folder):
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")], list(folder.parent.iterdir())


def test_different_architectures_are_refused(pairs, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", pairs["llama"][0], pairs["qwen2"][1], "-o", out), "llama", "qwen2")
    assert_nothing_written(out)


def test_different_shapes_are_refused(llama_pair, tmp_path):
    from bitdelta import tiny

    tokenizer = tiny.train_tokenizer(tiny.base_text(50_000), 512)
    wider = tmp_path / "wider"
    tiny._save(tiny.build_model(tiny.TinySpec(hidden=96, intermediate=128), tokenizer), tokenizer, wider)
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", llama_pair[0], wider, "-o", out), "architecture")
    assert_nothing_written(out)


def test_missing_directory_is_refused(llama_pair, tmp_path):
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", tmp_path / "nowhere", llama_pair[1], "-o", out), "no such directory")
    assert_nothing_written(out)


def test_directory_without_weights_is_refused(llama_pair, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    assert_clean_failure(*run_cli("compress", empty, llama_pair[1], "-o", tmp_path / "out"), "pickle")


def test_unreachable_hub_is_refused_with_the_reason(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", "nobody/no-such-model", llama_pair[1], "-o", out), "nobody/no-such-model", "offline")
    assert_nothing_written(out)


def test_truncated_checkpoint_halfway_leaves_no_output(llama_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    AutoModelForCausalLM.from_pretrained(llama_pair[1]).save_pretrained(broken, max_shard_size="200KB")
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:1000])  # the last shard: fails after others were compressed
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", llama_pair[0], broken, "-o", out), shards[-1].name)
    assert_nothing_written(out)


def test_existing_output_is_refused_unless_overwrite(llama_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", out), "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run_cli("compress", *llama_pair, "-o", out, "--overwrite", "-q")
    assert code == 0 and (out / "bitdelta_config.json").is_file() and not (out / "keep.txt").exists()


def test_delta_from_another_base_is_refused(pairs, llama_delta, tmp_path):
    out = tmp_path / "merged"
    assert_clean_failure(*run_cli("merge", pairs["qwen2"][0], llama_delta, "-o", out), "fingerprint", "base it was made from")
    assert_nothing_written(out)


@pytest.fixture
def delta_copy(llama_delta, tmp_path):
    copy = tmp_path / "delta"
    shutil.copytree(llama_delta, copy)
    return copy


def test_truncated_delta_is_refused(llama_pair, delta_copy, tmp_path):
    weights = delta_copy / "delta.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "merged"
    assert_clean_failure(*run_cli("merge", llama_pair[0], delta_copy, "-o", out), "corrupted")
    assert_nothing_written(out)


def test_flipped_byte_in_delta_is_refused(llama_pair, delta_copy, tmp_path):
    weights = delta_copy / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[-50] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_clean_failure(*run_cli("info", delta_copy), "checksum")


def test_unknown_format_version_is_refused(llama_pair, delta_copy, tmp_path):
    config_file = delta_copy / "bitdelta_config.json"
    config = json.loads(config_file.read_text())
    config["format_version"] = 99
    config_file.write_text(json.dumps(config))
    assert_clean_failure(*run_cli("merge", llama_pair[0], delta_copy, "-o", tmp_path / "m"), "format version 99")


def test_garbled_config_is_refused(delta_copy):
    (delta_copy / "bitdelta_config.json").write_text("{not json")
    assert_clean_failure(*run_cli("info", delta_copy), "not valid JSON")


def test_not_a_delta_is_refused(llama_pair):
    assert_clean_failure(*run_cli("info", llama_pair[0]), "not a bitdelta delta")


def test_bad_option_values_are_refused(llama_pair, llama_delta, tmp_path):
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", tmp_path / "a", "--scale", "column"), "granularity")
    assert_clean_failure(*run_cli("merge", llama_pair[0], llama_delta, "-o", tmp_path / "b", "--dtype", "int4"), "dtype")
    assert_nothing_written(tmp_path / "b")


def _disk_fills_after(monkeypatch, tensors):
    """ShardWriter.add stores `tensors` tensors, then the disk is full."""
    import errno

    from bitdelta.storage import ShardWriter

    real_add, stored = ShardWriter.add, []

    def add(self, name, tensor):
        if len(stored) == tensors:
            raise OSError(errno.ENOSPC, "No space left on device")
        stored.append(name)
        real_add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)


@pytest.mark.parametrize("command", ["compress", "merge"])
def test_full_disk_is_one_line_and_leaves_nothing(llama_pair, llama_delta, tmp_path, monkeypatch, command):
    _disk_fills_after(monkeypatch, 3)
    out = tmp_path / "out"
    source = llama_pair[1] if command == "compress" else llama_delta
    assert_clean_failure(*run_cli(command, llama_pair[0], source, "-o", out, "-q"), "no space left on device", str(out), "-o")
    assert_nothing_written(out)


def test_full_disk_while_compressing_for_distillation_names_the_output(llama_pair, tmp_path, monkeypatch):
    _disk_fills_after(monkeypatch, 3)
    out = tmp_path / "out"
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", out, "-q", "--distill", "--steps", "1"), f"writing {out};")
    assert_nothing_written(out)


def test_unwritable_output_folder_is_one_line(llama_pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", blocker / "out", "-q"), str(blocker / "out"))
    assert blocker.read_text() == "not a folder"


def test_dangling_link_as_output_is_refused_unless_overwrite(llama_pair, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    assert_clean_failure(*run_cli("compress", *llama_pair, "-o", out, "-q"), "symbolic link", "--overwrite")
    assert out.is_symlink() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    code, _, stderr = run_cli("compress", *llama_pair, "-o", out, "-q", "--overwrite")
    assert code == 0, stderr
    assert not out.is_symlink() and (out / "bitdelta_config.json").is_file() and not (tmp_path / "gone").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_overwrite_replaces_a_link_not_its_target(llama_pair, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(target)
    code, _, stderr = run_cli("compress", *llama_pair, "-o", link, "-q", "--overwrite")
    assert code == 0, stderr
    assert not link.is_symlink() and (link / "bitdelta_config.json").is_file()
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".link.")], list(tmp_path.iterdir())


def test_overwrite_replaces_a_file(llama_pair, tmp_path):
    out = tmp_path / "out"
    out.write_text("old")
    code, _, stderr = run_cli("compress", *llama_pair, "-o", out, "-q", "--overwrite")
    assert code == 0, stderr
    assert (out / "bitdelta_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], list(tmp_path.iterdir())
