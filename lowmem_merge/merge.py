"""The Python API: ``merge(base, experts, out, method=..., **params) -> Report``. The CLI is a thin layer on it."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from . import distributed, torchrun
from .budget import Strategy, choose_strategy, device_budget
from .calib.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from .device import BufferPool, peak_device_bytes, peak_rss_bytes, resolve_device, tune_malloc
from .errors import ConfigError
from .info import TensorInfo
from .io.checkpoint import input_paths, open_checkpoint
from .io.hub import resolve
from .io.outdir import OutputDir, check_apart
from .io.reader import INDEX_NAME
from .io.writer import Shard, ShardWriter, copy_new, write_new
from .methods import DEFAULT_METHOD, MergeMethod, get_method, params_dict, parse_params
from .output import COPIED_FILES, claim_output, describe_checkpoint, parse_dtype, publish, write_shards
from .plan import RECIPE_NOTE, VOCAB_UNION, Expert, Plan, PlanWarning, make_plan
from .quantize import Quantizer
from .report import CARD_NAME, REPORT_NAME, Report, now_utc, versions
from .schedule import Schedule
from .sizes import parse_size
from .stream import Piece, StreamContext, run_merge, run_prepass, stream_volume
from .vocab import SOURCES, TOKENIZER_FILES, align, set_vocab_size


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, decided before the first weight is read; nothing changes it afterwards."""
    out: Path
    plan: Plan                          # inputs, vocabulary map, tensor order (calibration walk's), dtypes, warnings
    method: type[MergeMethod]
    params: Any
    params_for: Callable[[TensorInfo], Any] | None    # per-tensor parameters from a recipe's schedule
    calibration: Any                    # calib.walker.Calibration for a calibrated rule, else None
    device: torch.device
    dtype: str
    quantize: str | None
    quantizer: Quantizer | None
    strategy: Strategy
    fingerprint: dict                   # what --resume must find unchanged
    dist: distributed.Dist | None
    pieces: list[Piece]                 # this rank's
    by_rank: list[list[Shard]]          # every rank's shards, named in one sequence
    files: list[str]                    # the finished output's files (report and card included)
    resume: bool
    force: bool
    t_start: float
    t_plan: float

    @property
    def shards(self) -> list[Shard]:
        return [s for r in self.by_rank for s in r]


@dataclasses.dataclass(frozen=True)
class MergeResult:
    outdir: OutputDir
    stats: dict
    bytes_read: int
    resumed: list[str]
    timings: dict
    ranks: list[dict] | None            # each rank's outcome under torchrun


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
    Started by torchrun (WORLD_SIZE > 1), each rank merges its share of the tensors (``torchrun.py``); rank 0
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
    with contextlib.ExitStack() as stack:
        mp = prepare(stack, base, experts, out, method, device=device, dtype=dtype, shard_size=shard_size,
                     max_memory=max_memory, max_device_memory=max_device_memory, resume=resume, force=force,
                     quantize=quantize, schedule=schedule, calib=calib, calib_samples=calib_samples,
                     calib_seq_len=calib_seq_len, tokenizer_source=tokenizer_source, params=params,
                     notes=notes, t_start=t_start)
        result = run(mp, stack, progress)
        return None if result is None else finish(mp, result)


def prepare(stack: contextlib.ExitStack, base: str | Path, experts: Sequence[str | Path], out: str | Path,
            method: str | None, *, device: str, dtype: str, shard_size: str | int, max_memory: str | int | None,
            max_device_memory: str | int | None, resume: bool, force: bool, quantize: str | None,
            schedule: Schedule | None, calib: Sequence[str | Path] | None, calib_samples: int,
            calib_seq_len: int, tokenizer_source: str | None, params: dict, t_start: float,
            notes: Sequence[str] = ()) -> MergePlan:
    """Validate, open the inputs (held by ``stack``), and decide everything: the frozen :class:`MergePlan`."""
    method_cls, parsed, dist, dev = _settings(method, params, experts, calib, device)
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size, "--shard-size")
    if dist is not None:
        distributed.init(dist, dev)
        stack.callback(dist.close)
    base_ck = stack.enter_context(open_checkpoint(base))
    expert_cks = [stack.enter_context(open_checkpoint(e)) for e in experts]
    check_apart(out, _inputs([base_ck, *expert_cks], calib, tokenizer_source))
    plan = _vocabulary_plan(stack, base_ck, expert_cks, out_dtype, method_cls, tokenizer_source, notes)
    walker = None
    if method_cls.calibration:
        walker = _calibration(plan, method_cls, parsed, calib, calib_samples, calib_seq_len, dev)
        plan = dataclasses.replace(plan, tensors=walker.order(plan.tensors))
    quantizer = _quantizer(plan, quantize, dev)
    strategy = choose_strategy(
        plan, method_cls, parsed, None if max_memory is None else
        parse_size(max_memory, "--max-memory") - (quantizer.extra_bytes() if quantizer else 0),
        device_budget(dev, None if max_device_memory is None else parse_size(max_device_memory,
                                                                              "--max-device-memory")))
    t_plan = time.perf_counter() - t_start
    fingerprint = {**_fingerprint(plan, method_cls.name, parsed, dtype, dev, shard_bytes),
                   "chunk_elems": strategy.chunk_elems, "quantize": quantize,
                   **({"world_size": dist.world} if dist else {}),
                   **({"schedule": schedule.describe()} if schedule else {}),
                   **({"calib": _calib_fingerprint(calib, calib_samples, calib_seq_len)} if walker else {}),
                   **({"vocabulary": plan.vocab.describe()} if plan.vocab else {})}
    world, rank = (dist.world, dist.rank) if dist else (1, 0)
    owner = torchrun.owners(plan, method_cls, parsed, strategy.pieces, world)
    by_rank = torchrun.rank_shards(plan, quantizer, owner, world, shard_bytes)
    shards = [s for r in by_rank for s in r]
    files = ([s.name for s in shards] + ([INDEX_NAME] if len(shards) > 1 else []) + _extra_files(plan)
             + [REPORT_NAME, CARD_NAME])
    return MergePlan(Path(out), plan, method_cls, parsed, _params_for(plan, method_cls, schedule) if schedule
                     else None, walker, dev, dtype, quantize, quantizer, strategy, fingerprint, dist,
                     [p for p in strategy.pieces if owner[p.target] == rank], by_rank, files, resume, force,
                     t_start, t_plan)


