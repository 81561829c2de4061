"""Which tensors get 1-bit deltas: the matrices of the linear maps inside the transformer blocks.

Found generically: build the fine-tune's architecture on the meta device (no memory, no weights),
take its longest list of repeated blocks, and collect every nn.Linear weight inside it. Embeddings,
lm_head, norms and biases are not in that set and stay lossless. This covers Llama, Mistral,
Qwen2, GPT-NeoX (fused QKV) and any other `transformers` causal LM without a list of names; a model
that cannot be built (custom code) falls back to a name pattern. Include/exclude globs override.

Mixture-of-experts layers keep their experts outside nn.Linear (fused 3-D parameters in the model,
per-expert matrices or stacked 3-D tensors in the checkpoint, under other names), so experts are
found in the checkpoint by structure: a block matrix inside a numbered list within the block
(`...layers.3.mlp.experts.17.down_proj.weight`) or a 3-D tensor in a block (`...experts.gate_up_proj`,
E matrices stacked) is an expert matrix and is compressed, one sign matrix and scale per expert.
The router beside them (a matrix of the same module with one row per expert) stays lossless: it is
tiny, and a 1-bit error in it would change which experts a token reaches, not just by how much.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bitdelta.checkpoint import Checkpoint, TensorMeta
from bitdelta.errors import IncompatibleModelsError, TargetSelectionError

_BLOCK_PATTERN = re.compile(r"\.(layers|h|blocks|block|layer)\.\d+\.")
_LIST_ITEM = re.compile(r"(.*)\.\d+\.")  # group 1: the numbered list a name lies in
log = logging.getLogger(__name__)


def block_linear_weights(config: dict) -> set[str] | None:
    """Parameter names of nn.Linear weights inside the repeated blocks, or None if unbuildable."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as error:  # unknown or remote-code architectures
        log.info("cannot build %s on the meta device (%s); using name patterns", config.get("model_type"), error)
        return None
    blocks_name, _ = max(
        ((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)),
        key=lambda item: len(item[1]), default=(None, None),
    )
    if blocks_name is None:
        return None
    prefix = blocks_name + "."
    return {
        f"{name}.weight" for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix)
    }


