"""The Python API: ``merge(base, experts, out, method=..., **params) -> Report``. The CLI is a thin layer on it."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from . import distributed
from .calib.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from .budget import choose_strategy, device_budget
from .device import BufferPool, peak_device_bytes, peak_rss_bytes, resolve_device, tune_malloc
from .errors import ConfigError, LowmergeError
from .info import TensorClass, TensorInfo
from .io.checkpoint import input_paths, open_checkpoint
from .io.hub import resolve
from .io.outdir import OutputDir, check_apart
from .io.reader import INDEX_NAME, SINGLE_NAME
from .io.writer import Shard, ShardWriter, copy_new, output_error, plan_shards, write_new
from .methods import DEFAULT_METHOD, MergeMethod, get_method, params_dict, parse_params
from .plan import RECIPE_NOTE, VOCAB_UNION, Expert, Plan, PlanWarning, make_plan
from .quantize import Quantizer
from .report import CARD_NAME, REPORT_NAME, Report, now_utc, versions, write_report
from .schedule import Schedule
from .sizes import parse_size
from .vocab import SOURCES, TOKENIZER_FILES, align, set_vocab_size
from .stream import (Piece, StreamContext, prepass_rounds, read_volume, run_merge, run_prepass, stream_volume,
                     tensor_groups)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                "added_tokens.json", "chat_template.jinja", "preprocessor_config.json")


def merge(base: str | Path, experts: Sequence[str | Path], out: str | Path, method: str | None = None, *,
          device: str = "auto", dtype: str = "auto", shard_size: str | int = "4GB",
          max_memory: str | int | None = None, max_device_memory: str | int | None = None,
          resume: bool = False, force: bool = False, quantize: str | None = None,
          progress: Callable[[int, int], None] | None = None, schedule: Schedule | None = None,
          calib: Sequence[str | Path] | None = None, calib_samples: int = DEFAULT_SAMPLES,
          calib_seq_len: int = DEFAULT_SEQ_LEN, tokenizer_source: str | None = None,
          output_format: str = "model", adapter_rank: int | None = None, notes: Sequence[str] = (),
          **params: Any) -> Report | None:
    """Merge ``experts`` (fine-tunes of ``base``, or LoRA adapters of it) into ``out``.

    Options are those of ``lowmerge merge --help``; ``params`` are the method's (``lowmerge methods``).
    ``quantize`` (int8 or nf4) writes linear weights in bitsandbytes' format (``quantize.py``).
    ``progress(done_bytes, total_bytes)`` is called as inputs are consumed.
    ``schedule`` (a recipe's gradients and filters) gives each tensor its own parameters.
    ``calib``: one calibration file per expert, for the rules that need data (regmean, chain): up to
    ``calib_samples`` examples of ``calib_seq_len`` tokens each (``lowmem_merge.calib``).
    ``tokenizer_source`` (base, union or a model directory) gives the output vocabulary; experts' token rows are
    matched to it by token (``vocab.py``). None: the base's vocabulary, or the union when an expert's differs.
    ``notes`` go to the report's warnings (a base-less recipe's reference model).
    Started by torchrun (WORLD_SIZE > 1), each rank merges its share of the tensors (``distributed.py``); rank 0
    returns the report, the other ranks None.
    ``output_format`` "peft" (every expert a LoRA adapter) writes one merged PEFT adapter instead, with factors of
    rank ``adapter_rank`` where the rule's Δ* must be truncated (``adapter_out.py``).
    """
    t_start = time.perf_counter()
    _prepare_process()
    if output_format == "peft":
        from .adapter_out import merge_adapter
        return merge_adapter(base, experts, out, method or DEFAULT_METHOD, params=params, adapter_rank=adapter_rank,
                             device=device, dtype=dtype, force=force, progress=progress, quantize=quantize,
                             calib=calib, schedule=schedule, tokenizer_source=tokenizer_source, resume=resume,
                             max_memory=max_memory, max_device_memory=max_device_memory)
    method_cls = get_method(method or DEFAULT_METHOD)
    parsed = parse_params(method_cls, params)
    method_cls.check_experts(parsed, len(experts))
    _check_calib(method_cls, calib, len(experts))
    dist = distributed.from_env()
    if dist is not None and method_cls.calibration:
        raise ConfigError(f"{method_cls.name} walks the model layer by layer in one process: it cannot run under "
                          "torchrun", hint="run it as a plain `lowmerge merge`")
    dev = resolve_device(device)
    if dist is not None and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    out_dtype = _parse_dtype(dtype)
    shard_bytes = parse_size(shard_size, "--shard-size")
    if dist is not None:
        distributed.init(dist, dev)
    with contextlib.ExitStack() as stack:
        if dist is not None:
            stack.callback(dist.close)
        base_ck = stack.enter_context(open_checkpoint(base))
        expert_cks = [stack.enter_context(open_checkpoint(e)) for e in experts]
        check_apart(out, _inputs([base_ck, *expert_cks], calib, tokenizer_source))
        vocab = align(base_ck, expert_cks, tokenizer_source)
        if vocab is not None:
            stack.callback(shutil.rmtree, vocab.files_dir, True)
            if method_cls.calibration:
                raise ConfigError(f"{method_cls.name} cannot merge experts of other vocabularies",
                                  hint="resize the experts to the base's vocabulary, or use a data-free rule")
        plan = make_plan(base_ck, expert_cks, out_dtype)
        plan.vocab = vocab
        plan.warnings.extend(PlanWarning(RECIPE_NOTE, note) for note in notes)
        if vocab is not None and tokenizer_source is None:
            plan.warnings.append(PlanWarning(VOCAB_UNION, f"the experts' vocabularies differ from the base's: merged "
                                             f"over their union ({vocab.rows} rows, the base has {vocab.base_rows}); "
                                             "--tokenizer-source base keeps the base's", rows=vocab.rows,
                                             base_rows=vocab.base_rows))
        walker = None
        if method_cls.calibration:
            walker = _calibration(plan, method_cls, parsed, calib, calib_samples, calib_seq_len, dev)
            plan.tensors = walker.order(plan.tensors)
        quantizer = _quantizer(plan, quantize, dev)
        strategy = choose_strategy(
            plan, method_cls, parsed, None if max_memory is None else
            parse_size(max_memory, "--max-memory") - (quantizer.extra_bytes() if quantizer else 0),
            device_budget(dev, None if max_device_memory is None else parse_size(max_device_memory,
                                                                                  "--max-device-memory")))
        timings = {"plan": time.perf_counter() - t_start}
        fingerprint = {**_fingerprint(plan, method_cls.name, parsed, dtype, dev, shard_bytes),
                       "chunk_elems": strategy.chunk_elems, "quantize": quantize,
                       **({"world_size": dist.world} if dist else {}),
                       **({"schedule": schedule.describe()} if schedule else {}),
                       **({"calib": _calib_fingerprint(calib, calib_samples, calib_seq_len)} if walker else {}),
                       **({"vocabulary": vocab.describe()} if vocab else {})}
        world, rank = (dist.world, dist.rank) if dist else (1, 0)
        owner = _owners(plan, method_cls, parsed, strategy.pieces, world)
        pieces = [p for p in strategy.pieces if owner[p.target] == rank]
        by_rank = _rank_shards(plan, quantizer, owner, world, shard_bytes)
        shards = [s for r in by_rank for s in r]
        final = [s.name for s in shards] + ([INDEX_NAME] if len(shards) > 1 else []) + _extra_files(plan)
        outdir = work = None
        if dist is None:
            outdir = work = stack.enter_context(OutputDir(out, fingerprint, resume=resume, force=force))
            outdir.claim(final + [REPORT_NAME, CARD_NAME])
        else:
            error = None
            if dist.is_main:
                try:
                    outdir = stack.enter_context(OutputDir(out, fingerprint, resume=resume, force=force))
                    outdir.claim(final + [REPORT_NAME, CARD_NAME])
                except LowmergeError as e:
                    error = e
            dist.sync(error)                           # nobody writes unless rank 0 may use the directory
            work = stack.enter_context(_rank_dir(Path(out), rank, fingerprint, resume))
        resumed = sorted(work.done_shards)            # kept from the interrupted run; the writer adds to it
        pool = BufferPool(limit=strategy.prefetch_bytes, pin=dev.type == "cuda")
        ctx = StreamContext(plan, method_cls, parsed, dev, lambda n: None, pool,
                            strategy.prefetch_bytes, strategy.cpu_tensors, dist.all_reduce if dist else None,
                            _params_for(plan, method_cls, schedule) if schedule else None, walker)
        if dist is None:
            stats, bytes_read = _stream(ctx, pieces, work, by_rank[0], timings, progress, quantizer)
            ranks = None
        else:
            ranks = _stream_rank(dist, ctx, pieces, work, by_rank[rank], timings, progress, quantizer, resumed)
            if not dist.is_main:
                return None
            _collect_rank_shards(Path(out), by_rank)
            stats = {k: v for r in ranks for k, v in r["tensor_stats"].items()}
            bytes_read = sum(r["bytes_read"] for r in ranks)
            resumed = sorted(n for r in ranks for n in r["resumed_shards"])
        try:
            _write_heads(plan, outdir.path)
            _copy_base_files(plan, outdir.path, out_dtype, quantizer.config() if quantizer else None)
            data = {
                "lowmerge_version": versions()["lowmerge"], "created": now_utc(),
                "method": method_cls.name, "params": params_dict(parsed),
                "inputs": {"base": _describe(base_ck), "experts": [_describe(e) for e in expert_cks]},
                "output": {"dir": str(outdir.path), "dtype": dtype if out_dtype else "base",
                           "tensors": len(plan.tensors), "shards": [s.name for s in shards],
                           "bytes": sum(s.size for s in shards), "resumed_shards": resumed,
                           "quantize": quantize, "quantized_tensors": len(quantizer.targets) if quantizer else 0},
                "device": str(dev), "threads": torch.get_num_threads(), "bytes_read": bytes_read,
                "strategy": strategy.describe(),
                "timings_s": {**timings, "total": time.perf_counter() - t_start},
                "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(dev)},
                "heads": {str(e.path): names for e, names in zip(expert_cks, plan.heads) if names},
                "warnings": plan.warnings, "tensor_stats": stats,
                **({"vocabulary": vocab.describe()} if vocab else {}), "versions": versions(),
                "files": final + [REPORT_NAME, CARD_NAME],
            }
            if ranks is not None:
                data["distributed"] = {"world_size": world, "ranks": [{k: v for k, v in r.items()
                                                                       if k != "tensor_stats"} for r in ranks]}
            report = write_report(outdir.path, data)
            outdir.finish(shards)
            if dist is not None:
                for r in range(world):
                    shutil.rmtree(Path(out) / distributed.RANK_DIR.format(r), ignore_errors=True)
        except OSError as e:
            raise output_error(e, outdir.path) from None
        return report


def _inputs(cks: list, calib: Sequence[str | Path] | None, tokenizer_source: str | None) -> list[Path]:
    """Every path the merge reads: the models' files, the calibration files, a tokenizer source directory."""
    paths = [p for ck in cks for p in input_paths(ck)] + [Path(f) for f in calib or []]
    if tokenizer_source is not None and tokenizer_source not in SOURCES:
        paths.append(resolve(tokenizer_source))
    return paths