def run(mp: MergePlan, stack: contextlib.ExitStack,
        progress: Callable[[int, int], None] | None = None) -> MergeResult | None:
    """Stream the plan into OUT (under torchrun: this rank's share; None on ranks other than 0)."""
    if mp.dist is None:
        outdir = claim_output(stack, mp.out, mp.fingerprint, mp.files, resume=mp.resume, force=mp.force)
        resumed = sorted(outdir.done_shards)        # kept from the interrupted run; the writer adds to it
        stats, bytes_read, timings = _stream(mp, outdir, mp.by_rank[0], progress)
        return MergeResult(outdir, stats, bytes_read, resumed, timings, None)
    done = torchrun.run_ranks(mp.dist, stack, mp.out, mp.fingerprint, mp.files, mp.by_rank, mp.resume, mp.force,
                              lambda work: _stream(mp, work, mp.by_rank[mp.dist.rank], progress),
                              len({p.target for p in mp.pieces}), mp.device)
    if done is None:
        return None
    return MergeResult(done.outdir, {k: v for r in done.ranks for k, v in r["tensor_stats"].items()},
                       sum(r["bytes_read"] for r in done.ranks),
                       sorted(n for r in done.ranks for n in r["resumed_shards"]), done.ranks[0]["timings_s"],
                       done.ranks)


def finish(mp: MergePlan, result: MergeResult) -> Report:
    """Heads, config and tokenizer files, the report and card, then the shards' final names and the index."""
    plan, out_dtype = mp.plan, parse_dtype(mp.dtype)

    def side_files(path: Path) -> None:
        _write_heads(plan, path)
        _copy_base_files(plan, path, out_dtype, mp.quantizer.config() if mp.quantizer else None)
    report = publish(result.outdir, mp.shards, side_files, lambda: _report(mp, result))
    if mp.dist is not None:
        torchrun.remove_rank_dirs(mp.out, mp.dist.world)
    return report


def _report(mp: MergePlan, result: MergeResult) -> dict:
    plan, quantizer = mp.plan, mp.quantizer
    timings = {k: v for k, v in result.timings.items() if k != "rank_total"}
    data = {
        "lowmerge_version": versions()["lowmerge"], "created": now_utc(),
        "method": mp.method.name, "params": params_dict(mp.params),
        "inputs": {"base": describe_checkpoint(plan.base), "experts": [describe_checkpoint(e) for e in plan.experts]},
        "output": {"dir": str(result.outdir.path), "dtype": mp.dtype if parse_dtype(mp.dtype) else "base",
                   "tensors": len(plan.tensors), "shards": [s.name for s in mp.shards],
                   "bytes": sum(s.size for s in mp.shards), "resumed_shards": result.resumed,
                   "quantize": mp.quantize, "quantized_tensors": len(quantizer.targets) if quantizer else 0},
        "device": str(mp.device), "threads": torch.get_num_threads(), "bytes_read": result.bytes_read,
        "strategy": mp.strategy.describe(),
        "timings_s": {**timings, "total": time.perf_counter() - mp.t_start},
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(mp.device)},
        "heads": {str(e.path): names for e, names in zip(plan.experts, plan.heads) if names},
        "warnings": plan.warnings, "tensor_stats": result.stats,
        **({"vocabulary": plan.vocab.describe()} if plan.vocab else {}), "versions": versions(),
        "files": mp.files,
    }
    if result.ranks is not None:
        data["distributed"] = {"world_size": mp.dist.world, "ranks": [{k: v for k, v in r.items()
                                                                       if k != "tensor_stats"} for r in result.ranks]}
    return data


