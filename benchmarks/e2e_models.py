"""The workload of `python -m benchmarks.e2e` and the model every system serves: Llama shapes with
random weights built on the device, random 1-bit deltas, prompts, Zipf-distributed fine-tunes."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from dataclasses import dataclass

import torch

from bitdelta.engine import Engine
from bitdelta.pack import packed_words
from bitdelta.storage import ShardWriter
from bitdelta.engine.model import SlotWeights

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000),
    "tiny": (256, 768, 2, 4, 4, 1024),  # widths whose halves are whole 32-column words: --tensor-parallel 2 runs it
    "tiny-shared": (256, 768, 2, 4, 2, 1024),
}
# Shapes whose fp16 weights do not fit a GPU: every decoder layer's weights are views of the first
# layer's, so the benchmark can build them; only runs over a quantized base (which the engine holds
# per layer, a copy each) measure anything real on them.
SHARED_LAYERS = {"llama2-70b", "tiny-shared"}
DISTINCT_DELTAS = 8
GiB = 2**30


@dataclass(frozen=True)
class Setup:
    """One run's workload: the model shape, prompt and generated tokens a request, device and dtype,
    and the ranks the engines split over (tensor parallel: one process a GPU)."""

    shape: str
    prompt: int
    generate: int
    device: torch.device
    dtype: torch.dtype
    tensor_parallel: int = 1

    @property
    def kv_tokens(self) -> int:
        return self.prompt + self.generate


# ---- models --------------------------------------------------------------------------------------
def llama_config(shape: str):
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False)


def random_weights(config, device: torch.device, dtype: torch.dtype, shared_layers: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter of the model: N(0, 0.02) matrices, unit norms. The linears the engine stacks
    (q/k/v, gate/up: `STACKED`) are consecutive row blocks of one tensor, so it stacks them without a
    copy (the benchmark keeps these weights for every system it runs). `shared_layers`: every
    decoder layer's tensors are the first layer's (`SHARED_LAYERS`)."""
    from transformers import LlamaForCausalLM

    from bitdelta.engine.linears import STACKED

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    generator = torch.Generator(device).manual_seed(0)
    weights = {}
    for layer in range(1 if shared_layers else config.num_hidden_layers):
        for block, parts in STACKED:
            names = [f"model.layers.{layer}.{block}.{part}.weight" for part in parts]
            rows = [shapes[name][0] for name in names]
            stacked = torch.empty(sum(rows), shapes[names[0]][1], dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
            weights.update(zip(names, stacked.split(rows)))
    for name, shape in shapes.items():
        if name in weights:
            continue
        first_layer = re.sub(r"^model\.layers\.\d+\.", "model.layers.0.", name)
        if shared_layers and first_layer in weights:
            weights[name] = weights[first_layer]
        elif len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            weights[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=generator)
    return weights


def write_checkpoint(config, weights: dict[str, torch.Tensor], folder: Path) -> Path:
    """The model as a checkpoint folder (config.json and safetensors shards, one tensor in memory at
    a time): what tensor-parallel engines load their shares from."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    writer = ShardWriter(folder, "model", 5 * GiB)
    for name, tensor in weights.items():
        writer.add(name, tensor.detach().cpu())
    writer.finish()
    return folder


def write_random_deltas(base_folder: Path, names: list[str], folder: Path, base_quant: str | None = None) -> list[Path]:
    """Random 1-bit deltas of the model in `base_folder` (one per-matrix scale each), written in the
    delta format over that base (quantized by `base_quant`) as `folder`/<name>: what a server loads
    like any other."""
    from bitdelta.apply import quantized_view
    from bitdelta.checkpoint import Checkpoint
    from bitdelta.fileformat import DeltaConfig, write_delta
    from bitdelta.targets import block_linears

    base = Checkpoint(base_folder)
    identity = None if base_quant is None else quantized_view(base, base_quant).identity
    linears = sorted(block_linears(base))
    dtypes = {name: str(meta.dtype).removeprefix("torch.") for name, meta in base.tensors.items()}
    written = []
    for index, name in enumerate(names):
        generator = torch.Generator().manual_seed(index)

        def tensors():
            for name in linears:
                n, k = base.tensors[name].shape
                words = torch.randint(0, 256, (n, packed_words(k) * 4), dtype=torch.uint8, generator=generator).view(torch.int32)
                yield name + ".sign", words
                yield name + ".scale", torch.rand(1, generator=generator) * 2e-3

        def config(files, index=index):
            return DeltaConfig(base_model=str(base_folder), base_fingerprint=base.fingerprint, finetuned_model=f"random-{index}",
                               finetuned_fingerprint=f"random-{index}", model_type=base.config["model_type"],
                               finetuned_dtype=next(iter(dtypes.values())), finetuned_bytes=sum(m.nbytes for m in base.tensors.values()),
                               scale_granularity="matrix", compressed={name: list(base.tensors[name].shape) for name in linears},
                               dense={}, removed=[], dtypes=dtypes, files=files, base_quant=identity)

        written.append(write_delta(folder / name, tensors(), config, [base_folder / "config.json"], overwrite=True))
    return written


def model_over(config, weights: dict[str, torch.Tensor]):
    """A transformers model whose parameters are `weights` (shared, not copied)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(weights, assign=True, strict=True)
    device = next(iter(weights.values())).device
    with torch.device(device):  # the rotary embedding's buffers were made on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def model_bytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


@functools.cache
def random_deltas(count: int, shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...], pin: bool) -> list[SlotWeights]:
    """`count` distinct random deltas (linear name, signs shape, scales shape) in the slot layout,
    in (pinned) CPU memory like loaded ones; made once per run."""
    deltas = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        signs, scales = {}, {}
        for name, signs_shape, scales_shape in shapes:
            words = torch.randint(-(2**31), 2**31, signs_shape, dtype=torch.int64, generator=generator).to(torch.int32)
            scale = torch.rand(scales_shape, generator=generator) * 2e-3
            signs[name], scales[name] = (words.pin_memory(), scale.pin_memory()) if pin else (words, scale)
        deltas.append(SlotWeights(signs, scales, {}))
    return deltas


