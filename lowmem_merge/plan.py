"""Headers only: match names across base and experts, classify, check, order the output, estimate memory.

Every input error that headers can show is raised here, before any compute or any output byte.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import InputError
from .info import TensorClass, TensorInfo
from .io.checkpoint import Checkpoint
from .io.lora import LoraAdapter
from .io.reader import TensorEntry
from .names import (is_bias, is_conv1d, is_embedding, is_lm_head, is_stacked_experts, is_task_head,
                    is_token_embedding, layer_of)

Expert = Checkpoint | LoraAdapter

_CONV1D_MODELS = {"gpt2", "gpt_bigcode", "openai-gpt", "imagegpt", "decision_transformer"}
_MOE_IN_OUT_MODELS = {"gpt_oss"}                             # stacked (E, in, out): x @ W[e]


class PlanWarning(str):
    """A warning as data: ``kind`` and ``fields`` for code that acts on it, the message as the string itself, so
    the report, the card and the CLI write it exactly as before and nobody parses it back."""
    kind: str
    fields: dict[str, Any]

    def __new__(cls, kind: str, message: str, **fields: Any) -> PlanWarning:
        self = super().__new__(cls, message)
        self.kind, self.fields = kind, fields
        return self

    @property
    def message(self) -> str:
        return str.__str__(self)

    def __getnewargs__(self) -> tuple[str, str]:     # copy and pickle rebuild it through __new__
        return self.kind, self.message


EXPERT_IS_BASE = "expert_is_base"    # fields: expert (index), path
VOCAB_UNION = "vocab_union"          # fields: rows, base_rows
RECIPE_NOTE = "recipe_note"          # no fields: what the recipe chose (a base-less recipe's reference model)


@dataclass
class Plan:
    base: Checkpoint
    experts: list[Expert]
    tensors: list[TensorInfo]                                   # output order; HEADs of the base included
    out_dtype: dict[str, torch.dtype]
    heads: list[list[str]] = field(default_factory=list)       # per expert: head tensors written to heads/
    warnings: list[PlanWarning] = field(default_factory=list)
    vocab: Any = None                                          # vocab.Vocabulary when vocabularies are aligned

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def entry(self, name: str) -> TensorEntry:
        return self.base.entries[name]


def make_plan(base: Checkpoint, experts: list[Expert], dtype: torch.dtype | None = None) -> Plan:
    """Match, classify and check. ``dtype``: output dtype of float tensors (None = the base's)."""
    if isinstance(base, LoraAdapter):
        raise InputError("a LoRA adapter cannot be the base", path=base.path,
                         hint="pass the model it was trained on as BASE and the adapter as an expert")
    if not experts:
        raise InputError("no experts given", hint="lowmerge merge BASE EXPERT [EXPERT ...] -o OUT")
    if not base.entries:
        raise InputError("the base holds no tensors", path=base.path)
    config = base.config or {}
    conv1d = config.get("model_type") in _CONV1D_MODELS
    moe_in_out = config.get("model_type") in _MOE_IN_OUT_MODELS
    canonical_emb = _tied_embedding(base, config)
    infos: list[TensorInfo] = []
    out_dtype: dict[str, torch.dtype] = {}
    order = sorted(base.entries.values(), key=lambda e: (str(e.path), e.offset))
    for entry in order:
        info = replace(_classify(entry, conv1d, moe_in_out, canonical_emb), layer=layer_of(entry.name))
        for ex in experts:
            _check_expert(entry, info, ex)
        infos.append(info)
        out_dtype[entry.name] = dtype if (dtype is not None and entry.is_float) else entry.dtype
    for ex in experts:
        if isinstance(ex, LoraAdapter):
            _check_adapter(base, {i.name: i for i in infos}, ex)
    heads = [_expert_heads(base, ex) for ex in experts]
    infos = _tied_after_canonical(infos)
    plan = Plan(base, experts, infos, out_dtype, heads)
    plan.warnings.extend(_warnings(plan))
    return plan


def _tied_embedding(base: Checkpoint, config: dict) -> str | None:
    """The input-embedding name when config says lm_head is tied to it and both are stored."""
    if not config.get("tie_word_embeddings", False):
        return None
    for name, e in base.entries.items():
        if e.is_float and len(e.shape) == 2 and is_token_embedding(name):
            return name
    return None


def _classify(entry: TensorEntry, conv1d: bool, moe_in_out: bool, canonical_emb: str | None) -> TensorInfo:
    """The tensor's class and its shape as the method sees it (ALGORITHMS.md §13)."""
    name, shape = entry.name, entry.shape
    if not entry.is_float or 0 in shape:      # no elements: nothing to merge, the base's (empty) value is the merge
        return TensorInfo(name, shape, TensorClass.INT)
    if is_task_head(name):
        return TensorInfo(name, shape, TensorClass.HEAD)
    if canonical_emb and is_lm_head(name) and name != canonical_emb:
        return TensorInfo(name, shape, TensorClass.TIED, tied_to=canonical_emb)
    if len(shape) <= 1 or is_bias(name):  # stacked MoE biases (E, out) are vectors too
        return TensorInfo(name, shape, TensorClass.VEC)
    if len(shape) == 3 and is_stacked_experts(name):  # a batch of E linear maps, each merged with the LIN rule
        if moe_in_out:
            return TensorInfo(name, (shape[0], shape[2], shape[1]), TensorClass.LIN, transposed=True)
        return TensorInfo(name, shape, TensorClass.LIN)
    if len(shape) >= 3:
        return TensorInfo(name, shape, TensorClass.CONV)
    if is_embedding(name):
        return TensorInfo(name, shape, TensorClass.EMB)
    if conv1d and is_conv1d(name):
        return TensorInfo(name, (shape[1], shape[0]), TensorClass.LIN, transposed=True)
    return TensorInfo(name, shape, TensorClass.LIN)


def _check_expert(entry: TensorEntry, info: TensorInfo, expert: Expert) -> None:
    name = entry.name
    if info.cls == TensorClass.HEAD or (info.cls == TensorClass.INT and not entry.is_float) or \
            (info.cls == TensorClass.TIED and name not in expert.entries):
        return   # heads are kept per expert, integer buffers come from the base (empty float tensors are checked)
    if isinstance(expert, LoraAdapter) and name not in expert.entries:
        return   # Δ = 0 or a LoRA product: _check_adapter
    theirs = expert.entries.get(name)
    if theirs is None:
        raise InputError("tensor of the base is missing from this expert", path=expert.path, tensor=name,
                         hint="every expert must be a fine-tune of the base with the same architecture")
    if theirs.shape != entry.shape:
        if info.cls in (TensorClass.EMB, TensorClass.TIED) or is_lm_head(name):
            raise InputError(f"vocabulary size differs: expert has {theirs.shape[0]} rows, base "
                             f"{entry.path} has {entry.shape[0]}", path=theirs.path, tensor=name,
                             hint="lowmerge matches rows by token on the word embeddings and the LM head only: "
                                  "resize this tensor to the base's vocabulary")
        raise InputError(f"shape {list(theirs.shape)} differs from the base's {list(entry.shape)}", path=theirs.path,
                         tensor=name, hint="every expert must be a fine-tune of the base with the same architecture")
    if theirs.is_float != entry.is_float:
        raise InputError(f"dtype {theirs.dtype} does not match the base's {entry.dtype}", path=theirs.path,
                         tensor=name, hint="every expert must be a fine-tune of the base")


def _check_adapter(base: Checkpoint, infos: dict[str, TensorInfo], adapter: LoraAdapter) -> None:
    """Every LoRA product lands on a mergeable base weight of its shape; every saved tensor names a base tensor."""
    for name, e in adapter.entries.items():
        if name not in base.entries and not is_task_head(name):
            raise InputError("tensor not in the base", path=e.path, tensor=e.name,
                             hint="the adapter was trained on another model: pass that model as BASE")
    for name, f in adapter.lora.items():
        entry = base.entries.get(name)
        if entry is None:
            raise InputError(f"LoRA module: the base has no weight {name!r}", path=f.a.path, tensor=f.a.name,
                             hint="the adapter was trained on another model: pass that model as BASE")
        if infos[name].cls not in (TensorClass.LIN, TensorClass.EMB):
            raise InputError(f"LoRA on a {infos[name].cls.value} tensor is not supported", path=f.a.path,
                             tensor=f.a.name, hint="merge this adapter with PEFT's merge_and_unload first")
        if f.stored_shape != entry.shape:
            raise InputError(f"LoRA delta B·A has shape {list(f.stored_shape)} (fan_in_fan_out="
                             f"{f.fan_in_fan_out}), the base's {name} has {list(entry.shape)}", path=f.b.path,
                             tensor=f.b.name, hint="the adapter was trained on another model: pass that model as BASE")


def _expert_heads(base: Checkpoint, expert: Expert) -> list[str]:
    extra = sorted(set(expert.entries) - set(base.entries))
    heads = [n for n in extra if is_task_head(n)]
    others = [n for n in extra if not is_task_head(n)]
    if others:
        raise InputError(f"tensor not in the base ({len(others)} such)", path=expert.path, tensor=others[0],
                         hint="every expert must have the base's architecture; task heads must be named "
                              "'classifier' or 'score'")
    heads += sorted(n for n in expert.entries if n in base.entries and is_task_head(n))
    return heads


def _tied_after_canonical(infos: list[TensorInfo]) -> list[TensorInfo]:
    """Put each TIED tensor right after its canonical one, so the merged value is at hand when it is written."""
    tied = {i.tied_to: i for i in infos if i.cls == TensorClass.TIED}
    out: list[TensorInfo] = []
    for info in infos:
        if info.cls == TensorClass.TIED:
            continue
        out.append(info)
        if info.name in tied:
            out.append(tied[info.name])
    return out


def _warnings(plan: Plan) -> list[PlanWarning]:
    base_files = [f.path for f in plan.base.files]
    return [PlanWarning(EXPERT_IS_BASE, f"expert {i} ({ex.path}) reads the same files as the base: its task vector "
                        "is zero", expert=i, path=str(ex.path))
            for i, ex in enumerate(plan.experts) if [f.path for f in ex.files] == base_files]
