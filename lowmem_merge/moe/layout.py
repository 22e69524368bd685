"""What the MoE will hold, from headers and configs alone: the checks that run before anything is written.

Experts must be fine-tunes of the base's architecture and width (same model_type, the base's MLP shapes in every
layer); the base must map onto transformers' Mixtral (Llama or Mistral without biases): every output tensor is
compared with a Mixtral model built on the meta device from the output config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..calib import refuse_remote_code, require_transformers
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from .config import DTYPES, MoeConfig

MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
SOURCE_TYPES = ("llama", "mistral")
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass
class Layout:
    n_layers: int
    hidden: int
    intermediate: int
    out_dtype: torch.dtype | None             # None: every tensor keeps its stored dtype
    mixtral: object                           # transformers.MixtralConfig of the output


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


def check_inputs(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint]) -> Layout:
    base_type = (base.config or {}).get("model_type")
    if base_type not in SOURCE_TYPES:
        raise InputError(f"the base's model_type is {base_type!r}: lowmerge builds Mixtral MoEs from "
                         f"{' or '.join(SOURCE_TYPES)} models", path=base.path,
                         hint="use a Llama- or Mistral-architecture base (with its config.json)")
    layers = sorted({int(m.group(1)) for n in base.entries if (m := MLP.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise InputError("no MLP weights model.layers.N.mlp.{gate,up,down}_proj.weight", path=base.path,
                         hint="the base must be a Llama- or Mistral-architecture model")
    shapes = {mlp_name(i, p): base.entries[mlp_name(i, p)].shape for i in layers for p in ("gate", "up", "down")}
    for spec, ck in zip(config.experts, experts):
        _check_expert(spec.source_model, ck, base, base_type, shapes)
    intermediate, hidden = shapes[mlp_name(0, "gate")]
    out_dtype = config.dtype or _config_dtype(base.config)
    return Layout(len(layers), hidden, intermediate, out_dtype,
                  mixtral_config(base, len(experts), config.experts_per_token, out_dtype))


def _check_expert(label: str, ck: Checkpoint, base: Checkpoint, base_type: str, shapes: dict) -> None:
    cfg = ck.config or {}
    if cfg.get("model_type", base_type) != base_type:
        raise InputError(f"the expert's model_type {cfg['model_type']!r} differs from the base's {base_type!r}",
                         path=label, hint="every expert must be a fine-tune of the base's architecture")
    for key in WIDTH_KEYS:
        if key in cfg and key in (base.config or {}) and cfg[key] != base.config[key]:
            raise InputError(f"the expert's {key} {cfg[key]} differs from the base's {base.config[key]}",
                             path=label, hint="every expert must have the base's width and depth")
    for name, shape in shapes.items():
        entry = ck.entries.get(name)
        if entry is None:
            raise InputError("the expert has no such MLP weight", path=label, tensor=name,
                             hint="every expert must be a fine-tune of the base's architecture")
        if entry.shape != shape:
            raise InputError(f"shape {list(entry.shape)} differs from the base's {list(shape)}", path=label,
                             tensor=name, hint="every expert must have the base's width")


def _config_dtype(cfg: dict | None) -> torch.dtype | None:
    name = (cfg or {}).get("dtype") or (cfg or {}).get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def mixtral_config(base: Checkpoint, n_experts: int, top_k: int, out_dtype: torch.dtype | None):
    """mergekit-moe's output config: the base's, as a MixtralConfig with the experts' count and top-k and no
    sliding window."""
    transformers = require_transformers("lowmerge moe")
    if base.model_dir is None:
        raise InputError("the base must be a model directory with its config.json", path=base.path,
                         hint="the output's config.json is made from the base's")
    refuse_remote_code(base.model_dir)
    src = transformers.AutoConfig.from_pretrained(str(base.model_dir), local_files_only=True,
                                                  trust_remote_code=False).to_dict()
    for key in ("architectures", "model_type", "transformers_version", "auto_map"):
        src.pop(key, None)
    out = transformers.MixtralConfig(**src)
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = n_experts
    out.num_experts_per_tok = top_k
    out.sliding_window = None
    if out_dtype is not None:
        out.dtype = str(out_dtype).removeprefix("torch.")
    return out


def check_mixtral(mixtral, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], base: Checkpoint) -> None:
    """Every output tensor has its place and shape in transformers' Mixtral, and Mixtral needs no other (a tied
    head excepted)."""
    transformers = require_transformers("lowmerge moe")
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(mixtral)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, _, shape in specs:
        if expected.get(name) != tuple(shape):
            where = "has no place" if name not in expected else f"has shape {list(shape)}, not {list(expected[name])},"
            raise InputError(f"{where} in a Mixtral model", path=base.path, tensor=name,
                             hint="lowmerge builds Mixtral MoEs from Llama/Mistral models without biases")
    ours = {s[0] for s in specs}
    tied = {"lm_head.weight"} if getattr(mixtral, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - ours - tied)
    if missing:
        raise InputError("the base has no such tensor, which a Mixtral model needs", path=base.path,
                         tensor=missing[0], hint="the base's checkpoint does not match its config.json")
