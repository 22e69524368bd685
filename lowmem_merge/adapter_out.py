"""``--output-format peft``: LoRA adapters merged into one PEFT adapter of the base, instead of a full model.

Three ways to factor the merged Δ* of a module (ALGORITHMS.md §2 for the core space), with scales folded into B so
that every module has lora_alpha = r (PEFT's scale 1):
- ``concat`` (task_arithmetic, average, i.e. mergekit's linear): Δ* = Σ c_t s_t B_t A_t = [c_1 s_1 B_1 | …][A_1; …],
  exact, rank Σ r_t; no base tensor is read.
- ``core`` (the covariance rules, actmat and wudi_cfs): every Δt's rows lie in the span of the stacked A_t, and so do
  Δ*'s (N's rows do, and (A + ridge·I)⁻¹ keeps that span), so Δ* = (Δ* Q) Qᵀ with Q an orthonormal basis of it: exact
  up to fp32 rounding, rank min(Σ r_t, in).
- ``svd`` (every other rule): the stream's Δ* (``StreamContext.deltas``), cut to its top ``--adapter-rank`` singular
  triplets (default Σ r_t of the module, the concatenation's size). ``--adapter-rank`` caps the exact forms too: a
  module whose exact rank exceeds it is cut the same way.
The relative Frobenius error ‖Δ* − B'A'‖ / ‖Δ*‖ of each module is measured and reported, whatever the form.
One module at a time: its factors are written to the adapter file as soon as they are formed, then freed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .device import BufferPool, peak_device_bytes, peak_rss_bytes, resolve_device
from .errors import ConfigError, InputError
from .io.checkpoint import input_paths, open_checkpoint
from .io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from .io.outdir import OutputDir, check_apart
from .io.writer import ShardWriter, output_error, plan_shards, write_new
from .methods import get_method, params_dict, parse_params
from .methods.average import Average
from .methods.base import MergeMethod, expert_weight
from .methods.covariance import CovarianceMethod
from .methods.task_arithmetic import TaskArithmetic
from .plan import make_plan
from .report import CARD_NAME, REPORT_NAME, Report, now_utc, versions, write_report
from .stream import StreamContext, make_pieces, run_merge, run_prepass, stream_volume

PREFIX = "base_model.model."
CONCAT_RULES = (Average, TaskArithmetic)
_WHOLE = 1 << 62        # no row chunks: a module's SVD needs all of Δ*
READ_AHEAD = 16 << 20   # bytes read ahead of the module being merged: its SVD, not the reads, sets the pace
_OUT_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Module:
    """One adapted weight of the output: its base tensor name, (out, in), and the rank written."""
    weight: str
    out_features: int
    in_features: int
    rank: int
    form: str               # concat | core | svd

    @property
    def name(self) -> str:
        return self.weight.removesuffix(".weight")


def merge_adapter(base: str | Path, experts: Sequence[str | Path], out: str | Path, method: str, *,
                  params: dict[str, Any], adapter_rank: int | None = None, device: str = "auto",
                  dtype: str = "auto", force: bool = False,
                  progress: Callable[[int, int], None] | None = None, **unsupported: Any) -> Report:
    """Merge the LoRA adapters ``experts`` of ``base`` into a PEFT adapter directory ``out``.

    ``unsupported``: merge options that have no meaning for an adapter output; any that is set is refused.
    Everything is checked before ``out`` is created; until the end it holds only a manifest and a partial file.
    """
    t_start = time.perf_counter()
    method_cls, parsed = _check_options(method, params, len(experts), adapter_rank, dtype, unsupported)
    dev = resolve_device(device)
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(base))
        adapters = [stack.enter_context(open_checkpoint(e)) for e in experts]
        _check_adapters(adapters)
        check_apart(out, [p for ck in (base_ck, *adapters) for p in input_paths(ck)])
        plan = make_plan(base_ck, adapters, None)
        modules = _modules(plan, adapters, method_cls, adapter_rank)
        out_dtype = _OUT_DTYPES[dtype]
        shard = dataclasses.replace(plan_shards([s for m in modules for s in _specs(m, out_dtype)], _WHOLE)[0],
                                    name=ADAPTER_WEIGHTS)
        fingerprint = {"output_format": "peft", "method": method_cls.name, "params": params_dict(parsed),
                       "base": str(base), "experts": [str(e) for e in experts], "adapter_rank": adapter_rank,
                       "dtype": dtype}
        outdir = stack.enter_context(OutputDir(out, fingerprint, force=force))
        outdir.claim([ADAPTER_WEIGHTS, ADAPTER_CONFIG, REPORT_NAME, CARD_NAME])
        t_merge = time.perf_counter()
        errors: dict[str, float] = {}
        writer = ShardWriter(outdir.path, [shard], {}, outdir.record_shard)
        try:
            emit = _emitter(writer, modules, out_dtype, errors)
            if all(m.form == "concat" for m in modules):
                bytes_read = _concat(adapters, modules, method_cls, parsed, emit, progress)
            else:
                bytes_read = _stream_deltas(plan, method_cls, parsed, dev, modules, adapters, emit, progress)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        timings = {"plan": t_merge - t_start, "merge": time.perf_counter() - t_merge}
        try:
            write_new(outdir.path / ADAPTER_CONFIG, _config_json(base, adapters, modules))
            report = write_report(outdir.path, _report_data(
                base_ck, adapters, method_cls, parsed, outdir.path, modules, errors, shard.size, dtype, dev,
                bytes_read, {**timings, "total": time.perf_counter() - t_start}))
            outdir.finish([shard])
        except OSError as e:
            raise output_error(e, outdir.path) from None
        return report


def _check_options(method: str, params: dict[str, Any], n_experts: int, adapter_rank: int | None, dtype: str,
                   unsupported: dict[str, Any]) -> tuple[type[MergeMethod], Any]:
    """The rule and its parsed parameters; anything an adapter output cannot honour is a ConfigError."""
    _refuse(unsupported)
    method_cls = get_method(method)
    parsed = parse_params(method_cls, params)
    method_cls.check_experts(parsed, n_experts)
    if method_cls.calibration:
        raise ConfigError(f"--output-format peft: {method_cls.name} needs calibration data, which an adapter output "
                          "does not support", hint="use a data-free rule, or drop --output-format peft")
    if distributed.from_env() is not None:
        raise ConfigError("--output-format peft runs in one process: it cannot run under torchrun",
                          hint="run it as a plain `lowmerge merge`")
    if adapter_rank is not None and adapter_rank < 1:
        raise ConfigError(f"--adapter-rank {adapter_rank} is not a positive rank", hint="e.g. --adapter-rank 16")
    if dtype not in _OUT_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return method_cls, parsed


def _refuse(options: dict[str, Any]) -> None:
    flags = {"quantize": "--quantize", "calib": "--calib", "schedule": "a recipe's per-layer gradients or filters",
             "tokenizer_source": "--tokenizer-source", "resume": "--resume", "max_memory": "--max-memory",
             "max_device_memory": "--max-device-memory"}
    for key, value in options.items():
        if key not in flags:
            raise TypeError(f"merge_adapter() got an unexpected keyword argument {key!r}")
        if value:
            raise ConfigError(f"--output-format peft does not take {flags[key]}",
                              hint="drop it, or drop --output-format peft to write a full model")


def _check_adapters(experts: list) -> None:
    """Every expert is a LoRA adapter with factors only: a full tensor has no place in an adapter of this form."""
    for ck in experts:
        if not isinstance(ck, LoraAdapter):
            raise InputError("--output-format peft merges LoRA adapters only, and this expert is a full-weight model",
                             path=ck.path, hint="pass its PEFT adapter directory instead, or drop --output-format "
                                                "peft to write a full model")
        if ck.entries:
            name = next(iter(ck.entries))
            raise InputError("--output-format peft writes LoRA factors only, and this adapter carries a full tensor "
                             "(modules_to_save)", path=ck.path, tensor=name,
                             hint="drop --output-format peft to write a full model")
        if not ck.lora:
            raise InputError("this adapter has no LoRA factors", path=ck.path,
                             hint="pass an adapter saved by PEFT's save_pretrained")


def _modules(plan: Any, adapters: list[LoraAdapter], method: type[MergeMethod],
             adapter_rank: int | None) -> list[Module]:
    """The adapted weights in the base's order, each with its form and output rank (fixed before anything runs)."""
    infos = {i.name: i for i in plan.tensors}
    modules = []
    for name in infos:
        ranks = [ad.lora[name].a.shape[0] for ad in adapters if name in ad.lora]
        if not ranks:
            continue
        some = next(ad.lora[name] for ad in adapters if name in ad.lora)
        out_features, in_features = some.b.shape[0], some.a.shape[1]     # PEFT's B (out, r), A (r, in)
        total = sum(ranks)
        form, rank = "svd", min(adapter_rank or total, out_features, in_features)
        if method in CONCAT_RULES:
            form, rank = "concat", total
        elif issubclass(method, CovarianceMethod) and method.takes_factors(infos[name]):
            form, rank = "core", min(total, in_features)
        if adapter_rank is not None and adapter_rank < rank:    # --adapter-rank caps the exact forms too
            form, rank = "svd", adapter_rank
        modules.append(Module(name, out_features, in_features, rank, form))
    return modules


