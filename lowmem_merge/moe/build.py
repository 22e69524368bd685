"""``lowmerge moe``: a Mixtral (or Qwen2-MoE) mixture of experts from a base and dense fine-tunes (mergekit-moe).

Attention, norms, embeddings and head come from the base; expert e's MLP (gate, up, down) fills slot e of each
layer's stacked experts, in the layout transformers 5 loads natively (``mlp.experts.gate_up_proj`` (E, 2I, H) with
gate rows before up rows, ``mlp.experts.down_proj`` (E, H, I)); ``mlp.gate.weight`` (E, H) is the router
(router.py). Qwen2-MoE adds the shared expert's MLP (``mlp.shared_expert.*``) and its sigmoid gate
(``mlp.shared_expert_gate.weight`` (1, H), its router row), and zero q/k/v biases for a base without them.
A stacked tensor is written expert by expert as rows of its shard, so memory holds one expert's matrix at a time
whatever the number of experts; routers are computed before the output directory is touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import peak_device_bytes, peak_rss_bytes, resolve_device, tune_malloc
from ..errors import InputError
from ..io.checkpoint import Checkpoint, input_paths, open_checkpoint
from ..io.outdir import OutputDir, check_apart
from ..io.reader import INDEX_NAME
from ..io.writer import ShardWriter, copy_new, plan_shards, write_new
from ..output import COPIED_FILES as MODEL_FILES
from ..output import claim_output, describe_checkpoint, produce
from ..report import CARD_NAME, REPORT_NAME, Report, now_utc, versions
from ..sizes import parse_size
from .config import MoeConfig, load_moe_config
from .layout import MLP, QKV, Layout, check_inputs, check_model, mlp_name
from .router import gate_vectors

COPIED_FILES = tuple(n for n in MODEL_FILES if n != "config.json")    # the base's; config.json is the MoE's own
CONFIG_COPY = "mergekit_moe_config.yml"
DEGENERATE_COND = 5.0                          # mergekit's warning threshold on a router's condition number


@dataclass
class _Out:
    """One output tensor: its spec and the parts (rows, in order) that make it."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: Callable[[], Iterator[torch.Tensor]]
    nbytes: int                                # bytes read from the inputs for it


def build_moe(config_path: str | Path, out: str | Path, *, device: str = "auto", seed: int = 0,
              shard_size: str | int = "4GB", force: bool = False,
              progress: Callable[[int, int], None] | None = None) -> Report:
    """Build the MoE that ``config_path`` (mergekit-moe's YAML) describes into ``out``.

    Every check and the routers come first, so a refused input writes nothing; ``seed`` is gate_mode random's;
    ``progress(done, total)`` gets the bytes read so far. Returns the report written to ``out``."""
    t_start = time.perf_counter()
    _prepare_process()
    config = load_moe_config(config_path)
    dev = resolve_device(device)
    shard_bytes = parse_size(shard_size, "--shard-size")
    with contextlib.ExitStack() as stack:
        base = _open(stack, config.base_model, "base_model")
        experts = [_open(stack, e.source_model, f"experts[{i}]") for i, e in enumerate(config.experts)]
        experts += [_open(stack, config.shared.source_model, "shared_experts[0]")] if config.shared else []
        check_apart(out, [config.path] + [p for ck in [base, *experts] for p in input_paths(ck)])
        layout = check_inputs(config, base, experts)
        gates = gate_vectors(config, base, layout.n_layers, layout.hidden, dev, seed)   # (L, E (+1), H) fp32
        outs = _outputs(config, base, experts, layout, gates)
        specs = [(o.name, o.dtype, o.shape) for o in outs]
        check_model(layout.out_config, specs, base)
        t_gates = time.perf_counter() - t_start
        shards = plan_shards(specs, shard_bytes)
        extra = [n for n in COPIED_FILES if base.model_dir and (base.model_dir / n).is_file()]
        files = [s.name for s in shards] + ([INDEX_NAME] if len(shards) > 1 else []) + \
            ["config.json", CONFIG_COPY] + extra + [REPORT_NAME, CARD_NAME]
        outdir = claim_output(stack, out, _fingerprint(config, base, experts, seed, shard_bytes), files,
                              resume=False, force=force)

        def side_files(path: Path) -> None:
            write_new(path / "config.json", layout.out_config.to_json_string().encode())
            copy_new(config.path, path / CONFIG_COPY)
            for name in extra:
                copy_new(base.model_dir / name, path / name)
        return produce(outdir, shards, lambda writer: _write(writer, outs, progress), side_files,
                       lambda done: _report(config, base, experts, layout, outdir, shards, outs, gates, seed, dev,
                                            done, {"gates": t_gates, "total": time.perf_counter() - t_start}, files))


def _prepare_process() -> None:
    """As a merge does: freed parts go back to the OS (the heap does not drift with the number of tensors), and a
    file-size limit raises EFBIG, named in one line, instead of killing the process with SIGXFSZ."""
    tune_malloc()
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _open(stack: contextlib.ExitStack, path: str, where: str) -> Checkpoint:
    ck = stack.enter_context(open_checkpoint(path))
    if not isinstance(ck, Checkpoint):
        raise InputError(f"{where} is a LoRA adapter: an MoE expert needs full weights", path=path,
                         hint="merge the adapter into its base first (lowmerge merge BASE ADAPTER -o DIR)")
    return ck


