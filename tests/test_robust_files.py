"""A delta or checkpoint folder may come from anyone: only its own plain files are read, and only the
files a model folder needs travel on."""

import json
import shutil

import pytest

import bitdelta
from bitdelta import fileformat
from bitdelta.errors import DeltaFormatError
from bitdelta.fileformat import DeltaReader

from conftest import run_cli


@pytest.fixture
def delta_copy(llama_delta, tmp_path):
    copy = tmp_path / "delta"
    shutil.copytree(llama_delta, copy)
    return copy


def _name_weight_file(delta_dir, name):
    """Point the config's weight file entry at `name` (checksum of the real file kept)."""
    config_file = delta_dir / "bitdelta_config.json"
    config = json.loads(config_file.read_text())
    (checksum,) = config["files"].values()
    config["files"] = {name: checksum}
    config_file.write_text(json.dumps(config))


@pytest.fixture
def opened_files(monkeypatch):
    """Every path the delta reader hashes or opens as safetensors."""
    seen = []
    real_sha256, real_safe_open = fileformat._sha256, fileformat.safe_open
    monkeypatch.setattr(fileformat, "_sha256", lambda path: seen.append(path) or real_sha256(path))
    monkeypatch.setattr(fileformat, "safe_open", lambda path, **kw: seen.append(path) or real_safe_open(path, **kw))
    return seen


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/delta.safetensors", "..", "", "./delta.safetensors"])
def test_weight_file_names_must_be_plain_names_inside_the_delta(delta_copy, opened_files, name):
    _name_weight_file(delta_copy, name)
    with pytest.raises(DeltaFormatError, match="not a file name inside"):
        DeltaReader(delta_copy)
    assert opened_files == []


def test_weight_file_linked_outside_the_delta_is_refused_unread(delta_copy, tmp_path, opened_files):
    outside = tmp_path / "elsewhere.safetensors"
    (delta_copy / "delta.safetensors").rename(outside)
    (delta_copy / "delta.safetensors").symlink_to(outside)
    with pytest.raises(DeltaFormatError, match="not a file name inside"):
        DeltaReader(delta_copy)
    assert opened_files == []


def test_forged_weight_file_name_is_one_line_error_in_the_cli(delta_copy):
    _name_weight_file(delta_copy, "../../../../etc/passwd")
    code, _, stderr = run_cli("info", delta_copy)
    assert code == 1 and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
    assert "not a file name inside" in stderr and "Traceback" not in stderr


def test_weight_file_linked_inside_the_delta_is_read(delta_copy):
    (delta_copy / "delta.safetensors").rename(delta_copy / "real.safetensors")
    (delta_copy / "delta.safetensors").symlink_to("real.safetensors")
    assert DeltaReader(delta_copy).config.compressed


def test_compress_carries_only_model_folder_files(llama_pair, tmp_path):
    finetune = tmp_path / "finetune"
    shutil.copytree(llama_pair[1], finetune)
    (finetune / "evil.pkl").write_bytes(b"\x80\x04pickle")
    (finetune / "notes.bin").write_bytes(b"\x00binary")
    (finetune / "modeling_custom.py").write_text("import os\n")
    delta = bitdelta.compress(llama_pair[0], finetune, tmp_path / "delta", progress=False)
    names = {p.name for p in delta.iterdir()}
    assert not names & {"evil.pkl", "notes.bin", "modeling_custom.py"}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names


def test_merge_carries_only_model_folder_files(llama_pair, delta_copy, tmp_path):
    from transformers import AutoTokenizer

    (delta_copy / "x.pkl").write_bytes(b"\x80\x04pickle")
    (delta_copy / "weights.bin").write_bytes(b"\x00binary")
    merged = bitdelta.merge(llama_pair[0], delta_copy, tmp_path / "merged", progress=False)
    names = {p.name for p in merged.iterdir()}
    assert not names & {"x.pkl", "weights.bin", "bitdelta_config.json"}
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert AutoTokenizer.from_pretrained(merged).chat_template


def test_merge_refuses_a_tokenizer_file_linked_outside_the_delta(llama_pair, delta_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (delta_copy / "vocab.txt").symlink_to(secret)
    with pytest.raises(DeltaFormatError, match="vocab.txt"):
        bitdelta.merge(llama_pair[0], delta_copy, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