def _specs(m: Module, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(f"{PREFIX}{m.name}.lora_A.weight", dtype, (m.rank, m.in_features)),
            (f"{PREFIX}{m.name}.lora_B.weight", dtype, (m.out_features, m.rank))]


def _emitter(writer: ShardWriter, modules: list[Module], dtype: torch.dtype,
             errors: dict[str, float]) -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor | None], None]:
    """``emit(weight, b, a, delta)``: B' (out, k) and A' (k, in) to the file in plan order; with ``delta`` (the merged
    Δ*, (out, in) fp32) the relative error of B'A' against it goes to ``errors``."""
    by_name = {m.weight: m for m in modules}

    def emit(weight: str, b: torch.Tensor, a: torch.Tensor, delta: torch.Tensor | None) -> None:
        m = by_name[weight]
        b, a = b.to(dtype), a.to(dtype)
        if delta is not None:       # one (out, in) fp32 temporary, as large as Δ* itself
            norm = float(torch.linalg.matrix_norm(delta))
            diff = float(torch.linalg.matrix_norm(torch.addmm(delta, b.float(), a.float(), alpha=-1)))
            errors[m.name] = diff / norm if norm > 0 else diff
        writer.write(f"{PREFIX}{m.name}.lora_A.weight", a.contiguous())
        writer.write(f"{PREFIX}{m.name}.lora_B.weight", b.contiguous())
    return emit


