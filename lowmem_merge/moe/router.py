"""Router weights from prompts, as mergekit-moe makes them (mergekit/moe/router.py), one (E, hidden) per layer.

Prompts are tokenized as mergekit does: the BOS text prefixed, no other special tokens, padded on the left with
BOS (EOS without one), so that each prompt's last position is its last token.

  hidden / hidden_last  layer ℓ's input hidden state at the last position, averaged over the prompts;
  hidden_avg            the same averaged over every position (padding included, as mergekit does);
  for both, an expert's vector is mean(positive) − mean(negative), normalized to unit length per layer.
  cheap_embed           the base's token embeddings summed over the prompts' real tokens, normalized; the
                        negative prompts' normalized sum subtracted, normalized again; one vector for every layer.
  random                torch.randn((layers, experts, hidden)) from a generator seeded with ``seed`` (mergekit
                        draws from torch's global generator: ``torch.manual_seed(seed)`` there gives these values).

``hidden`` runs the base block by block (calib.model.BlockModel): one block's weights and the prompts' activations
at a time, in fp32 (mergekit runs the whole model in bf16).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..calib.data import Batch, load_tokenizer
from ..calib.model import BlockModel, run_block
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from .config import MoeConfig

EPS = 1e-8                                         # mergekit's clamp on the norm


class _BaseOnly:
    """What BlockModel reads of a plan: the base checkpoint."""

    def __init__(self, base: Checkpoint) -> None:
        self.base = base


def gate_vectors(config: MoeConfig, base: Checkpoint, n_layers: int, hidden: int, device: torch.device,
                 seed: int = 0) -> torch.Tensor:
    """(layers, experts, hidden) fp32 on the CPU: row e of layer ℓ is expert e's router weight (the shared
    expert's gate last, where there is one; random draws its row too, as mergekit does for a prompted one)."""
    n = len(config.gated)
    if config.gate_mode == "random":
        return torch.randn((n_layers, n, hidden), generator=torch.Generator().manual_seed(seed))
    tokenizer = _prompt_tokenizer(base)
    sets = [_tokenize(tokenizer, e.positive_prompts) for e in config.gated]
    negatives = [_tokenize(tokenizer, e.negative_prompts) if e.negative_prompts else None for e in config.gated]
    if config.gate_mode == "cheap_embed":
        return _cheap_embed(base, sets, negatives, n_layers)
    return _hidden(base, sets, negatives, n_layers, device, average=config.gate_mode == "hidden_avg")


def _prompt_tokenizer(base: Checkpoint):
    if base.model_dir is None:
        raise InputError("routers from prompts need the base as a model directory with its tokenizer",
                         path=base.path, hint="or use gate_mode: random")
    tok = load_tokenizer(Path(base.model_dir))
    tok.padding_side = "left"
    fill = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if fill is not None:                       # mergekit pads with BOS, else EOS (hidden_avg averages padding too)
        tok.pad_token_id = fill
    return tok


def _tokenize(tokenizer, prompts: tuple[str, ...]) -> Batch:
    enc = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return Batch(enc["input_ids"].long(), enc["attention_mask"].long())


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def _cheap_embed(base: Checkpoint, sets: list[Batch], negatives: list[Batch | None], n_layers: int) -> torch.Tensor:
    name = "model.embed_tokens.weight"
    if name not in base.entries:
        raise InputError("cheap_embed needs the base's token embeddings", path=base.path, tensor=name,
                         hint="use gate_mode: hidden or random")
    embed = base.read(name).float()                                      # (vocab, hidden)

    def summed(b: Batch) -> torch.Tensor:
        rows = embed[b.input_ids] * b.attention_mask.unsqueeze(-1)       # (B, L, hidden), padding zeroed
        return _unit(rows.sum(dim=1).sum(dim=0))
    vecs = []
    for pos, neg in zip(sets, negatives):
        v = summed(pos)
        if neg is not None:
            v = v - summed(neg)
        vecs.append(_unit(v))
    return torch.stack(vecs).unsqueeze(0).repeat(n_layers, 1, 1)


def _hidden(base: Checkpoint, sets: list[Batch], negatives: list[Batch | None], n_layers: int,
            device: torch.device, average: bool) -> torch.Tensor:
    """Each layer's input for every prompt set, reduced as mergekit does, walking the base one block at a time."""
    net = BlockModel(_BaseOnly(base), device)
    if len(net.blocks) != n_layers:
        raise InputError(f"the base model has {len(net.blocks)} layers, its checkpoint {n_layers}", path=base.path,
                         hint="the base's checkpoint does not match its config.json")
    source = lambda name: base.read(name).float()                        # noqa: E731
    batches = sets + [b for b in negatives if b is not None]
    caches = net.prelude(batches, source)                                # per set: (hidden, args, kwargs)
    out = torch.empty((n_layers, len(sets), caches[0][0].shape[-1]))
    for layer in range(n_layers):
        reduced = [_reduce(h, average) for h, _, _ in caches]
        neg_iter = iter(reduced[len(sets):])
        for e, neg in enumerate(negatives):
            v = reduced[e] if neg is None else reduced[e] - next(neg_iter)
            out[layer, e] = _unit(v).cpu()
        if layer == n_layers - 1:
            break                                                        # the last block's output is not needed
        block = net.load_block(layer, source)
        try:
            with torch.no_grad():
                caches = [(run_block(block, h, a, kw), a, kw) for h, a, kw in caches]
        finally:
            net.release_block(layer)
    return out


def _reduce(h: torch.Tensor, average: bool) -> torch.Tensor:
    """(B, L, hidden) -> (hidden): the last position (or every position's mean), averaged over the prompts."""
    h = h.float()
    x = h.sum(dim=1) / h.shape[1] if average else h[:, -1, :]
    return x.sum(dim=0) / x.shape[0]