def _check_calib(method: type[MergeMethod], calib: Sequence | None, n_experts: int) -> None:
    if method.calibration and not calib:
        raise ConfigError(f"{method.name} needs calibration data: --calib FILE once per expert, in the experts' order",
                          hint="each expert's own task text, one example per line (or JSONL with a 'text' field)")
    if method.calibration and len(calib) != n_experts:
        raise ConfigError(f"{method.name}: {len(calib)} --calib files for {n_experts} experts",
                          hint="give one calibration file per expert (its own task's data), in the experts' order")
    if calib and not method.calibration:
        raise ConfigError(f"{method.name} is data-free: --calib is not used", hint="drop --calib, or use regmean "
                          "or chain")


def _calibration(plan: Plan, method: type[MergeMethod], params: Any, calib: Sequence, samples: int, seq_len: int,
                 dev: torch.device) -> Any:
    from .calib.data import load_calibration
    from .calib.walker import Calibration
    batches = load_calibration(plan.base.model_dir, [Path(f) for f in calib], samples, seq_len)
    return Calibration(plan, method, params, batches, dev)


def _calib_fingerprint(calib: Sequence, samples: int, seq_len: int) -> dict:
    """What a resumed calibrated merge must match: the files (by content) and how much of them was used."""
    return {"files": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in calib], "samples": samples,
            "seq_len": seq_len}