def _settings(method: str | None, params: dict, experts: Sequence, calib: Sequence | None,
              device: str) -> tuple[type[MergeMethod], Any, distributed.Dist | None,
                                                            torch.device]:
    """The method and its parameters, checked; torchrun's ranks (from the environment); the device."""
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
    return method_cls, parsed, dist, dev


def _vocabulary_plan(stack: contextlib.ExitStack, base_ck: Any, expert_cks: list, out_dtype: torch.dtype | None,
                     method_cls: type[MergeMethod], tokenizer_source: str | None, notes: Sequence[str]) -> Plan:
    """The plan over the output vocabulary (the base's, or the experts' aligned one), with the caller's notes."""
    vocab = align(base_ck, expert_cks, tokenizer_source)
    if vocab is not None:
        stack.callback(shutil.rmtree, vocab.files_dir, True)
        if method_cls.calibration:
            raise ConfigError(f"{method_cls.name} cannot merge experts of other vocabularies",
                              hint="resize the experts to the base's vocabulary, or use a data-free rule")
    plan = make_plan(base_ck, expert_cks, out_dtype)
    warnings = [*plan.warnings, *(PlanWarning(RECIPE_NOTE, note) for note in notes)]
    if vocab is not None and tokenizer_source is None:
        warnings.append(PlanWarning(VOCAB_UNION, f"the experts' vocabularies differ from the base's: merged over their "
                                    f"union ({vocab.rows} rows, the base has {vocab.base_rows}); --tokenizer-source "
                                    "base keeps the base's", rows=vocab.rows, base_rows=vocab.base_rows))
    return dataclasses.replace(plan, vocab=vocab, warnings=warnings)


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


def _prepare_process() -> None:
    """Process-wide settings a merge relies on: malloc thresholds, and a file-size limit raising EFBIG.

    Without ignoring SIGXFSZ, hitting RLIMIT_FSIZE kills the process before it can say which file was too large.
    Signal handlers can only be set from the main thread; elsewhere the default stays.
    """
    tune_malloc()
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _stream(mp: MergePlan, outdir: OutputDir, shards: list[Shard],
            progress: Callable[[int, int], None] | None) -> tuple[dict, int, dict]:
    """Pre-pass (if the method has one) and merge of every piece of ``mp.pieces`` not already in a finished shard;
    with a quantizer, its targets are quantized on their way to the writer.

    Returns the per-tensor statistics, the bytes read and the timings (plan, prepass, merge).
    """
    pool = BufferPool(limit=mp.strategy.prefetch_bytes, pin=mp.device.type == "cuda")
    ctx = StreamContext(mp.plan, mp.method, mp.params, mp.device, lambda n: None, pool,
                        mp.strategy.prefetch_bytes, mp.strategy.cpu_tensors,
                        mp.dist.all_reduce if mp.dist else None, mp.params_for, mp.calibration)
    timings = {"plan": mp.t_plan}

    def write(writer: ShardWriter) -> tuple[dict, int]:
        # a calibrated rule walks the whole model again on --resume (each layer's Grams need the layers before
        # it); tensors of finished shards are merged but not written again
        todo = mp.pieces if ctx.calib is not None else [p for p in mp.pieces if writer.needed(p.target)]
        total = stream_volume(ctx, mp.pieces, todo)
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total)
        ctx.progress = tick
        t0 = time.perf_counter()
        state = run_prepass(ctx, mp.pieces)
        t1 = time.perf_counter()
        quantizer = mp.quantizer
        stats = run_merge(ctx, todo, state, quantizer.writer(writer.write, pool.give) if quantizer else writer.write,
                          writer.wait_idle)
        timings.update(prepass=t1 - t0, merge=time.perf_counter() - t1)
        return stats, done[0]
    stats, bytes_read = write_shards(outdir, shards, write, release=pool.give)
    return stats, bytes_read, timings


def _quantizer(plan: Plan, quantize: str | None, dev: torch.device) -> Quantizer | None:
    """The --quantize writer side; refused without the base's config.json, which must carry its config."""
    if quantize is None:
        return None
    if not (plan.base.model_dir and (plan.base.model_dir / "config.json").is_file()):
        raise ConfigError("--quantize needs the base's config.json (transformers reads the quantization "
                          "config from it)", path=plan.base.path,
                          hint="pass the base as a Hugging Face directory with its config.json")
    return Quantizer(quantize, plan.tensors, plan.out_dtype, dev)


def _fingerprint(plan: Plan, method: str, params: Any, dtype: str, dev: torch.device, shard_bytes: int) -> dict:
    """What must not change between an interrupted run and its --resume (any change alters the output bytes)."""
    def files(ck: Expert) -> dict:
        return {f.path: {"size": f.size, "mtime_ns": f.mtime_ns, "header_sha256": f.header_sha256,
                         "sample_sha256": f.sample_sha256} for f in ck.files}
    return {"base": files(plan.base), "experts": [files(e) for e in plan.experts], "method": method,
            "params": params_dict(params), "dtype": dtype, "device": dev.type, "threads": torch.get_num_threads(),
            "shard_size": shard_bytes, "lowmerge": versions()["lowmerge"]}


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
