"""What a decoder LM is, read from its config: the shape the generation graph needs, or one line saying why not.

The generation graph (``genai_graph``) covers the pre-norm RoPE decoders with RMSNorm and a gated SiLU MLP: Llama,
Mistral, Qwen2, Qwen3 (per-head q/k norms) and Phi-3 (fused qkv and gate/up projections). Other decoders are
refused here with the feature that is missing, before anything is written.

Weights are found by the names transformers itself gives them: the model is built with its parameters on the
meta device, and each checkpoint name goes through transformers' own renaming (``conversion_mapping``: GPT-NeoX's
``embed_out`` is ``lm_head``) and tied-parameter table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowmem_merge.errors import InputError

# model_type -> what onnxruntime-genai calls it (its config's model.type; all run as one decoder-only model)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}

# model_type -> why the generation graph cannot express it yet
UNSUPPORTED = {
    "gemma": "Gemma's (1 + w) norms and scaled embeddings",
    "gemma2": "Gemma 2's logit soft-capping, (1 + w) norms and sandwich norms",
    "gemma3_text": "Gemma 3's sliding/global layers with two RoPE bases and sandwich norms",
    "gemma3": "Gemma 3's sliding/global layers with two RoPE bases and sandwich norms",
    "gpt2": "learned absolute position embeddings and LayerNorm with biases",
    "gpt_neox": "parallel attention/MLP residuals and partial rotary embeddings",
    "falcon": "parallel attention/MLP residuals and LayerNorm",
    "opt": "learned absolute position embeddings and LayerNorm with biases",
    "mixtral": "mixture-of-experts routing",
    "qwen2_moe": "mixture-of-experts routing",
    "qwen3_moe": "mixture-of-experts routing",
    "phimoe": "mixture-of-experts routing",
    "gpt_oss": "mixture-of-experts routing",
}
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # types whose frequencies do not depend on the length


@dataclass(frozen=True)
class DecoderSpec:
    """Everything the graph needs, in the config's own terms."""
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    context: int
    windows: tuple[int, ...]     # per layer: sliding window in tokens, -1 for full attention
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    fused: bool                  # Phi-3: qkv_proj and gate_up_proj are stored fused

    @property
    def genai_type(self) -> str:
        return GENAI_TYPES[self.model_type]


def refusal(config, model_dir: Path) -> InputError | None:
    """Why this model cannot get a generation graph, or None when it can."""
    mt = getattr(config, "model_type", None)
    where = model_dir / "config.json"
    if mt in UNSUPPORTED:
        return InputError(f"{mt} is not in lowmerge's generation graph yet: {UNSUPPORTED[mt]}", path=where,
                          hint=_hint(mt))
    if mt not in GENAI_TYPES:
        return InputError(f"{mt}: no generation graph for this architecture", path=where, hint=_hint(mt))
    rope = _rope_type(config)
    if rope not in _ROPE_TYPES:
        return InputError(f"RoPE scaling {rope!r} changes with the sequence length; the graph holds one fixed "
                          "table", path=where, hint=f"supported: {', '.join(_ROPE_TYPES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        return InputError(f"activation {config.hidden_act!r}: the graph's MLP is SiLU-gated", path=where)
    if (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0:
        return InputError("partial rotary embeddings are not in the generation graph yet", path=where)
    return None


def _hint(model_type: str | None) -> str:
    plain = "" if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "gpt_oss") else \
        "; --format plain exports a graph without KV cache for validation"
    return f"generation export supports {', '.join(GENAI_TYPES)}{plain}"


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"


def spec_of(config, model_dir: Path) -> DecoderSpec:
    """The spec, or the refusal as an InputError."""
    err = refusal(config, model_dir)
    if err is not None:
        raise err
    heads = config.num_attention_heads
    window = getattr(config, "sliding_window", None) or -1
    kinds = getattr(config, "layer_types", None)
    windows = tuple(window if (kinds is None or kinds[i] == "sliding_attention") else -1
                    for i in range(config.num_hidden_layers))
    context = int(getattr(config, "max_position_embeddings", 0) or 4096)
    return DecoderSpec(
        model_type=config.model_type, layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size, vocab=config.vocab_size, eps=float(config.rms_norm_eps),
        context=context, windows=windows,
        qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_bias=bool(getattr(config, "attention_bias", False)) and config.model_type != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=config.model_type == "qwen3",
        fused=config.model_type == "phi3")
