"""What the MoE will hold, from headers and configs alone: the checks that run before anything is written.

Experts must be fine-tunes of the base's architecture and width (same model_type, the base's MLP shapes in every
layer); the base must map onto the output's transformers class (Mixtral: Llama or Mistral without biases;
Qwen2-MoE: Qwen2 too): every output tensor is compared with that model built on the meta device from the output
config.
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
QKV = re.compile(r"^model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight$")
SOURCE_TYPES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}
OUTPUT_CLASSES = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                  "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM")}
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass
class Layout:
    n_layers: int
    hidden: int
    intermediate: int
    out_dtype: torch.dtype | None             # None: every tensor keeps its stored dtype
    out_config: object                        # transformers.MixtralConfig or Qwen2MoeConfig of the output
    zero_qkv_bias: bool                       # Qwen2-MoE from a base without q/k/v biases: zeros, as mergekit writes

    @property
    def architecture(self) -> str:
        return self.out_config.architectures[0]


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}_proj.weight"


def check_inputs(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint]) -> Layout:
    """``experts``: one checkpoint per ``config.gated`` (the shared expert last)."""
    base_type, sources = (base.config or {}).get("model_type"), SOURCE_TYPES[config.family]
    if base_type not in sources:
        raise InputError(f"the base's model_type is {base_type!r}: lowmerge builds {config.family} MoEs from "
                         f"{', '.join(sources)} models", path=base.path,
                         hint="use a base of one of those architectures (with its config.json)")
    layers = sorted({int(m.group(1)) for n in base.entries if (m := MLP.match(n))})
    if not layers or layers != list(range(len(layers))):
        raise InputError("no MLP weights model.layers.N.mlp.{gate,up,down}_proj.weight", path=base.path,
                         hint="the base must be a Llama- or Mistral-architecture model")
    names = [mlp_name(i, p) for i in layers for p in ("gate", "up", "down")]
    missing = [n for n in names if n not in base.entries]
    if missing:
        raise InputError("the base has no such MLP weight", path=base.path, tensor=missing[0],
                         hint="every layer needs its gate_proj, up_proj and down_proj (a Llama or Mistral MLP)")
    shapes = {n: base.entries[n].shape for n in names}
    for spec, ck in zip(config.gated, experts):
        _check_expert(spec.source_model, ck, base, base_type, shapes)
    intermediate, hidden = shapes[mlp_name(0, "gate")]
    out_dtype = config.dtype or _config_dtype(base.config)
    zero_bias = config.family == "qwen2_moe" and "model.layers.0.self_attn.q_proj.bias" not in base.entries
    return Layout(len(layers), hidden, intermediate, out_dtype, output_config(base, config, out_dtype), zero_bias)


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


def output_config(base: Checkpoint, config: MoeConfig, out_dtype: torch.dtype | None):
    """mergekit-moe's output config: the base's, as a MixtralConfig (or Qwen2MoeConfig) with the experts' count
    and top-k and no sliding window."""
    transformers = require_transformers("lowmerge moe")
    if base.model_dir is None:
        raise InputError("the base must be a model directory with its config.json", path=base.path,
                         hint="the output's config.json is made from the base's")
    refuse_remote_code(base.model_dir)
    try:
        src = transformers.AutoConfig.from_pretrained(str(base.model_dir), local_files_only=True,
                                                      trust_remote_code=False).to_dict()
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the base's config: {str(e).splitlines()[0]}", path=base.model_dir,
                         hint="the output's config.json is made from the base's config.json") from None
    for key in ("architectures", "model_type", "transformers_version", "auto_map"):
        src.pop(key, None)
    config_class, model_class = OUTPUT_CLASSES[config.family]
    out = getattr(transformers, config_class)(**src)
    out.architectures = [model_class]
    out.num_experts_per_tok = config.experts_per_token
    out.sliding_window = None
    if config.family == "mixtral":
        out.num_local_experts = len(config.experts)
    else:                                      # mergekit's Qwen2-MoE: every layer sparse, experts as wide as the MLP
        out.num_experts = len(config.experts)
        out.decoder_sparse_step, out.norm_topk_prob, out.use_sliding_window = 1, True, False
        out.moe_intermediate_size = out.shared_expert_intermediate_size = out.intermediate_size
    if out_dtype is not None:
        out.dtype = str(out_dtype).removeprefix("torch.")
    return out


def check_model(out_config, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], base: Checkpoint) -> None:
    """Every output tensor has its place and shape in the output's transformers model, and that model needs no
    other (a tied head excepted)."""
    transformers = require_transformers("lowmerge moe")
    arch = out_config.architectures[0]
    with torch.device("meta"):
        model = getattr(transformers, arch)(out_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, _, shape in specs:
        if expected.get(name) != tuple(shape):
            where = "has no place" if name not in expected else f"has shape {list(shape)}, not {list(expected[name])},"
            raise InputError(f"{where} in a {arch} model", path=base.path, tensor=name,
                             hint="Mixtral takes Llama/Mistral bases without biases; with shared_experts, "
                                  "Qwen2-MoE takes Qwen2 bases too")
    ours = {s[0] for s in specs}
    tied = {"lm_head.weight"} if getattr(out_config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - ours - tied)
    if missing:
        raise InputError(f"the base has no such tensor, which a {arch} model needs", path=base.path,
                         tensor=missing[0], hint="the base's checkpoint does not match its config.json")
