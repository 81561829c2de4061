"""ShardWriter streams tensors to disk as they come and writes standard safetensors shards."""

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bitdelta.storage import ShardWriter


def sample_tensors() -> dict[str, torch.Tensor]:
    """Every dtype a checkpoint or delta holds, odd sizes (alignment), a scalar, empty and strided tensors."""
    generator = torch.Generator().manual_seed(0)
    return {
        "layers.0.weight": torch.randn(33, 17, generator=generator).to(torch.bfloat16),
        "layers.0.weight.sign": torch.randint(-2**31, 2**31 - 1, (33, 1), dtype=torch.int32, generator=generator),
        "layers.0.weight.scale": torch.rand(1, generator=generator),
        "half": torch.randn(5, 3, generator=generator).half(),
        "double": torch.randn(3, generator=generator).double(),
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "transposed": torch.randn(4, 6, generator=generator).t(),
    }


def read_all(path):
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def write(folder, tensors, max_shard_bytes=1 << 30):
    writer = ShardWriter(folder, "model", max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.finish()


def assert_same(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_shard_reads_back_identically(tmp_path):
    tensors = sample_tensors()
    assert write(tmp_path, tensors) == ["model.safetensors"]
    got, metadata = read_all(tmp_path / "model.safetensors")
    assert_same(got, tensors)
    assert metadata == {"format": "pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no data file left


def test_shard_is_byte_identical_to_safetensors_save_file(tmp_path):
    tensors = sample_tensors()
    write(tmp_path, tensors)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_shards_split_at_the_size_limit_with_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    names = write(tmp_path, tensors, max_shard_bytes=1000)
    shards = [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert names == [*shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    assert index["weight_map"] == {f"t{i}": shards[i // 2] for i in range(10)}
    got = {}
    for shard in shards:
        got.update(read_all(tmp_path / shard)[0])
    assert_same(got, tensors)


def test_no_tensors_make_one_empty_shard(tmp_path):
    assert write(tmp_path, {}) == ["model.safetensors"]
    assert read_all(tmp_path / "model.safetensors")[0] == {}


def test_writer_keeps_no_tensor_in_memory(tmp_path):
    writer = ShardWriter(tmp_path, "model", 1 << 30)
    tensor = torch.randn(256, 256)
    kept = weakref.ref(tensor)
    writer.add("weight", tensor)
    del tensor
    gc.collect()
    assert kept() is None
    writer.finish()
    assert read_all(tmp_path / "model.safetensors")[0]["weight"].shape == (256, 256)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_merging_by_row_blocks_equals_the_whole_matrix_sum(dtype, granularity):
    from bitdelta.apply import applied_delta
    from bitdelta.delta import BinaryDelta

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1100, 2050, generator=generator).to(dtype)  # several row blocks, K not a multiple of 32
    delta = BinaryDelta.from_weights(base, base + 0.01 * torch.randn(base.shape, generator=generator).to(dtype), granularity)
    assert torch.equal(applied_delta(delta, base, dtype), delta.apply(base, dtype))


def _refuse(*args):
    import errno

    raise OSError(errno.EXDEV, "Invalid cross-device link")


@pytest.mark.parametrize("kernel_copy", [None, _refuse], ids=["missing", "refused"])
def test_shard_is_the_same_without_the_kernel_copy(tmp_path, monkeypatch, kernel_copy):
    from bitdelta import storage

    tensors = sample_tensors()
    write(tmp_path, tensors)
    expected = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setattr(storage, "_kernel_copy", kernel_copy)
    monkeypatch.setattr(storage, "_COPY_BYTES", 64)  # many pieces, some tensors cut in the middle
    (tmp_path / "model.safetensors").unlink()
    write(tmp_path, tensors)
    assert (tmp_path / "model.safetensors").read_bytes() == expected