def _params_for(plan: Plan, method: type[MergeMethod], schedule: Schedule) -> Callable[[TensorInfo], Any]:
    """Each tensor's parameters from the schedule, at mergekit's t for its layer (parsed once per distinct set)."""
    n_layers = 1 + max((t.layer for t in plan.tensors if t.layer is not None), default=0)
    parsed: dict[str, Any] = {}

    def params_for(info: TensorInfo) -> Any:
        raw = schedule.for_tensor(info.name, info.layer, n_layers)
        key = repr(sorted(raw.items()))
        if key not in parsed:
            parsed[key] = parse_params(method, raw)
        return parsed[key]
    return params_for


def _owners(plan: Plan, method: type[MergeMethod], params: Any, pieces: list[Piece], world: int) -> dict[str, int]:
    """Which rank writes each output tensor (every one is rank 0's in a single process).

    Whole tensors, never row chunks of one (a per-tensor prepass sees all of a tensor), balanced by an estimate of
    each tensor's time: its bytes read over every pass and prepass round at 1 GB/s, plus for a rule that solves a
    matrix problem per LIN tensor (one that is not row-chunkable there) n_experts · 2·m·n·min(m, n) FLOPs at
    100 GFLOP/s: a Gram or an SVD per expert dominates those rules.
    """
    groups = tensor_groups(pieces)
    if world == 1:
        return {g[0].target: 0 for g in groups}
    reads = (method.passes_for(params) + prepass_rounds(method, params, "model")
             + prepass_rounds(method, params, "tensor"))
    costs = []
    for group in groups:
        info = group[0].info
        cost = read_volume(plan, group, reads) / 1e9
        if info.cls == TensorClass.LIN and not method.row_chunkable(params, info) and len(info.shape) >= 2:
            m, n = info.shape[-2:]
            cost += plan.n_experts * 2 * m * n * min(m, n) * (info.numel // (m * n)) / 1e11
        costs.append(cost)
    owner = distributed.partition(costs, world)
    return {g[0].target: r for g, r in zip(groups, owner)}


def _rank_shards(plan: Plan, quantizer: Quantizer | None, owner: dict[str, int], world: int,
                 shard_bytes: int) -> list[list[Shard]]:
    """Each rank's shards (its tensors in plan order), named in one sequence over all ranks."""
    per_rank: list[list] = [[] for _ in range(world)]
    for i in plan.tensors:
        spec = (i.name, plan.out_dtype[i.name], plan.entry(i.name).shape)
        per_rank[owner[i.name]].extend(quantizer.specs(*spec) if quantizer else [spec])
    attached = quantizer.attached() if quantizer else frozenset()
    by_rank = [plan_shards(specs, shard_bytes, attached) if specs else [] for specs in per_rank]
    total = sum(len(r) for r in by_rank)
    names = iter([SINGLE_NAME] if total == 1 else
                 [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)])
    return [[dataclasses.replace(s, name=next(names)) for s in shards] for shards in by_rank]