def select_targets(
    finetuned: Checkpoint,
    base: Checkpoint,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> list[str]:
    """Names of the fine-tune's tensors to compress, in checkpoint order.

    With `include` globs, those replace the automatic choice; `exclude` globs always remove.
    Only 2-D (or stacked 3-D) floating tensors present in both checkpoints with equal shapes can be compressed; a
    globbed tensor whose shape changed (a grown vocabulary) is simply stored losslessly, but a block
    linear that is missing from the base or shaped differently means the models do not match.
    A glob that matches no tensor (a typo) and a choice that leaves nothing to compress are refused:
    either would write a delta no smaller than the fine-tune, without a word.
    """
    include, exclude = tuple(include), tuple(exclude)
    _check_globs_match(finetuned, include, exclude)
    if include:
        chosen = {n for n in finetuned.tensors if any(fnmatch.fnmatchcase(n, g) for g in include)}
    else:
        chosen = default_targets(finetuned)
        _check_same_blocks(chosen, finetuned, base)
    chosen = {n for n in chosen if not any(fnmatch.fnmatchcase(n, g) for g in exclude)}
    targets = [n for n in finetuned.tensors if n in chosen and _compressible(n, finetuned, base)]
    if not targets:
        given = " ".join(f"{option} {glob!r}" for option, globs in (("--include", include), ("--exclude", exclude)) for glob in globs)
        raise TargetSelectionError(
            f"nothing to compress{' with ' + given if given else ''}: no 2-D floating-point tensor of the fine-tune, shaped as in the base, "
            f"is selected; pass --include globs naming linear weights such as {_examples(finetuned)}"
        )
    return targets


def _check_globs_match(finetuned: Checkpoint, include: tuple[str, ...], exclude: tuple[str, ...]) -> None:
    for option, globs in (("--include", include), ("--exclude", exclude)):
        for glob in globs:
            if any(fnmatch.fnmatchcase(name, glob) for name in finetuned.tensors):
                continue
            near = [name for name in finetuned.tensors if fnmatch.fnmatchcase(name, f"*{glob}*")]
            hint = f"'*{glob}*' would match {_listed(near)}" if near else f"the fine-tune has {_examples(finetuned)}"
            raise TargetSelectionError(f"{option} {glob!r} matches no tensor (a glob matches whole names); {hint}")


def _examples(finetuned: Checkpoint) -> str:
    """A few of the fine-tune's tensor names: block linears (what is usually meant) if it has any."""
    linears = [name for name, meta in finetuned.tensors.items() if _looks_like_block_linear(name, meta)]
    return _listed(linears or list(finetuned.tensors))


def _listed(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count:,} more" if len(names) > count else "")


def block_linears(checkpoint: Checkpoint) -> set[str]:
    """The checkpoint's nn.Linear weights inside the blocks (no experts)."""
    linears = block_linear_weights(checkpoint.config)
    if linears is None:
        linears = {n for n, meta in checkpoint.tensors.items() if _looks_like_block_linear(n, meta)}
    return linears & checkpoint.tensors.keys()


def default_targets(checkpoint: Checkpoint) -> set[str]:
    """What `compress` makes 1-bit unless told otherwise, and what a quantized base quantizes: the
    block linears and the experts' matrices, not the routers."""
    experts = expert_matrices(checkpoint.tensors)
    return (block_linears(checkpoint) | experts.matrices) - experts.routers


@dataclass(frozen=True)
class Experts:
    matrices: set[str]  # expert matrices, per-expert 2-D or stacked 3-D
    routers: set[str]  # the matrices beside them with one row per expert


def expert_matrices(tensors: dict[str, TensorMeta]) -> Experts:
    """The checkpoint's mixture-of-experts matrices and routers, found by structure (module docstring)."""
    matrices: set[str] = set()
    experts_in: dict[str, int] = {}  # the module holding the experts (an MoE layer) -> its expert count
    for name, meta in tensors.items():
        if not _BLOCK_PATTERN.search(name) or not meta.dtype.is_floating_point:
            continue
        listed = list_item(name)
        if len(meta.shape) == 3:  # E matrices stacked: module `...mlp.experts`, MoE layer `...mlp`
            layer, count = _parent(_parent(name)), meta.shape[0]
        elif listed and _looks_like_block_linear(name, meta):  # `...mlp.experts.<index>.w1.weight`
            layer, count = _parent(listed[0]), listed[1] + 1
        else:
            continue
        matrices.add(name)
        experts_in[layer] = max(experts_in.get(layer, 0), count)
    routers = {
        name for name, meta in tensors.items()
        if len(meta.shape) == 2 and name.endswith(".weight") and name not in matrices and experts_in.get(_parent(_parent(name))) == meta.shape[0]
    }
    return Experts(matrices, routers)


def list_item(name: str) -> tuple[str, int, str] | None:
    """(the list, the index, the rest) of a block tensor inside a numbered list within its block:
    `m.layers.3.mlp.experts.17.w1.weight` -> ('m.layers.3.mlp.experts', 17, 'w1.weight')."""
    block = _BLOCK_PATTERN.search(name)
    listed = block and _LIST_ITEM.match(name, block.end())
    if not listed:
        return None
    index, rest = name[listed.end(1) + 1 :].split(".", 1)
    return name[: listed.end(1)], int(index), rest


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _check_same_blocks(linears: set[str], finetuned: Checkpoint, base: Checkpoint) -> None:
    base_type, ft_type = base.config.get("model_type"), finetuned.config.get("model_type")
    if base_type != ft_type:
        raise IncompatibleModelsError(
            f"the base is a {base_type} model but the fine-tune is a {ft_type} model; "
            "a delta needs a fine-tune of this very base"
        )
    for name in sorted(linears):
        ours, theirs = finetuned.tensors[name].shape, base.tensors.get(name)
        if theirs is None or theirs.shape != ours:
            found = "missing" if theirs is None else f"shaped {list(theirs.shape)}"
            raise IncompatibleModelsError(
                f"{name} is {list(ours)} in the fine-tune but {found} in the base; "
                "base and fine-tune must share one architecture"
            )


def _looks_like_block_linear(name: str, meta: TensorMeta) -> bool:
    return len(meta.shape) == 2 and name.endswith(".weight") and bool(_BLOCK_PATTERN.search(name)) \
        and "norm" not in name and "embed" not in name


def _compressible(name: str, finetuned: Checkpoint, base: Checkpoint) -> bool:
    meta = finetuned.tensors[name]
    other = base.tensors.get(name)
    return len(meta.shape) in (2, 3) and meta.dtype.is_floating_point and other is not None and other.shape == meta.shape
