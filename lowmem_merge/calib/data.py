"""Calibration examples: one file per expert (its own task's text), tokenized with the base's tokenizer.

A file is plain text (one example per line) or JSONL with a ``text`` field per line. Examples are cut at
``seq_len`` tokens and padded to it on the right; like the RegMean references, padding positions count in the
Grams (their hidden states are real model outputs), and the attention mask keeps them out of attention.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, InputError
from ..io.text_files import require_regular
from . import refuse_remote_code, require_transformers

DEFAULT_SAMPLES = 256
DEFAULT_SEQ_LEN = 128
BATCH = 16
CHARS_PER_TOKEN = 32   # an example is cut to seq_len * this many characters before tokenizing: more than enough


@dataclass
class Batch:
    input_ids: torch.Tensor        # (B, L) int64
    attention_mask: torch.Tensor   # (B, L) int64, 0 on padding


def read_examples(path: Path, limit: int, max_chars: int | None = None) -> list[str]:
    """Up to ``limit`` non-empty examples of ``path`` in file order, each cut to ``max_chars`` characters (a few
    times what ``seq_len`` tokens need, so that one huge line is never tokenized whole); the file is read line by
    line, only as far as needed."""
    require_regular(path, "calibration file", InputError)
    try:
        with open(path, encoding="utf-8") as f:
            examples = _examples(f, path, limit, max_chars)
    except OSError as e:
        raise InputError(f"cannot read the calibration file: {e.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise InputError("the calibration file is not UTF-8 text", path=path,
                         hint="give plain text (one example per line) or JSONL with a 'text' field") from None
    if not examples:
        raise InputError("the calibration file holds no examples", path=path,
                         hint="one example per line (or JSONL with a 'text' field)")
    return examples


def _examples(lines: Iterable[str], path: Path, limit: int, max_chars: int | None) -> list[str]:
    jsonl = path.suffix in (".jsonl", ".json")
    examples: list[str] = []
    for number, line in enumerate(lines, 1):
        if len(examples) == limit:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        text = _json_text(line, number, path) if jsonl else line
        examples.append(text[:max_chars])
    return examples


def _json_text(line: str, number: int, path: Path) -> str:
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InputError(f"line {number} is not a JSON object with a 'text' field", path=path,
                         hint='JSONL calibration files hold one {"text": "..."} per line') from None
    if not isinstance(text, str):
        raise InputError(f"line {number}: 'text' is not a string", path=path,
                         hint='JSONL calibration files hold one {"text": "..."} per line')
    return text


def load_tokenizer(model_dir: Path | None):
    """The base model's tokenizer (transformers), with a pad token (EOS when it has none)."""
    auto_tokenizer = require_transformers().AutoTokenizer
    if model_dir is None:
        raise InputError("calibrated merges need the base as a model directory with its tokenizer")
    refuse_remote_code(Path(model_dir))
    try:
        tok = auto_tokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the base's tokenizer: {str(e).splitlines()[0]}", path=model_dir,
                         hint="calibration text is tokenized with the base's tokenizer: put its files "
                              "(tokenizer.json, tokenizer_config.json, ...) beside the base's weights") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError("the base's tokenizer has neither a pad nor an EOS token", path=model_dir,
                             hint="set pad_token in tokenizer_config.json")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def tokenize(tokenizer, examples: list[str], seq_len: int, batch: int = BATCH) -> list[Batch]:
    """Batches of ``batch`` examples, each cut and padded to ``seq_len`` tokens."""
    out = []
    for i in range(0, len(examples), batch):
        enc = tokenizer(examples[i:i + batch], max_length=seq_len, truncation=True, padding="max_length",
                        return_tensors="pt")
        out.append(Batch(enc["input_ids"].long(), enc["attention_mask"].long()))
    return out


def load_calibration(model_dir: Path | None, files: list[Path], samples: int, seq_len: int) -> list[list[Batch]]:
    """Each expert's batches, from its own file."""
    if samples < 1 or seq_len < 1:
        raise ConfigError("--calib-samples and --calib-seq-len must be at least 1")
    tokenizer = load_tokenizer(model_dir)
    return [tokenize(tokenizer, read_examples(Path(f), samples, seq_len * CHARS_PER_TOKEN), seq_len) for f in files]
