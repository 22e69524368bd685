"""What a tensor's name says about it: which repeated layer it belongs to, whether it is indexed by token, whether
it is a task head. The only place lowmerge reads meaning into names, so every module agrees on them.

Names are those transformers writes: ``model.layers.3.mlp.up_proj.weight`` (llama, qwen2, phi3, mistral),
``transformer.h.3.attn.c_attn.weight`` (gpt2), ``gpt_neox.layers.3...`` (gpt_neox), ``bert.encoder.layer.3...``
(bert), ``encoder.block.3.layer.0...`` (t5: the first ``<stack>.N`` is the layer, ``layer.0`` is a sub-block).
"""
from __future__ import annotations

import re
from typing import NamedTuple

# The first "<stack>.<N>." component: the repeated layer the tensor belongs to.
_LAYER = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)\.")
# Tensors indexed by token or position, before the layers: token, position and token-type embeddings.
_EMBEDDING = re.compile(r"(embed|wte|wpe|(^|\.)shared\.|position|token_type)")
# The token-embedding matrix an LM head can be tied to.
_TOKEN_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|shared|embed_in)\.weight$")
# The output embedding: logits over the vocabulary (gpt_neox calls it embed_out).
_LM_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.weight$")
# Task-specific heads (sequence / token classification): kept per expert, never merged.
_TASK_HEAD = re.compile(r"(^|\.)(classifier|score)(\.|$)")
_BIAS = re.compile(r"(^|[._])bias$")
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")   # GPT-2 Conv1D: stored (in, out)
_STACKED_EXPERTS = re.compile(r"\.experts\.[^.]+$")        # stacked MoE experts: (E, out, in), transformers 5


class LayerName(NamedTuple):
    """``model.layers.3.mlp.up_proj.weight`` -> ("model.layers", 3, "mlp.up_proj.weight")."""
    prefix: str
    index: int
    rest: str


def split_layer(name: str) -> LayerName | None:
    """The layer stack, index and the name inside the layer; None for a tensor outside the layers."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return LayerName(name[:m.end(1)], int(m.group(2)), name[m.end():])


def layer_of(name: str) -> int | None:
    """The index of the repeated layer holding ``name``; None for embeddings, final norm, heads."""
    split = split_layer(name)
    return split.index if split else None


def block_of(name: str) -> str:
    """``model.layers.3`` for any tensor of that layer; otherwise the module (the name without its last part)."""
    split = split_layer(name)
    return f"{split.prefix}.{split.index}" if split else name.rsplit(".", 1)[0]


def is_lm_head(name: str) -> bool:
    """The output embedding (``lm_head.weight``, gpt_neox's ``embed_out.weight``)."""
    return _LM_HEAD.search(name) is not None


def is_embedding(name: str) -> bool:
    """An embedding (token, position, token type; gpt_neox's embed_out by its name): rows indexed by token or
    position, merged with the EMB rule. ``lm_head`` is a linear map (LIN) unless tied."""
    return _EMBEDDING.search(name) is not None


def is_input_embedding(name: str) -> bool:
    """An embedding that comes before the layers (not the LM head): mergekit's and the stack's "before" side."""
    return is_embedding(name) and not is_lm_head(name) and split_layer(name) is None


def is_token_embedding(name: str) -> bool:
    """The token-embedding matrix: what a tied LM head copies."""
    return _TOKEN_EMBEDDING.search(name) is not None


def is_vocab_tensor(name: str) -> bool:
    """A matrix with one row per token: the token embedding or the LM head."""
    return is_token_embedding(name) or is_lm_head(name)


def is_task_head(name: str) -> bool:
    return _TASK_HEAD.search(name) is not None


def is_bias(name: str) -> bool:
    return _BIAS.search(name) is not None


def is_conv1d(name: str) -> bool:
    """A GPT-2 Conv1D weight (attention and MLP), stored (in, out), in models whose config says they use Conv1D."""
    return _CONV1D.search(name) is not None


def is_stacked_experts(name: str) -> bool:
    """A 3-D tensor holding every MoE expert's linear map: ``...mlp.experts.gate_up_proj``."""
    return _STACKED_EXPERTS.search(name) is not None
