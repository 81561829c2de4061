"""Scale distillation (BitDelta, sec. 3.2): sign bits frozen, only the scales are trained so the
compressed model's logits match the fine-tune's on a small calibration set.

Only one model is ever in memory. Phase 1 runs the teacher (the fine-tune) over the calibration
sequences and keeps, per position, its top-k logits and their token ids. Phase 2 frees the teacher
and trains the student (base + scale * sign) alone against those targets. Peak memory:

    max(teacher weights, student weights) + sequences * seq_len * topk * 6 bytes + activations

where student weights = base weights + (compressed params) / 8 + lossless extras. The paper keeps
both models on two GPUs; this needs one.

Block linears train through `DistillLinear`. Mixture-of-experts experts live in fused 3-D
parameters of the model (`experts.gate_up_proj`), which the experts' forward indexes itself: each
such parameter is reparametrised as W0 + (s - s0) * sign (W0 as loaded, with the initial scales
s0), so every expert's scale trains without rewriting any family's MoE forward.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bitdelta.apply import load, open_pair, parse_dtype
from bitdelta.calibration import calibration_sequences
from bitdelta.checkpoint import Checkpoint
from bitdelta.device import resolve_device
from bitdelta.errors import DistillationError, IncompatibleModelsError
from bitdelta.fileformat import DeltaReader, write_delta
from bitdelta.model_names import CheckpointNames
from bitdelta.nn import BitDeltaLinear, bitdelta_linears, replace_linear
from bitdelta.pack import packed_words, unpack_signs
from bitdelta.progress import step_progress

LOSSES = ("mse", "kl")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Defaults follow the paper: 800 samples x 128 tokens, 200 Adam steps at lr 1e-4, logit MSE."""

    data: str | None = None  # .txt/.jsonl file or dataset id; None = data-free
    samples: int = 800
    seq_len: int = 128
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    loss: str = "mse"  # mse on logits, or kl on temperature-softened distributions
    kl_temperature: float = 2.0
    topk: int = 256  # teacher logits kept per position
    heldout: int = 64  # extra sequences never trained on, for the before/after report
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:  # at construction: `compress --distill` fails before compressing
        if self.loss not in LOSSES:
            raise DistillationError(f"unknown distillation loss {self.loss!r}; use one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class Targets:
    values: torch.Tensor  # fp16 [S, T, k] teacher logits
    indices: torch.Tensor  # int32 [S, T, k] their token ids
    teacher_ce: float  # the teacher's next-token loss on the held-out part


class _SignMatmul(torch.autograd.Function):
    """(x @ sign.T) * scale, unpacking the bits in both passes, so training never holds a dense
    sign matrix: memory stays at packed bits plus activations."""

    @staticmethod
    def forward(ctx, x, signs, k, scale):
        product = x @ unpack_signs(signs, k, x.dtype).T
        ctx.save_for_backward(signs, scale, product)
        ctx.k = k
        return product * scale

    @staticmethod
    def backward(ctx, grad):
        signs, scale, product = ctx.saved_tensors
        grad_x = (grad * scale) @ unpack_signs(signs, ctx.k, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, (grad * product).sum(0)


class DistillLinear(nn.Module):
    """Base linear + trainable scale(s) over frozen packed signs; scale shape [1] or [N] as stored."""

    def __init__(self, layer: BitDeltaLinear, scale: torch.Tensor):
        super().__init__()
        self.weight, self.bias, self.signs = layer.weight, layer.bias, layer.signs[0]
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.scale = nn.Parameter(scale.float().clone().to(self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features).float()
        delta = _SignMatmul.apply(rows, self.signs, self.in_features, self.scale.expand(self.out_features))
        return base + delta.reshape(base.shape).to(base.dtype)


class _AddScaledSigns(torch.autograd.Function):
    """merged + row_delta * sign for a stacked [E, N, K] tensor, keeping the signs packed: the
    backward unpacks one expert at a time for the rows' gradient."""

    @staticmethod
    def forward(ctx, merged, row_delta, signs, k):
        ctx.save_for_backward(signs)
        ctx.k = k
        return merged + row_delta.unsqueeze(-1).to(merged.dtype) * unpack_signs(signs, k, merged.dtype)

    @staticmethod
    def backward(ctx, grad):
        (signs,) = ctx.saved_tensors
        rows = torch.stack([(grad[e].float() * unpack_signs(signs[e], ctx.k)).sum(-1) for e in range(grad.shape[0])])
        return None, rows, None, None


class ScaledExperts(nn.Module):
    """The parametrisation of one fused expert tensor [E, N, K]: W0 + (s - s0) * sign, where each
    piece (one checkpoint matrix: some experts' rows, or a whole stacked tensor) has its own
    trainable scale(s) s, initialised to the stored s0."""

    def __init__(self, shape: tuple[int, int, int], device: torch.device):
        super().__init__()
        experts, rows, k = shape
        self.k = k
        self.signs = torch.zeros(experts, rows, packed_words(k), dtype=torch.int32, device=device)
        self.pieces: list[tuple[slice, slice, str]] = []  # (experts, rows, scale name)
        self.scales = nn.ParameterDict()
        self.initial: dict[str, torch.Tensor] = {}

    def add(self, experts: slice, rows: slice, signs: torch.Tensor, scale: torch.Tensor) -> nn.Parameter:
        """A piece of the tensor: `signs` [e, n, Kw] (or [n, Kw]), `scale` as stored ([1], [n], [e, 1], [e, n])."""
        key = str(len(self.pieces))
        self.signs[experts, rows] = signs.to(self.signs.device)
        self.initial[key] = scale.float().to(self.signs.device)
        self.scales[key] = nn.Parameter(self.initial[key].clone())
        self.pieces.append((experts, rows, key))
        return self.scales[key]

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        row_delta = torch.zeros(self.signs.shape[:2], device=merged.device)  # [E, N]: each row's s - s0
        for experts, rows, key in self.pieces:
            change = self.scales[key] - self.initial[key]
            row_delta[experts, rows] = (change if change.ndim == 2 else change[None]).expand(experts.stop - experts.start, rows.stop - rows.start)
        return _AddScaledSigns.apply(merged, row_delta, self.signs, self.k)


def distill(base: str | Path, finetuned: str | Path, delta: str | Path, config: DistillConfig = DistillConfig(), progress: bool = True) -> dict:
    """Calibrate the scales of `delta` in place (atomically); return the record saved in its config.

    Calibration data (`config.data`) shorter than `samples + heldout` windows is used whole: both
    counts shrink in proportion, with a warning, and the record holds the counts used."""
    base_ckpt, reader = open_pair(base, delta)
    ft_ckpt = Checkpoint(finetuned)
    if ft_ckpt.fingerprint != reader.config.finetuned_fingerprint:
        raise IncompatibleModelsError(f"{delta} was not made from fine-tune {finetuned!r} (fingerprint mismatch); pass the fine-tune it was made from")
    device = resolve_device(config.device)
    dtype = parse_dtype(config.dtype, reader)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    _reset_peak(device)

    config, sequences, source, targets = _teacher_phase(ft_ckpt, config, device, dtype)
    student = load(base_ckpt.path, reader.path, mode="bitdelta", dtype=config.dtype, device=device)
    scales = _make_trainable(student, reader)
    if kept := len(reader.config.compressed) - len(scales):
        log.warning(f"{kept} compressed matrices are neither linears nor experts this model's conversion rules place: "
                    "their scales stay mean|delta|; the other scales are distilled")
    train_ids, heldout_ids = sequences[: config.samples], sequences[config.samples :]
    train_targets = Targets(targets.values[: config.samples], targets.indices[: config.samples], targets.teacher_ce)
    heldout_targets = Targets(targets.values[config.samples :], targets.indices[config.samples :], targets.teacher_ce)

    before = _evaluate(student, heldout_ids, heldout_targets, config, device)
    losses = _train(student, scales, train_ids, train_targets, config, device, progress)
    after = _evaluate(student, heldout_ids, heldout_targets, config, device)
    record = dict(
        data=source, samples=config.samples, seq_len=config.seq_len, steps=config.steps, lr=config.lr, batch_size=config.batch_size,
        loss=config.loss, topk=targets.values.shape[-1], seed=config.seed, device=str(device), dtype=str(dtype).removeprefix("torch."),
        train_loss_first=losses[0], train_loss_last=losses[-1], heldout_sequences=len(heldout_ids), distilled_scales=len(scales),
        heldout_before=before, heldout_after=after, teacher_heldout_ce=targets.teacher_ce,
        seconds=round(time.perf_counter() - start, 2), peak_memory_bytes=_peak_memory(device),
    )
    _write_scales(reader, {name: p.detach().cpu() for name, p in scales.items()}, record)
    return record


def _teacher_phase(ft_ckpt: Checkpoint, config: DistillConfig, device, dtype) -> tuple[DistillConfig, torch.Tensor, str, Targets]:
    """Calibration sequences and the teacher's top-k logits on them; the teacher is freed after.
    The config comes back with the sample counts the data allowed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ft_ckpt.path)
    teacher = AutoModelForCausalLM.from_pretrained(ft_ckpt.path, dtype=dtype).to(device).eval()
    count = config.samples + config.heldout
    sequences, source = calibration_sequences(config.data, tokenizer, teacher, count, config.seq_len, config.seed, minimum=1 + (config.heldout > 0))
    if len(sequences) < count:
        config = _fit_to_data(config, len(sequences), source)
    topk = min(config.topk, teacher.config.get_text_config().vocab_size)
    values, indices, heldout_ce = [], [], []
    with torch.no_grad():
        # batches never straddle training and held-out sequences, so the held-out loss covers exactly those
        for first in [*range(0, config.samples, config.batch_size), *range(config.samples, len(sequences), config.batch_size)]:
            last = min(first + config.batch_size, config.samples if first < config.samples else len(sequences))
            batch = sequences[first:last].to(device)
            logits = teacher(input_ids=batch).logits.float()
            top = logits.topk(topk, dim=-1)
            values.append(top.values.half().cpu())
            indices.append(top.indices.int().cpu())
            if first >= config.samples:
                heldout_ce.append(_next_token_ce(logits, batch))
    del teacher
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return config, sequences, source, Targets(torch.cat(values), torch.cat(indices), _mean(heldout_ce))


def _fit_to_data(config: DistillConfig, windows: int, source: str) -> DistillConfig:
    """Every window the data has, split between training and held out as asked (at least one each)."""
    heldout = min(max(round(windows * config.heldout / (config.samples + config.heldout)), 1), windows - 1) if config.heldout else 0
    fitted = dataclasses.replace(config, samples=windows - heldout, heldout=heldout)
    log.warning(f"{source} gives {windows} windows of {config.seq_len} tokens: distilling on {fitted.samples} samples with {fitted.heldout} held out "
                f"(asked {config.samples} + {config.heldout}; pass more data, a shorter --seq-len, or omit --data for data-free calibration)")
    return fitted


def _make_trainable(student, reader: DeltaReader) -> dict[str, nn.Parameter]:
    """Freeze everything, then swap each BitDeltaLinear for a DistillLinear with trainable scale(s),
    and reparametrise each fused expert tensor the delta changes (ScaledExperts)."""
    for parameter in student.parameters():
        parameter.requires_grad_(False)
    scales = {}
    for module_name, layer in bitdelta_linears(student).items():
        name = module_name + ".weight"
        trainable = DistillLinear(layer, reader.binary_delta(name).scale)
        replace_linear(student, module_name, trainable)
        scales[name] = trainable.scale
    return scales | _trainable_experts(student, reader, reader.config.compressed.keys() - scales.keys())


def _trainable_experts(student, reader: DeltaReader, names) -> dict[str, nn.Parameter]:
    """Trainable scales for the compressed matrices held in the model's fused expert tensors: a
    per-expert checkpoint matrix placed by the model type's conversion rules, or a stacked tensor
    the model holds under its own name."""
    placement = CheckpointNames(student.config.model_type)
    params = dict(student.named_parameters())
    fused: dict[str, ScaledExperts] = {}
    scales = {}
    for name in sorted(names):
        part = placement.fused_expert(name)
        target = part.fused if part is not None else placement.renamed(name)
        weight = params.get(target)
        delta = reader.binary_delta(name)
        if weight is None or weight.ndim != 3 or (part is None and tuple(weight.shape) != tuple(delta.shape)):
            continue
        if target not in fused:
            fused[target] = ScaledExperts(tuple(weight.shape), weight.device)
        if part is None:
            scales[name] = fused[target].add(slice(0, weight.shape[0]), slice(0, weight.shape[1]), delta.signs, delta.scale)
        else:
            rows = part.rows(weight.shape[1])
            scales[name] = fused[target].add(slice(part.expert, part.expert + 1), rows, delta.signs[None], delta.scale)
    for target, parametrisation in fused.items():
        module_name, _, attribute = target.rpartition(".")
        parametrize.register_parametrization(student.get_submodule(module_name), attribute, parametrisation)
    return scales


def _loss(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """MSE between student and teacher logits at the teacher's top-k tokens, or KL between the
    temperature-softened distributions over those k tokens (both renormalised over them, so a
    perfect student scores 0)."""
    teacher, student = values.float(), logits.gather(-1, indices.long())
    if config.loss == "mse":
        return F.mse_loss(student, teacher)
    t = config.kl_temperature
    teacher_logp, student_logp = F.log_softmax(teacher / t, dim=-1), F.log_softmax(student / t, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean() * t * t


def _train(student, scales, ids, targets: Targets, config: DistillConfig, device, progress: bool) -> list[float]:
    optimizer = torch.optim.Adam(scales.values(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    with step_progress("distilling scales", config.steps, progress) as advance:
        for _ in range(config.steps):
            pick = torch.randint(0, len(ids), (config.batch_size,), generator=generator)
            with parametrize.cached():  # a fused expert tensor computed once per pass, not per expert it serves
                logits = student(input_ids=ids[pick].to(device)).logits.float()
            loss = _loss(logits, targets.values[pick].to(device), targets.indices[pick].to(device), config)
            if not torch.isfinite(loss):
                raise DistillationError(f"distillation loss became {loss.item()} at step {len(losses) + 1}; the delta was left untouched (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            advance(f"loss {losses[-1]:.4g}")
    return losses


@torch.no_grad()
def _evaluate(student, ids, targets: Targets, config: DistillConfig, device) -> dict:
    """Held-out logit MSE and KL against the teacher's top-k, and next-token loss."""
    mse, kl, ce = [], [], []
    for first in range(0, len(ids), config.batch_size):
        batch = ids[first : first + config.batch_size].to(device)
        values, indices = targets.values[first : first + config.batch_size].to(device), targets.indices[first : first + config.batch_size].to(device)
        with parametrize.cached():
            logits = student(input_ids=batch).logits.float()
        mse.append(_loss(logits, values, indices, dataclasses.replace(config, loss="mse")).item())
        kl.append(_loss(logits, values, indices, dataclasses.replace(config, loss="kl", kl_temperature=1.0)).item())
        ce.append(_next_token_ce(logits, batch))
    return dict(logit_mse=_mean(mse), kl=_mean(kl), ce=_mean(ce))


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int:
    """Peak GPU memory allocated, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_scales(reader: DeltaReader, scales: dict[str, torch.Tensor], record: dict) -> None:
    """Rewrite the delta with the new scales; signs and lossless tensors are copied bit for bit."""
    config = reader.config

    def tensors():
        for name in config.compressed:
            binary = reader.binary_delta(name)
            yield name + ".sign", binary.signs
            # a matrix no linear or fused expert tensor of the model holds keeps its mean|delta| scale
            yield name + ".scale", scales[name].reshape(binary.scale.shape).float() if name in scales else binary.scale
        for name in config.dense:
            yield name, reader.dense(name)

    write_delta(reader.path, tensors(), lambda files: dataclasses.replace(config, files=files, distillation=record), reader.small_files(), overwrite=True)