def _outputs(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint], layout: Layout,
             gates: torch.Tensor) -> list[_Out]:
    """Every output tensor in the base's file order, a layer's MLP replaced by its router and stacked experts.
    ``experts``: a checkpoint per ``config.gated``."""
    def dtype_of(ck: Checkpoint, name: str) -> torch.dtype:
        stored = ck.entries[name].dtype
        return layout.out_dtype if layout.out_dtype and ck.entries[name].is_float else stored

    outs: list[_Out] = []
    order = sorted(base.entries.values(), key=lambda e: (str(e.path), e.offset))
    for entry in order:
        m = MLP.match(entry.name)
        if m is None:
            outs.append(_Out(entry.name, dtype_of(base, entry.name), entry.shape, _reader(base, entry.name),
                             entry.nbytes))
            if layout.zero_qkv_bias and QKV.match(entry.name):
                zeros = torch.zeros(entry.shape[0], dtype=dtype_of(base, entry.name))
                outs.append(_Out(entry.name.removesuffix("weight") + "bias", zeros.dtype, (entry.shape[0],),
                                 lambda z=zeros: iter([z]), 0))
        elif m.group(2) == "gate":
            outs += _moe_layer(int(m.group(1)), config, experts, layout, gates, dtype_of(base, entry.name))
    return outs


def _reader(ck: Checkpoint, name: str, scale: float | None = None) -> Callable[[], Iterator[torch.Tensor]]:
    def parts() -> Iterator[torch.Tensor]:
        t = ck.read(name)
        yield t if scale is None else t * scale       # scaled in the stored dtype, as mergekit does
    return parts


def _moe_layer(i: int, config: MoeConfig, experts: list[Checkpoint], layout: Layout, gates: torch.Tensor,
               dtype: torch.dtype) -> list[_Out]:
    n, h, inter = len(config.experts), layout.hidden, layout.intermediate
    p = f"model.layers.{i}.mlp."
    routed = experts[:n]

    def stacked(projs: tuple[str, ...], residual: bool) -> Callable[[], Iterator[torch.Tensor]]:
        def parts() -> Iterator[torch.Tensor]:
            for spec, ck in zip(config.experts, routed):
                for proj in projs:
                    yield from _reader(ck, mlp_name(i, proj), spec.residual_scale if residual else None)()
        return parts

    def nbytes(projs: tuple[str, ...]) -> int:
        return sum(ck.entries[mlp_name(i, q)].nbytes for ck in routed for q in projs)
    outs = [
        _Out(p + "gate.weight", dtype, (n, h), lambda: iter([gates[i, :n].clone()]), 0),
        _Out(p + "experts.gate_up_proj", dtype, (n, 2 * inter, h), stacked(("gate", "up"), False),
             nbytes(("gate", "up"))),
        _Out(p + "experts.down_proj", dtype, (n, h, inter), stacked(("down",), True), nbytes(("down",))),
    ]
    if config.shared is not None:
        ck, scale = experts[n], config.shared.residual_scale
        for q in ("gate", "up", "down"):
            e = ck.entries[mlp_name(i, q)]
            outs.append(_Out(f"{p}shared_expert.{q}_proj.weight", dtype, e.shape,
                             _reader(ck, mlp_name(i, q), scale if q == "down" else None), e.nbytes))
        outs.append(_Out(p + "shared_expert_gate.weight", dtype, (1, h), lambda: iter([gates[i, n:].clone()]), 0))
    return outs


def _write(writer: ShardWriter, outs: list[_Out], progress: Callable[[int, int], None] | None) -> int:
    """Every tensor, part by part, into its shard; returns the bytes read."""
    total, done = sum(o.nbytes for o in outs), 0
    for o in outs:
        for part in o.parts():
            done += part.nbytes if o.nbytes else 0
            writer.write(o.name, part.to(o.dtype))
            if progress:
                progress(done, total)
    return done


def _fingerprint(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint], seed: int, shard_bytes: int) -> dict:
    def files(ck: Checkpoint) -> list:
        return [[f.path, f.size, f.mtime_ns, f.header_sha256] for f in ck.files]
    return {"method": "moe", "config_sha256": hashlib.sha256(config.path.read_bytes()).hexdigest(),
            "base": files(base), "experts": [files(e) for e in experts], "seed": seed, "shard_size": shard_bytes,
            "lowmerge": versions()["lowmerge"]}


def degenerate_layers(gates: torch.Tensor) -> list[int]:
    """Layers whose routers are nearly dependent (condition number above mergekit's 5): prompts too similar."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].double())) > DEGENERATE_COND]


def _report(config: MoeConfig, base: Checkpoint, experts: list[Checkpoint], layout: Layout, outdir: OutputDir,
            shards: list, outs: list[_Out], gates: torch.Tensor, seed: int, dev: torch.device, done: int,
            timings: dict, files: list[str]) -> dict:
    warnings = []
    bad = degenerate_layers(gates)
    if bad:
        warnings.append(f"layers {', '.join(map(str, bad))} have nearly dependent routers (condition number > "
                        f"{DEGENERATE_COND:g}): the experts' prompts may be too similar")
    params = {"gate_mode": config.gate_mode, "experts_per_token": config.experts_per_token}
    if config.gate_mode == "random":
        params["seed"] = seed
    return {
        "lowmerge_version": versions()["lowmerge"], "created": now_utc(), "method": "moe", "params": params,
        "inputs": {"config": str(config.path), "base": describe_checkpoint(base),
                   "experts": [describe_checkpoint(e) for e in experts[:len(config.experts)]],
                   **({"shared_expert": describe_checkpoint(experts[-1])} if config.shared else {})},
        "output": {"dir": str(outdir.path), "architecture": layout.architecture, "experts": len(config.experts),
                   "dtype": str(layout.out_dtype).removeprefix("torch.") if layout.out_dtype else "base",
                   "tensors": len(outs), "shards": [s.name for s in shards], "bytes": sum(s.size for s in shards)},
        "device": str(dev), "bytes_read": done, "timings_s": timings,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(dev)},
        "warnings": warnings, "tensor_stats": {}, "versions": versions(), "files": files,
    }
