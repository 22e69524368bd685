"""Layer stacking, mergekit's ``passthrough`` with ``slices``: a model made of layer ranges of other models.

Nothing is merged, every tensor is copied (cast to ``dtype`` if given) one at a time: the embeddings and every
other tensor before the layers come from the first slice's model, the final norm and head from the last slice's
(as mergekit plans them), output layer i from its source layer. The output may be deeper or shallower than its
sources: config.json (the first slice's model's) gets the new layer count, and ``layer_types`` where it has them.
Slices must come from models of one architecture and width; each layer's tensors must match the first's.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import peak_rss_bytes
from .errors import ConfigError, InputError
from .io.checkpoint import Checkpoint, input_paths, open_checkpoint
from .io.outdir import check_apart
from .io.writer import ShardWriter, copy_new, plan_shards, write_new
from .names import is_input_embedding, split_layer
from .output import COPIED_FILES, claim_output, describe_checkpoint, parse_dtype, produce
from .report import CARD_NAME, REPORT_NAME, Report, now_utc, versions
from .sizes import parse_size

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Slice:
    """Layers [start, end) of ``model`` (end None: to its last layer)."""
    model: str
    start: int = 0
    end: int | None = None


def stack(slices: Sequence[Slice], out: str | Path, *, dtype: str = "auto", shard_size: str | int = "4GB",
          resume: bool = False, force: bool = False,
          progress: Callable[[int, int], None] | None = None) -> Report:
    t_start = time.perf_counter()
    if not slices:
        raise ConfigError("passthrough needs at least one slice")
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size, "--shard-size")
    with contextlib.ExitStack() as stack_:
        models = _open_models(stack_, slices)
        layers = {m: _layers(ck) for m, ck in models.items()}
        sources, slices = _sources(slices, models, layers)
        specs = [(name, out_dtype if (out_dtype and ck.entries[src].is_float) else ck.entries[src].dtype,
                  ck.entries[src].shape) for name, ck, src in sources]
        shards = plan_shards(specs, shard_bytes)
        first = models[slices[0].model]
        extra = [n for n in COPIED_FILES if first.model_dir and (first.model_dir / n).is_file()]
        fingerprint = {"method": "passthrough", "slices": [[s.model, s.start, s.end] for s in slices],
                       "inputs": {m: [[f.path, f.size, f.mtime_ns, f.header_sha256, f.sample_sha256] for f in ck.files]
                                  for m, ck in models.items()},
                       "dtype": dtype, "shard_size": shard_bytes, "lowmerge": versions()["lowmerge"]}
        check_apart(out, [p for ck in models.values() for p in input_paths(ck)])
        files = [s.name for s in shards] + extra + [REPORT_NAME, CARD_NAME]
        outdir = claim_output(stack_, out, fingerprint, [s.name for s in shards] + (
            ["model.safetensors.index.json"] if len(shards) > 1 else []) + extra + [REPORT_NAME, CARD_NAME],
            resume=resume, force=force)
        n_layers = sum(s.end - s.start for s in slices)

        def side_files(path: Path) -> None:
            _write_config(first, [models[s.model] for s in slices], slices, n_layers, out_dtype, path)
            for name in extra:
                if name != "config.json":
                    copy_new(first.model_dir / name, path / name)

        def report(done: int) -> dict:
            return {
                "lowmerge_version": versions()["lowmerge"], "created": now_utc(), "method": "passthrough",
                "params": {"slices": [f"{s.model}[{s.start}:{s.end}]" for s in slices]},
                "inputs": {"base": describe_checkpoint(first),
                           "experts": [describe_checkpoint(models[s.model]) for s in slices]},
                "output": {"dir": str(outdir.path), "dtype": dtype if out_dtype else "base", "tensors": len(sources),
                           "layers": n_layers, "shards": [s.name for s in shards],
                           "bytes": sum(s.size for s in shards), "resumed_shards": sorted(outdir.done_shards)},
                "bytes_read": done, "timings_s": {"total": time.perf_counter() - t_start},
                "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": 0},
                "warnings": [], "tensor_stats": {}, "versions": versions(), "files": files,
            }
        return produce(outdir, shards, lambda writer: _copy_tensors(writer, sources, out_dtype, progress),
                       side_files, report)


def _open_models(stack_: contextlib.ExitStack, slices: Sequence[Slice]) -> dict[str, Checkpoint]:
    models: dict[str, Checkpoint] = {}
    for s in slices:
        if s.model not in models:
            ck = stack_.enter_context(open_checkpoint(s.model))
            if not isinstance(ck, Checkpoint):
                raise InputError("a LoRA adapter cannot be a slice's model", path=s.model,
                                 hint="merge it into its base first")
            models[s.model] = ck
    return models


def _copy_tensors(writer: ShardWriter, sources: list, out_dtype: torch.dtype | None,
                  progress: Callable[[int, int], None] | None) -> int:
    """Every source tensor not in a finished shard, cast and written in order; returns the bytes read."""
    todo = [x for x in sources if writer.needed(x[0])]
    total, done = sum(x[1].entries[x[2]].nbytes for x in todo), 0
    for name, ck, src in todo:
        t = ck.read(src)
        done += t.nbytes
        writer.write(name, t.to(out_dtype) if out_dtype and t.is_floating_point() else t)
        if progress:
            progress(done, total)
    return done


def _layers(ck: Checkpoint) -> tuple[str | None, dict[int, list[str]]]:
    """(the layers' name prefix, layer index -> the names inside it, in file order)."""
    prefix, found = None, {}
    for entry in sorted(ck.entries.values(), key=lambda e: (str(e.path), e.offset)):
        split = split_layer(entry.name)
        if split is None:
            continue
        if prefix not in (None, split.prefix):
            raise InputError(f"two layer stacks ({prefix} and {split.prefix})", path=ck.path, tensor=entry.name,
                             hint="passthrough supports models with one stack of repeated layers")
        prefix = split.prefix
        found.setdefault(split.index, []).append(split.rest)
    return prefix, found


def _sources(slices: Sequence[Slice], models: dict[str, Checkpoint],
             layers: dict[str, tuple[str | None, dict[int, list[str]]]]) -> tuple[list, list[Slice]]:
    """(output name, checkpoint, source name) for every output tensor, in output order, and the slices with their
    ends resolved; checks ranges and shapes."""
    first, last = slices[0].model, slices[-1].model
    prefix = layers[first][0]
    if prefix is None:
        raise InputError("no repeated layers found (names like model.layers.N....)", path=first)
    reference = None
    out: list[tuple[str, Checkpoint, str]] = []
    outside = [n for n in _file_order(models[first]) if is_input_embedding(n)]
    out += [(n, models[first], n) for n in outside]
    index = 0
    resolved = []
    for s in slices:
        p, found = layers[s.model]
        count = 1 + max(found) if found else 0
        s = Slice(s.model, s.start, count if s.end is None else s.end)
        resolved.append(s)
        if not 0 <= s.start < s.end <= count:
            raise ConfigError(f"layer_range [{s.start}, {s.end}] is outside the model's {count} layers",
                              path=s.model, hint="layer_range is [first, end) with 0 <= first < end <= layers")
        if p != prefix:
            raise InputError(f"its layers are named {p}.N, the first slice's model's {prefix}.N", path=s.model,
                             hint="every slice must come from a model of the same architecture")
        ck = models[s.model]
        for j in range(s.start, s.end):
            shapes = {rest: ck.entries[f"{p}.{j}.{rest}"].shape for rest in found.get(j, [])}
            if reference is None:
                reference = shapes
            elif shapes != reference:
                odd = sorted(set(shapes.items()) ^ set(reference.items()))[0][0]
                raise InputError("layer differs from the first slice's first layer (a missing tensor or another "
                                 "shape)", path=s.model, tensor=f"{p}.{j}.{odd}",
                                 hint="every slice must come from a model of the same architecture and width")
            out += [(f"{prefix}.{index}.{rest}", ck, f"{p}.{j}.{rest}") for rest in found.get(j, [])]
            index += 1
    after = [n for n in _file_order(models[last]) if split_layer(n) is None and not is_input_embedding(n)]
    out += [(n, models[last], n) for n in after]
    return out, resolved


def _file_order(ck: Checkpoint) -> list[str]:
    return [e.name for e in sorted(ck.entries.values(), key=lambda e: (str(e.path), e.offset))]


def _write_config(first: Checkpoint, per_slice: list[Checkpoint], slices: Sequence[Slice], n_layers: int,
                  out_dtype: torch.dtype | None, out: Path) -> None:
    """The first model's config.json with the new depth (and per-layer lists such as layer_types re-cut)."""
    if not (first.model_dir and (first.model_dir / "config.json").is_file()):
        return
    cfg = json.loads((first.model_dir / "config.json").read_text())
    for key in LAYER_KEYS:
        if key in cfg:
            cfg[key] = n_layers
    if isinstance(cfg.get("layer_types"), list):
        types = []
        for ck, s in zip(per_slice, slices):
            theirs = (ck.config or {}).get("layer_types") or []
            types += theirs[s.start:s.end] if len(theirs) >= s.end else [cfg["layer_types"][0]] * (s.end - s.start)
        cfg["layer_types"] = types
    if out_dtype is not None:
        cfg["dtype" if "dtype" in cfg else "torch_dtype"] = str(out_dtype).removeprefix("torch.")
    write_new(out / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