def _coefficient(method: type[MergeMethod], params: Any, t: int, n_experts: int) -> float:
    """c_t of a concatenating rule: Δ* = Σ c_t Δt (task_arithmetic: λ w_t; average: w_t / Σ w)."""
    if issubclass(method, TaskArithmetic):
        return params.scale * expert_weight(params, t)
    return expert_weight(params, t) / (sum(params.weights) if params.weights else n_experts)


def _concat_factors(adapters: list[LoraAdapter], weight: str, method: type[MergeMethod],
                    params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """B' = [c_1 s_1 B_1 | c_2 s_2 B_2 | …] (out, Σ r_t), A' = [A_1; A_2; …] (Σ r_t, in), fp32."""
    bs, as_ = [], []
    for t, ad in enumerate(adapters):
        if weight in ad.lora:
            x = ad.read(weight)
            bs.append(x.b.float().mul_(x.scale * _coefficient(method, params, t, len(adapters))))  # (out, r_t)
            as_.append(x.a.float())                                                                # (r_t, in)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def _concat(adapters: list[LoraAdapter], modules: list[Module], method: type[MergeMethod], params: Any,
            emit: Callable, progress: Callable[[int, int], None] | None) -> int:
    """Every module concatenated, from the factors alone (the base is never read)."""
    total = sum(ad.read_bytes(m.weight, None) for m in modules for ad in adapters)
    done = 0
    for m in modules:
        b, a = _concat_factors(adapters, m.weight, method, params)
        emit(m.weight, b, a, None)
        done += sum(ad.read_bytes(m.weight, None) for ad in adapters)
        if progress:
            progress(done, total)
    return done


