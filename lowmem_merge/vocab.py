"""Experts with another vocabulary (added tokens): every vocabulary-indexed tensor is read in one output vocabulary,
row by row matched by token (ALGORITHMS.md §9.6).

The output vocabulary is ``tokenizer_source``'s: ``base`` (the base's tokenizer; tokens only experts know are
dropped), ``union`` (the base's tokenizer plus, in the experts' order, every token an expert has and the base lacks,
as added tokens with their settings, like mergekit's), or a model directory (its tokenizer). Per output row:
  the base's row of that token, or the mean of the base's token rows where the base lacks it;
  an expert's row of that token, or the base's output row where the expert lacks it (its task vector there is 0).
Then the merge rule runs as on any tensor. The output directory gets the output tokenizer (its added tokens and a
chat template) and config.json's ``vocab_size``.

Nothing is held whole: a read of output rows [r0, r1) reads the matching source rows run by run (one run when the
order is unchanged) into the caller's buffer; the base's mean row is computed once, chunk by chunk, at set-up.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, InputError
from .io.checkpoint import Checkpoint
from .io.hub import resolve
from .io.lora import LoraAdapter
from .io.reader import TensorEntry
from .names import is_vocab_tensor

Model = Checkpoint | LoraAdapter
SOURCES = ("base", "union")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja")
MEAN_CHUNK_BYTES = 16 << 20


@dataclass
class Vocabulary:
    """The output vocabulary and, per model (base first), the source row of each output row (−1: lacks it)."""
    source: str
    rows: int
    base_rows: int
    maps: list[torch.Tensor]
    tensors: list[str]
    added: list[str]                 # output tokens the base lacks
    files_dir: Path                  # the output tokenizer, saved
    files: list[str]

    def describe(self) -> dict:
        digest = hashlib.sha256()
        for m in self.maps:
            digest.update(m.numpy().tobytes())
        return {"tokenizer_source": self.source, "rows": self.rows, "base_rows": self.base_rows,
                "tensors": self.tensors, "added_tokens": self.added, "row_maps_sha256": digest.hexdigest()}


def vocab_tensors(ckpt: Model) -> list[str]:
    """The base's tensors indexed by token: word embeddings and the LM head (2-D, float)."""
    return sorted(n for n, e in ckpt.entries.items() if is_vocab_tensor(n) and e.is_float and len(e.shape) == 2)


def _differs(base: Checkpoint, experts: list[Model], names: list[str]) -> bool:
    return any(n in ex.entries and ex.entries[n].shape[0] != base.entries[n].shape[0]
               for ex in experts for n in names)


def align(base: Checkpoint, experts: list[Model], source: str | None) -> Vocabulary | None:
    """Match every model's vocabulary-indexed rows to the output vocabulary, by token; None when there is nothing
    to match (no ``source`` given and every expert has the base's row count): tensors are then merged by index."""
    if isinstance(base, LoraAdapter):
        return None                                     # make_plan refuses it
    names = vocab_tensors(base)
    if source is None and not _differs(base, experts, names):
        return None
    source = source or "union"
    if not names:
        raise InputError("the base has no word-embedding or LM-head tensor to align vocabularies on", path=base.path,
                         hint="drop --tokenizer-source")
    base_rows = base.entries[names[0]].shape[0]
    for n in names:
        if base.entries[n].shape[0] != base_rows:
            raise InputError(f"{base.entries[n].shape[0]} rows, the base's {names[0]} has {base_rows}",
                             path=base.path, tensor=n, hint="the base's vocabulary tensors must agree")
    from .calib import require_transformers
    transformers = require_transformers("merging experts of other vocabularies")
    why = _why(experts, names, base_rows, source)
    base_tok = _tokenizer(transformers, base.model_dir, base, "the base", why)
    toks = []
    for i, ex in enumerate(experts):
        rows = _rows(ex, names)
        tok = _tokenizer(transformers, _model_dir(ex), ex, f"expert {i}", why,
                         required=rows not in (None, base_rows))
        toks.append(tok if tok is not None else base_tok)
    out_tok, out_rows = _output_tokenizer(transformers, source, base_tok, toks, base_rows, experts, names)
    out_tok.chat_template = _chat_template([base_tok, *toks], out_tok, source)
    out_vocab = out_tok.get_vocab()
    by_id = {i: t for t, i in out_vocab.items()}
    base_vocab = base_tok.get_vocab()
    maps = [_row_map(by_id, base_vocab, out_rows, base_rows)]
    for ex, tok in zip(experts, toks):
        maps.append(_row_map(by_id, tok.get_vocab(), out_rows, _rows(ex, names) or base_rows))
    added = [by_id[i] for i in sorted(by_id) if by_id[i] not in base_vocab]
    vocab = Vocabulary(source, out_rows, base_rows, maps, names, added, Path(), [])
    _attach(base, experts, vocab, base_vocab)
    vocab.files_dir = Path(tempfile.mkdtemp(prefix="lowmerge-tokenizer-"))
    out_tok.save_pretrained(vocab.files_dir)
    vocab.files = sorted(p.name for p in vocab.files_dir.iterdir() if p.is_file())
    return vocab