def serve_random_deltas(engine: Engine, tenants: list[int], base_folder: Path | None = None, base_quant: str | None = None) -> None:
    """Register fine-tune `ft{t}` for each tenant t, on DISTINCT_DELTAS random deltas round-robin: in
    memory, or, for an engine over the checkpoint `base_folder` (tensor parallel), as delta folders
    beside it (each rank then reads its own share from the files; a delta in memory would travel
    whole to every rank), made for the base quantized by `base_quant`."""
    if base_folder is not None:
        folders = random_delta_folders(base_folder, base_quant)
        for index, tenant in enumerate(tenants):
            engine.store.register(f"ft{tenant}", folders[index % len(folders)])
        return
    shapes = tuple((name, tuple(linear.signs.shape[1:]), tuple(linear.scales.shape[1:])) for name, linear in engine.model.linears.items())
    deltas = random_deltas(DISTINCT_DELTAS, shapes, engine.model.device.type == "cuda")
    for index, tenant in enumerate(tenants):
        engine.store.add(f"ft{tenant}", deltas[index % len(deltas)])


@functools.cache
def random_delta_folders(base_folder: Path, base_quant: str | None) -> list[Path]:
    """DISTINCT_DELTAS random deltas over the checkpoint `base_folder` (quantized by `base_quant`),
    written once beside it."""
    names = [f"delta-{index}" for index in range(DISTINCT_DELTAS)]
    return write_random_deltas(base_folder, names, base_folder.parent / f"random-deltas-{base_quant or 'fp'}", base_quant)


def prompts(setup: Setup, count: int) -> list[list[int]]:
    vocab = SHAPES[setup.shape][-1]
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (count, setup.prompt), generator=generator).tolist()


def zipf_tenants(count: int, tenants: int) -> list[int]:
    """Fine-tune of each of `count` requests, Zipf over `tenants` (p ~ 1/rank), fixed seed."""
    weights = torch.tensor([1 / rank for rank in range(1, tenants + 1)])
    return torch.multinomial(weights, count, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()

