"""The weights of a Hugging Face directory, read one tensor at a time through lowmerge's own reader.

Export reads through the reader that merge uses (``lowmem_merge.io.checkpoint``): the same header checks, the same
refusal of shard indexes that point outside the model's folder, the same ``pread`` into a fresh buffer. Files are
never mapped: a mapped safetensors file counts in the resident set once its pages are touched, which would make
the export's peak grow with the model; page cache filled by ``pread`` does not.

Names: ``names_in(model)`` maps each parameter of a transformers model to the checkpoint tensor holding it, through
transformers' own key renaming (GPT-NeoX stores ``embed_out``, the model calls it ``lm_head``) and base-model prefix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lowmem_merge.errors import InputError
from lowmem_merge.io.checkpoint import Checkpoint, open_checkpoint

from .tensors import check_finite


class Weights:
    """Every tensor of a model directory, by checkpoint name; ``read`` returns one fresh CPU tensor."""

    def __init__(self, model_dir: Path) -> None:
        ckpt = open_checkpoint(model_dir)
        if not isinstance(ckpt, Checkpoint) or ckpt.model_dir is None:
            raise InputError("not a model directory with safetensors weights", path=model_dir,
                             hint="export takes a merged model directory (config.json + safetensors); merge a "
                                  "LoRA adapter first: lowmerge merge BASE ADAPTER -o OUT")
        self.model_dir = model_dir
        self.checkpoint = ckpt
        self.entries = ckpt.entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor in its stored dtype; the caller owns (and frees) it."""
        return self.checkpoint.read(name)

    def close(self) -> None:
        self.checkpoint.close()


def names_in(model: torch.nn.Module, weights: Weights) -> dict[str, str]:
    """Model parameter name -> checkpoint name, as ``from_pretrained`` would match them.

    Only renamings are followed. A checkpoint that transformers must convert while loading (per-expert tensors
    stacked into one, fused projections split) is refused: its tensors are not the model's.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = dict(model.state_dict(keep_vars=True))
    found: dict[str, str] = {}
    for stored in weights.entries:
        name, converter = rename_source_key(stored, renamings, converters, model.base_model_prefix, meta)
        if converter is not None:
            raise InputError("transformers converts this checkpoint's tensors while loading (not only renames)",
                             path=weights.model_dir, tensor=stored,
                             hint="save the model once with transformers' save_pretrained, then export that")
        found.setdefault(name, stored)
    return found


class ByParameter:
    """The checkpoint read by the model's own parameter names: renamings and tied weights followed, every tensor
    checked for NaN/Inf as it is read (so a broken model stops the export before its output can look complete)."""

    def __init__(self, meta: torch.nn.Module, weights: Weights, ties: dict[str, list[str]]) -> None:
        self.weights = weights
        self.names = names_in(meta, weights)
        self.ties = ties

    def stored(self, name: str) -> str | None:
        """The checkpoint name holding parameter ``name`` (or a tied twin of it), or None."""
        for candidate in self.ties.get(name, [name]):
            if candidate in self.names:
                return self.names[candidate]
        return None

    def has(self, name: str) -> bool:
        return name in self.ties and self.stored(name) is not None

    def read(self, name: str) -> torch.Tensor:
        """Parameter ``name`` as a fresh CPU tensor, floats in fp32."""
        stored = self.stored(name)
        if stored is None:
            raise InputError("the checkpoint has no tensor for this parameter", path=self.weights.model_dir,
                             tensor=name, hint="config.json does not describe these weights; is this the right "
                                               "directory?")
        t = self.weights.read(stored)
        if not t.is_floating_point():
            return t
        t = t.to(torch.float32)
        check_finite(t, stored, self.weights.model_dir)
        return t
