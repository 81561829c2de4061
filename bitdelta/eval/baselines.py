"""Other ways to store a fine-tune as base + compressed delta, for ablations against BitDelta.

Every method approximates exactly the tensors BitDelta compresses (`select_targets`: the linear
weights inside the transformer blocks); everything else comes from the fine-tune unchanged, as
BitDelta stores it losslessly. So two methods differ only in how they approximate those matrices.

    bitdelta          W_b + mean|D| * sign(D)                 the 1-bit delta (BitDelta-Initial), in memory
    svd:R             W_b + U_R S_R V_R^T of D                low-rank delta (the paper's comparison)
    svd:equal         R = N K / (16 (N + K)) per matrix       the rank whose fp16 factors fit in the 1-bit delta's bits
    rtn:K             W_b + RTN_K(D), K = 2..8                K-bit round-to-nearest delta (bit-width ablation)
    int8base          Q(W_b) + mean|D'| * sign(D'), D' = W_ft - Q(W_b)     BitDelta-Initial over a quantized base
    fp8base, int4base (Q: bitdelta.quant's int8, fp8 or int4 recipe, what `compress --base-quant` uses)

where D = W_ft - W_b. RTN is the usual asymmetric min-max quantizer per output row (as the RTN
baseline of GPTQ): 2^K levels evenly spaced over [min, max] of the row, each entry rounded to the
nearest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bitdelta.checkpoint import Checkpoint
from bitdelta.delta import BinaryDelta
from bitdelta.errors import EvaluationError
from bitdelta.quant import RECIPES, quantize
from bitdelta.eval import SPECS
from bitdelta.model_names import CheckpointNames
from bitdelta.targets import select_targets


@dataclass(frozen=True)
class OneBit:
    """BitDelta-Initial: sign(D) with the L2-optimal scale mean|D| per matrix (or per row)."""

    granularity: str = "matrix"

    @property
    def name(self) -> str:
        return "bitdelta" if self.granularity == "matrix" else "bitdelta-row"

    def approximate(self, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        return one_bit(base, finetuned, self.granularity)

    def bits(self, n: int, k: int) -> int:
        return n * k + 16 * (1 if self.granularity == "matrix" else n)


@dataclass(frozen=True)
class SVD:
    """Rank-R truncated SVD of the delta, stored as fp16 factors U_R S_R [N, R] and V_R^T [R, K]."""

    rank: int | None = None  # None: equal storage to the 1-bit delta, per matrix

    @property
    def name(self) -> str:
        return "svd:equal" if self.rank is None else f"svd:{self.rank}"

    def rank_for(self, n: int, k: int) -> int:
        if self.rank is None:  # 16 bits per factor entry vs 1 bit per weight
            return max(1, (n * k) // (16 * (n + k)))
        return min(self.rank, n, k)

    def approximate(self, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        left, right = svd_factors(finetuned.float() - base.float(), self.rank_for(*finetuned.shape))
        return base.float() + left @ right

    def bits(self, n: int, k: int) -> int:
        return 16 * self.rank_for(n, k) * (n + k)


@dataclass(frozen=True)
class RTN:
    """K-bit round-to-nearest delta, asymmetric min-max per output row (or per matrix)."""

    bits_per_weight: int
    granularity: str = "row"

    @property
    def name(self) -> str:
        return f"rtn:{self.bits_per_weight}" + ("" if self.granularity == "row" else ":matrix")

    def approximate(self, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        return base.float() + rtn(finetuned.float() - base.float(), self.bits_per_weight, self.granularity)

    def bits(self, n: int, k: int) -> int:  # codes, plus an fp16 step and zero point per row (or matrix)
        return self.bits_per_weight * n * k + 32 * (n if self.granularity == "row" else 1)


@dataclass(frozen=True)
class OverQuantizedBase:
    """BitDelta-Initial over a base quantized by `recipe` (bitdelta.quant): the base is served
    quantized, the delta is taken against it, so the signs also absorb the base's quantization error."""

    recipe: str
    granularity: str = "matrix"

    @property
    def name(self) -> str:
        return f"{self.recipe}base"

    def approximate(self, base: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
        return one_bit(quantize(base, self.recipe).dequantize().to(base.device), finetuned, self.granularity)

    def bits(self, n: int, k: int) -> int:
        return OneBit(self.granularity).bits(n, k)


Method = OneBit | SVD | RTN | OverQuantizedBase


def one_bit(base: torch.Tensor, finetuned: torch.Tensor, granularity: str) -> torch.Tensor:
    """base + scale * sign(finetuned - base) in fp32 on base's device, through the very code that
    `compress` uses (BinaryDelta packs on the CPU), so the baseline equals a stored delta bit for bit."""
    binary = BinaryDelta.from_weights(base.cpu(), finetuned.cpu(), granularity)
    return binary.apply(base.cpu(), torch.float32).to(base.device)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U_R diag(S_R) [N, R] and V_R^T [R, K]: the best rank-R approximation of `delta` (Eckart-Young)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def rtn(x: torch.Tensor, bits: int, granularity: str = "row") -> torch.Tensor:
    """Round-to-nearest onto 2^bits evenly spaced levels spanning each row's (or the matrix's) [min, max]."""
    dims = dict(dim=1, keepdim=True) if granularity == "row" else {}
    low, high = x.amin(**dims), x.amax(**dims)
    step = ((high - low) / (2**bits - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((x - low) / step).clamp(0, 2**bits - 1)
    return codes * step + low


def parse(spec: str) -> Method:
    """A method from its command-line spelling (see SPECS)."""
    text = spec.strip().lower()
    if text in ("bitdelta", "bitdelta-row"):
        return OneBit("matrix" if text == "bitdelta" else "row")
    if text.endswith("base") and text.removesuffix("base") in RECIPES:
        return OverQuantizedBase(text.removesuffix("base"))
    if text == "svd:equal":
        return SVD(None)
    if match := re.fullmatch(r"svd:(\d+)", text):
        if int(match[1]) >= 1:
            return SVD(int(match[1]))
    if match := re.fullmatch(r"rtn:(\d+)(:matrix|:row)?", text):
        if 2 <= int(match[1]) <= 8:
            return RTN(int(match[1]), (match[2] or ":row")[1:])
    raise EvaluationError(f"unknown baseline {spec!r}; use one of {SPECS}")


class Approximator:
    """The fine-tune in memory, whose compressible matrices can be swapped for any method's
    approximation of them. `build(method)` rewrites those weights in place and returns the model
    (one model, reused: a built model is valid until the next `build`). Base and fine-tune copies
    of the matrices stay on the CPU; each approximation is computed on the model's device.
    SVD factors are cached, so several ranks cost one decomposition per matrix. A mixture-of-experts
    expert's checkpoint matrix is written into the rows of the model's fused expert tensor it lives in
    (bitdelta.model_names); stacked 3-D expert tensors are not covered."""

    def __init__(self, base: str | Path, finetuned: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        base_ckpt, ft_ckpt = Checkpoint(base), Checkpoint(finetuned)
        self.names = select_targets(ft_ckpt, base_ckpt)
        stacked = [name for name in self.names if len(ft_ckpt.tensors[name].shape) != 2]
        if stacked:  # the baselines approximate 2-D matrices
            raise EvaluationError(f"{stacked[0]} stacks a layer's experts in one 3-D tensor: --baseline does not cover such models yet; "
                                  "evaluate the delta without --baseline")
        self.model = AutoModelForCausalLM.from_pretrained(ft_ckpt.path, dtype=dtype).to(device).eval()
        self._placement = CheckpointNames(self.model.config.model_type)
        self.base = {name: base_ckpt.get(name) for name in self.names}
        self.finetuned = {name: ft_ckpt.get(name) for name in self.names}
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in self.names:
            self._parameter(name)  # fail early on a name the model does not have

    def _parameter(self, name: str) -> torch.Tensor:
        """The model's tensor holding checkpoint matrix `name`: its parameter, or its rows in a fused expert tensor."""
        expert = self._placement.fused_expert(name)
        try:
            if expert is None:
                return self.model.get_parameter(self._placement.renamed(name))
            fused = self.model.get_parameter(expert.fused)
        except AttributeError:
            raise EvaluationError(f"{name} is not a parameter of the loaded model; baselines need checkpoint names equal to module names") from None
        return fused[expert.expert, expert.rows(fused.shape[1])]

    @torch.no_grad()
    def build(self, method: Method | None):
        """The fine-tune with every compressible matrix replaced by `method`'s approximation (None: exact)."""
        for name in self.names:
            parameter = self._parameter(name)
            finetuned = self.finetuned[name].to(parameter.device)
            if method is None:
                weight = finetuned
            elif isinstance(method, SVD):
                left, right = self._svd(name, method.rank_for(*finetuned.shape), parameter.device)
                weight = self.base[name].to(parameter.device).float() + left @ right
            else:
                weight = method.approximate(self.base[name].to(parameter.device), finetuned)
            parameter.copy_(weight.to(parameter.dtype))
        return self.model

    def _svd(self, name: str, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._factors.get(name)
        if cached is None or cached[0].shape[1] < rank:
            delta = self.finetuned[name].to(device).float() - self.base[name].to(device).float()
            cached = tuple(t.cpu() for t in svd_factors(delta, rank))
            self._factors[name] = cached
        return cached[0][:, :rank].to(device), cached[1][:rank].to(device)

    def storage_bits(self, method: Method) -> int:
        """Bits the method's delta spends on the compressible matrices."""
        return sum(method.bits(*self.finetuned[name].shape) for name in self.names)

    @property
    def weights(self) -> int:
        return sum(self.finetuned[name].numel() for name in self.names)