def _rank_dir(out: Path, rank: int, fingerprint: dict, resume: bool) -> OutputDir:
    """This rank's working directory inside OUT, with its own resume manifest (a new run starts it empty)."""
    path = out / distributed.RANK_DIR.format(rank)
    if not resume:
        shutil.rmtree(path, ignore_errors=True)
    return OutputDir(path, {**fingerprint, "rank": rank}, resume=resume)


def _stream_rank(dist: distributed.Dist, ctx: StreamContext, pieces: list[Piece], work: OutputDir,
                 shards: list[Shard], timings: dict, progress: Callable[[int, int], None] | None,
                 quantizer: Quantizer | None, resumed: list[str]) -> list[dict]:
    """This rank's share, then every rank's outcome: raises on every rank if any failed (naming it)."""
    t0 = time.perf_counter()
    error: BaseException | None = None
    stats, bytes_read = {}, 0
    try:
        stats, bytes_read = _stream(ctx, pieces, work, shards, timings, progress, quantizer)
    except distributed.RankFailed:
        raise                                       # another rank failed during a prepass round: all stop there
    except Exception as e:
        error = e
    payload = {"rank": dist.rank, "tensors": len({p.target for p in pieces}), "shards": [s.name for s in shards],
               "resumed_shards": resumed, "bytes_read": bytes_read, "tensor_stats": stats,
               "timings_s": {**timings, "rank_total": time.perf_counter() - t0},
               "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(ctx.device)}
    return dist.sync(error, payload)


def _collect_rank_shards(out: Path, by_rank: list[list[Shard]]) -> None:
    """Rank 0, once every rank succeeded: each rank's finished shards into OUT, still under their partial names
    (``OutputDir.finish`` gives them their final names, then writes the index)."""
    for r, shards in enumerate(by_rank):
        for s in shards:
            os.replace(out / distributed.RANK_DIR.format(r) / s.partial, out / s.partial)


def _prepare_process() -> None:
    """Process-wide settings a merge relies on: malloc thresholds, and a file-size limit raising EFBIG.

    Without ignoring SIGXFSZ, hitting RLIMIT_FSIZE kills the process before it can say which file was too large.
    Signal handlers can only be set from the main thread; elsewhere the default stays.
    """
    tune_malloc()
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _stream(ctx: StreamContext, pieces: list[Piece], outdir: OutputDir, shards: list, timings: dict,
            progress: Callable[[int, int], None] | None, quantizer: Quantizer | None = None) -> tuple[dict, int]:
    """Pre-pass (if the method has one) and merge of every piece not already in a finished shard; with a
    ``quantizer``, its targets are quantized on their way to the writer.

    Returns the per-tensor statistics and the bytes read; fills ``timings`` (prepass, merge).
    """
    writer = ShardWriter(outdir.path, shards, outdir.done_shards, outdir.record_shard, release=ctx.pool.give)
    # a calibrated rule walks the whole model again on --resume (each layer's Grams need the layers before it);
    # tensors of finished shards are merged but not written again
    todo = pieces if ctx.calib is not None else [p for p in pieces if writer.needed(p.target)]
    total = stream_volume(ctx, pieces, todo)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    ctx.progress = tick
    t0 = time.perf_counter()
    try:
        state = run_prepass(ctx, pieces)
        t1 = time.perf_counter()
        stats = run_merge(ctx, todo, state, quantizer.writer(writer.write, ctx.pool.give) if quantizer
                          else writer.write)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    timings.update(prepass=t1 - t0, merge=time.perf_counter() - t1)
    return stats, done[0]


def _quantizer(plan: Plan, quantize: str | None, dev: torch.device) -> Quantizer | None:
    """The --quantize writer side; refused without the base's config.json, which must carry its config."""
    if quantize is None:
        return None
    if not (plan.base.model_dir and (plan.base.model_dir / "config.json").is_file()):
        raise ConfigError("--quantize needs the base's config.json (transformers reads the quantization "
                          "config from it)", path=plan.base.path,
                          hint="pass the base as a Hugging Face directory with its config.json")
    return Quantizer(quantize, plan.tensors, plan.out_dtype, dev)


def _parse_dtype(dtype: str) -> torch.dtype | None:
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def _fingerprint(plan: Plan, method: str, params: Any, dtype: str, dev: torch.device, shard_bytes: int) -> dict:
    """What must not change between an interrupted run and its --resume (any change alters the output bytes)."""
    def files(ck: Expert) -> dict:
        return {f.path: {"size": f.size, "mtime_ns": f.mtime_ns, "header_sha256": f.header_sha256,
                         "sample_sha256": f.sample_sha256} for f in ck.files}
    return {"base": files(plan.base), "experts": [files(e) for e in plan.experts], "method": method,
            "params": params_dict(params), "dtype": dtype, "device": dev.type, "threads": torch.get_num_threads(),
            "shard_size": shard_bytes, "lowmerge": versions()["lowmerge"]}


def _describe(ck: Expert) -> dict:
    return {"path": str(ck.path), "files": [{"path": f.path, "size": f.size, "header_sha256": f.header_sha256}
                                           for f in ck.files]}


def _extra_files(plan: Plan) -> list[str]:
    names = [n for n in COPIED_FILES if plan.base.model_dir and (plan.base.model_dir / n).is_file()
             and not (plan.vocab and n in TOKENIZER_FILES)]
    names += plan.vocab.files if plan.vocab else []
    names += [_head_file(i, e) for i, e in enumerate(plan.experts) if plan.heads[i]]
    return names


def _head_file(i: int, ck: Expert) -> str:
    return f"heads/expert{i}-{ck.path.stem}.safetensors"


def _write_heads(plan: Plan, out: Path) -> None:
    """Task heads are never merged: each expert's go to heads/ beside the model (they are small)."""
    for i, (ck, names) in enumerate(zip(plan.experts, plan.heads)):
        if names:
            (out / "heads").mkdir(exist_ok=True)
            write_new(out / _head_file(i, ck), save({n: ck.read(n) for n in names}, metadata={"format": "pt"}))


def _copy_base_files(plan: Plan, out: Path, out_dtype: torch.dtype | None,
                     quantization_config: dict | None = None) -> None:
    """Config and tokenizer files; config.json gets the output dtype, the output vocabulary's size and, with
    --quantize, the ``quantization_config`` transformers reads to load the bitsandbytes weights. With another
    vocabulary than the base's, its tokenizer replaces the base's."""
    import json
    for name in COPIED_FILES:
        src = plan.base.model_dir / name if plan.base.model_dir else None
        if not (src and src.is_file()) or (plan.vocab and name in TOKENIZER_FILES):
            continue
        if name == "config.json" and (out_dtype is not None or quantization_config or plan.vocab):
            cfg = json.loads(src.read_text())
            if out_dtype is not None:
                key = "dtype" if "dtype" in cfg else "torch_dtype"
                cfg[key] = str(out_dtype).removeprefix("torch.")
            if quantization_config:
                cfg["quantization_config"] = quantization_config
            if plan.vocab:
                set_vocab_size(cfg, plan.vocab.rows)
            write_new(out / name, (json.dumps(cfg, indent=2) + "\n").encode())
        else:
            copy_new(src, out / name)
    for name in plan.vocab.files if plan.vocab else []:
        copy_new(plan.vocab.files_dir / name, out / name)