def set_vocab_size(config: dict, rows: int) -> None:
    """config.json's vocabulary size (a multimodal model's is under text_config)."""
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = rows
    else:
        config["vocab_size"] = rows


def _model_dir(ex: Model) -> Path | None:
    return ex.path if isinstance(ex, LoraAdapter) else ex.model_dir


def _rows(ex: Model, names: list[str]) -> int | None:
    """The row count of the expert's own vocabulary tensors (None: it stores none, e.g. an adapter)."""
    for n in names:
        if n in ex.entries:
            return ex.entries[n].shape[0]
    return None


def _why(experts: list[Model], names: list[str], base_rows: int, source: str) -> str:
    """Why vocabularies are matched by token: the first expert whose row count differs, or the option."""
    for i, ex in enumerate(experts):
        rows = _rows(ex, names)
        if rows not in (None, base_rows):
            return f"expert {i} ({ex.path}) has {rows} vocabulary rows, the base has {base_rows}"
    return f"tokenizer_source {source}"


def _tokenizer(transformers: Any, directory: Path | None, model: Model, who: str, why: str,
               required: bool = True) -> Any:
    """The model's tokenizer from its directory (never the network); None when it has none and may share the
    base's."""
    if directory is None or not any((directory / f).is_file() for f in TOKENIZER_FILES):
        if not required:
            return None
        raise InputError(f"{why}: matching rows by token needs {who}'s tokenizer, and it has no tokenizer files",
                         path=model.path,
                         hint="put the tokenizer it was trained with (tokenizer.json, tokenizer_config.json) "
                              "beside its weights")
    from .calib import refuse_remote_code
    refuse_remote_code(directory)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        raise InputError(f"cannot load {who}'s tokenizer: {type(e).__name__}: {e}".split("\n")[0], path=directory,
                         hint="check its tokenizer files (tokenizer.json, tokenizer_config.json)") from None


def _output_tokenizer(transformers: Any, source: str, base_tok: Any, toks: list[Any], base_rows: int,
                      experts: list[Model], names: list[str]) -> tuple[Any, int]:
    """The output tokenizer (a fresh object) and the output row count."""
    if source in SOURCES:
        out = _copy(transformers, base_tok)
        if source == "union":
            _add_union(out, toks)
        return out, max(base_rows, len(out))
    directory = resolve(source)
    if not directory.is_dir():
        raise ConfigError(f"tokenizer_source {source!r} is neither base, union nor a model directory",
                          hint="use base, union, or the directory of a model whose tokenizer to use")
    out = _tokenizer(transformers, directory, Checkpoint(directory, {}, [], directory, None), "tokenizer_source",
                     f"tokenizer_source {source}")
    rows = len(out)
    for ex in experts:                          # one of the inputs: keep its row count (padding rows included)
        if _model_dir(ex) is not None and _model_dir(ex).resolve() == directory.resolve():
            rows = max(rows, _rows(ex, names) or 0)
    return out, rows


def _copy(transformers: Any, tok: Any) -> Any:
    """A tokenizer to change without touching ``tok`` (saved and loaded again, as transformers has no copy)."""
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)


def _add_union(out: Any, toks: list[Any]) -> None:
    """Every token an expert has and ``out`` lacks, in the experts' order and each one's id order; added tokens keep
    their settings (special, strip, normalized)."""
    for tok in toks:
        have = out.get_vocab()
        decoder = tok.added_tokens_decoder
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if token in have:
                continue
            info = decoder.get(idx)
            if info is not None:
                out.add_tokens([info], special_tokens=bool(info.special))
            else:
                out.add_tokens([token])
            have = out.get_vocab()


def _chat_template(toks: list[Any], out_tok: Any, source: str) -> str | None:
    """The output tokenizer's own template for a model source; else the most common among the models' (ties: the
    first, the base before the experts), as mergekit's "auto"."""
    if source not in SOURCES and out_tok.chat_template:
        return out_tok.chat_template
    templates = [t.chat_template for t in toks if isinstance(t.chat_template, str) and t.chat_template]
    if not templates:
        return None
    counts = Counter(templates)
    return max(templates, key=lambda t: (counts[t], -templates.index(t)))


def _row_map(by_id: dict[int, str], vocab: dict[str, int], out_rows: int, rows: int) -> torch.Tensor:
    """Source row per output row: the model's row of that token; for an output row with no token (padding), the
    same row when the model has it and no token there; else −1."""
    src = [-1] * out_rows                       # a list: 150k-token vocabularies, one lookup per row
    own = set(vocab.values())
    for i in range(out_rows):
        token = by_id.get(i)
        if token is not None:
            j = vocab.get(token)
            if j is not None and j < rows:
                src[i] = j
        elif i < rows and i not in own:
            src[i] = i
    return torch.tensor(src, dtype=torch.int64)


