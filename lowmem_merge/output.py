"""The output directory's one way through: claim it, write the shards (aborted on any failure, so nothing is left
looking complete), then the side files, the report and the finishing renames. Shared by merge and stack."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import ConfigError
from .io.outdir import OutputDir
from .io.writer import Shard, ShardWriter, output_error
from .report import Report, write_report

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "preprocessor_config.json")


def parse_dtype(dtype: str) -> torch.dtype | None:
    """``--dtype``: None for auto (each tensor keeps its input dtype)."""
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def claim_output(stack: contextlib.ExitStack, out: str | Path, fingerprint: dict, files: list[str], *,
                 resume: bool, force: bool) -> OutputDir:
    """Open OUT (held until ``stack`` closes) and claim every name the finished output will have."""
    outdir = stack.enter_context(OutputDir(out, fingerprint, resume=resume, force=force))
    outdir.claim(files)
    return outdir


def write_shards(outdir: OutputDir, shards: list[Shard], write: Callable[[ShardWriter], T],
                 release: Callable[[torch.Tensor], None] | None = None) -> T:
    """``write(writer)`` fills ``shards`` in ``outdir``; any failure aborts the writer (partial names only)."""
    writer = ShardWriter(outdir.path, shards, outdir.done_shards, outdir.record_shard, release=release)
    try:
        result = write(writer)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return result


def publish(outdir: OutputDir, shards: list[Shard], side_files: Callable[[Path], None],
            report: Callable[[], dict]) -> Report:
    """Side files, then the report (which says the output is done), then the shards' final names."""
    try:
        side_files(outdir.path)
        written = write_report(outdir.path, report())
        outdir.finish(shards)
    except OSError as e:
        raise output_error(e, outdir.path) from None
    return written


def produce(outdir: OutputDir, shards: list[Shard], write: Callable[[ShardWriter], T],
            side_files: Callable[[Path], None], report: Callable[[T], dict],
            release: Callable[[torch.Tensor], None] | None = None) -> Report:
    """A claimed output in one process: the shards, then side files, report and finish."""
    result = write_shards(outdir, shards, write, release)
    return publish(outdir, shards, side_files, lambda: report(result))


def describe_checkpoint(ck: Any) -> dict:
    """An input as the report names it: its path and each file's size and header hash."""
    return {"path": str(ck.path), "files": [{"path": f.path, "size": f.size, "header_sha256": f.header_sha256}
                                           for f in ck.files]}