def _stream_deltas(plan: Any, method: type[MergeMethod], params: Any, dev: torch.device, modules: list[Module],
                   adapters: list[LoraAdapter], emit: Callable, progress: Callable[[int, int], None] | None) -> int:
    """The rule's Δ* of each adapted weight through the merge stream (prepass, base for rules on weights, factors for
    the core-space rules), then factored as its module's form says."""
    by_name = {m.weight: m for m in modules}
    for name in by_name:
        plan.out_dtype[name] = torch.float32
    pool = BufferPool(pin=dev.type == "cuda")
    done, total = [0], [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total[0])

    ctx = StreamContext(plan, method, params, dev, tick, pool, READ_AHEAD, deltas=True)
    pieces = make_pieces(plan, method, params, _WHOLE)
    todo = [p for p in pieces if p.target in by_name and p.target == p.info.name]
    total[0] = stream_volume(ctx, pieces, todo)
    state = run_prepass(ctx, pieces)       # a model-wide statistic sees every tensor, as in a full merge

    def write(name: str, stored: torch.Tensor) -> None:
        m = by_name[name]
        factors = next(ad.lora[name] for ad in adapters if name in ad.lora)
        delta = (stored.mT if factors.fan_in_fan_out else stored).to(dev)  # (out, in): PEFT's B·A orientation
        if m.form == "concat":       # a module within --adapter-rank while others are cut
            b, a = (x.to(dev) for x in _concat_factors(adapters, name, method, params))
        else:
            b, a = _core(delta, adapters, name) if m.form == "core" else _svd(delta, m.rank)
        emit(name, b, a, delta)
        del delta
        pool.give(stored)

    run_merge(ctx, todo, state, write)
    return done[0]


def _core(delta: torch.Tensor, adapters: list[LoraAdapter], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ* Q, Qᵀ), Q (in, k) an orthonormal basis of the stacked A_t's rows, where Δ*'s rows lie."""
    stacked = torch.cat([ad.read(name).a.float() for ad in adapters if name in ad.lora])    # (Σ r_t, in)
    q, _ = torch.linalg.qr(stacked.T.to(delta.device))                                       # (in, k)
    return delta @ q, q.T.contiguous()


def _svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of Δ* (Eckart–Young): (U_k Σ_k, V_kᵀ)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].contiguous()


def _config_json(base: str | Path, adapters: list[LoraAdapter], modules: list[Module]) -> bytes:
    """PEFT's LoraConfig: r = lora_alpha = the most common rank (scale 1, the scales live in B); other ranks by
    rank_pattern / alpha_pattern keyed by the module's full name."""
    common = Counter(m.rank for m in modules).most_common(1)[0][0]
    other = {re.escape(m.name): m.rank for m in modules if m.rank != common}
    first = adapters[0].adapter_config
    cfg = {"peft_type": "LORA", "task_type": first.get("task_type"), "base_model_name_or_path": str(base),
           "r": common, "lora_alpha": common, "rank_pattern": other, "alpha_pattern": dict(other),
           "target_modules": [m.name for m in modules], "lora_dropout": 0.0, "bias": "none",
           "fan_in_fan_out": any(ad.adapter_config.get("fan_in_fan_out") for ad in adapters),
           "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
           "inference_mode": True}
    return (json.dumps(cfg, indent=2) + "\n").encode()


def _report_data(base_ck: Any, adapters: list[LoraAdapter], method: type[MergeMethod], params: Any, out: Path,
                 modules: list[Module], errors: dict[str, float], size: int, dtype: str, dev: torch.device,
                 bytes_read: int, timings: dict[str, float]) -> dict:
    def describe(ck: Any) -> dict:
        return {"path": str(ck.path), "files": [{"path": f.path, "size": f.size, "header_sha256": f.header_sha256}
                                               for f in ck.files]}
    return {
        "lowmerge_version": versions()["lowmerge"], "created": now_utc(), "method": method.name,
        "params": params_dict(params),
        "inputs": {"base": describe(base_ck), "experts": [describe(a) for a in adapters]},
        "output": {"dir": str(out), "format": "peft", "dtype": "float32" if dtype == "auto" else dtype,
                   "tensors": 2 * len(modules), "shards": [ADAPTER_WEIGHTS], "bytes": size},
        "adapter": {"modules": {m.name: {"rank": m.rank, "form": m.form,
                                         **({"rel_error": errors[m.name]} if m.name in errors else {})}
                                for m in modules},
                    "max_rel_error": max(errors.values(), default=0.0)},
        "device": str(dev), "threads": torch.get_num_threads(), "bytes_read": bytes_read, "timings_s": timings,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(dev)},
        "warnings": [], "versions": versions(),
        "files": [ADAPTER_WEIGHTS, ADAPTER_CONFIG, REPORT_NAME, CARD_NAME],
    }