def _attach(base: Checkpoint, experts: list[Model], vocab: Vocabulary, base_vocab: dict[str, int]) -> None:
    """Make every model read its vocabulary tensors in the output vocabulary (``AlignedRows``)."""
    token_rows = torch.tensor(sorted(i for i in base_vocab.values() if i < vocab.base_rows))
    for name in vocab.tensors:
        entry = base.entries[name]
        mean = _mean_row(base, name, entry, token_rows)
        base.aligned[name] = AlignedRows(name, entry, vocab.maps[0], base.read_raw,
                                         lambda r0, r1, m=mean: m.expand((r1 - r0,) + m.shape[1:]))
        base.entries[name] = base.aligned[name].entry
    for i, ex in enumerate(experts):
        src = vocab.maps[i + 1]
        for name in vocab.tensors:
            if isinstance(ex, LoraAdapter) and name in ex.lora:
                if len(src) != vocab.base_rows or not _identity(src):
                    raise InputError("LoRA factors on a vocabulary tensor, with a vocabulary other than the output's",
                                     path=ex.path, tensor=name, hint="merge this adapter with PEFT's "
                                     "merge_and_unload first, or use --tokenizer-source base")
                continue
            entry = ex.entries.get(name)
            if entry is None or (len(src) == entry.shape[0] and _identity(src)):
                continue                                  # Δ = 0, or rows already in the output order
            dtype = entry.dtype if entry.dtype == base.entries[name].dtype else torch.float32
            ex.aligned[name] = AlignedRows(name, entry, src, ex.read_raw,
                                           lambda r0, r1, n=name: base.read(n, (r0, r1)), dtype)
            ex.entries[name] = ex.aligned[name].entry


def _identity(src: torch.Tensor) -> bool:
    return bool((src == torch.arange(len(src))).all())


def _mean_row(base: Checkpoint, name: str, entry: TensorEntry, token_rows: torch.Tensor) -> torch.Tensor:
    """The mean of the base's rows that hold a token, in fp64 over row chunks, as a (1, dim) row of its dtype."""
    total = torch.zeros(entry.shape[1:], dtype=torch.float64)
    step = max(1, MEAN_CHUNK_BYTES // max(1, entry.nbytes // entry.shape[0]))
    for r0 in range(0, entry.shape[0], step):
        r1 = min(r0 + step, entry.shape[0])
        sel = token_rows[(token_rows >= r0) & (token_rows < r1)] - r0
        if len(sel):
            total += base.read_raw(name, (r0, r1)).index_select(0, sel).double().sum(0)
    return (total / max(1, len(token_rows))).to(entry.dtype).unsqueeze(0)


class AlignedRows:
    """One model's vocabulary tensor read in the output vocabulary: source rows run by run, ``fill(r0, r1)`` where
    the model lacks the token."""

    def __init__(self, name: str, entry: TensorEntry, src: torch.Tensor, read_raw: Callable,
                 fill: Callable[[int, int], torch.Tensor], dtype: torch.dtype | None = None) -> None:
        dtype = dtype or entry.dtype
        self.name = name
        row_elems = entry.nbytes // entry.dtype.itemsize // entry.shape[0]
        self.source = entry
        self.entry = replace(entry, dtype=dtype, shape=(len(src),) + entry.shape[1:],
                             nbytes=len(src) * row_elems * dtype.itemsize)
        self.src = src
        self.read_raw = read_raw
        self.fill = fill

    def read(self, rows: tuple[int, int] | None, alloc: Callable[[int], torch.Tensor] | None) -> torch.Tensor:
        r0, r1 = rows or (0, len(self.src))
        e = self.entry
        nbytes = e.nbytes // e.shape[0] * (r1 - r0)
        buf = alloc(nbytes) if alloc else torch.empty(nbytes, dtype=torch.uint8)
        out = buf.view(e.dtype).view((r1 - r0,) + e.shape[1:])
        for a, b, s in _runs(self.src[r0:r1]):
            if s < 0:
                out[a:b].copy_(self.fill(r0 + a, r0 + b))
            elif self.source.dtype == e.dtype:         # straight into the caller's buffer
                part = out[a:b]
                got = self.read_raw(self.name, (s, s + b - a),
                                    lambda n, p=part: p.view(-1).view(torch.uint8)[:n])
                if got.data_ptr() != part.data_ptr():
                    part.copy_(got)
            else:
                out[a:b].copy_(self.read_raw(self.name, (s, s + b - a)))
        return out


def _runs(src: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, first source row) of each run of consecutive source rows; runs of −1 have source −1."""
    n = len(src)
    if n == 0:
        return []
    missing = src < 0
    brk = torch.ones(n, dtype=torch.bool)
    brk[1:] = (missing[1:] != missing[:-1]) | (~missing[1:] & (src[1:] != src[:-1] + 1))
    starts = brk.nonzero().flatten().tolist() + [n]
    return [(a, b, int(src[a]) if src[a] >= 0 else -1) for a, b in zip(starts[:-1], starts[1:])]
