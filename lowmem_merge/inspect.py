"""The plan as data, for `lowmerge inspect`: classes, read volume and each method's peak memory, from headers;
with ``stats``, the task-vector diagnostics of one read of the inputs (diagnostics.py)."""
from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .budget import RUNTIME_BYTES, TOKENIZER_RUNTIME_BYTES, largest_piece
from .diagnostics import COND_MAX_DIM, collect_stats
from .io.checkpoint import open_checkpoint
from .output import parse_dtype
from .methods import REGISTRY, parse_params
from .plan import make_plan
from .stream import make_pieces, read_volume, tensor_groups, whole_info
from .vocab import align


def describe_plan(base: str | Path, experts: list[str | Path], dtype: str = "auto", *, stats: bool = False,
                  device: str = "auto", cond_max_dim: int = COND_MAX_DIM,
                  progress: Callable[[int, int], None] | None = None,
                  params: dict[str, dict[str, str]] | None = None) -> dict:
    """What ``merge`` would do with these inputs; raises the same input errors it would, before any work.

    Each method is planned with its defaults, or with ``params[method]`` (``-p KEY=VALUE`` strings) where given.

    ``stats``: also read every merged tensor once on ``device`` and add ``"stats"`` (``diagnostics.collect_stats``).
    """
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(base))
        expert_cks = [stack.enter_context(open_checkpoint(e)) for e in experts]
        vocab = align(base_ck, expert_cks, None)     # another vocabulary: merge's default, the union
        if vocab is not None:
            stack.callback(shutil.rmtree, vocab.files_dir, True)
        plan = make_plan(base_ck, expert_cks, parse_dtype(dtype))
        runtime = RUNTIME_BYTES + (TOKENIZER_RUNTIME_BYTES if vocab is not None else 0)
        counts: Counter = Counter()
        sizes: Counter = Counter()
        for info in plan.tensors:
            counts[info.cls.value] += 1
            sizes[info.cls.value] += plan.entry(info.name).nbytes
        methods = {}
        for name, cls in REGISTRY.items():
            parsed = parse_params(cls, (params or {}).get(name, {}))
            pieces = make_pieces(plan, cls, parsed)
            need, largest = largest_piece(plan, pieces, cls, parsed)
            pre = cls.prepass_for(parsed)
            rounds = pre.rounds if pre is not None and (pre.scope == "model" or any(   # the most any tensor is read
                pre.covers(parsed, whole_info(g)) for g in tensor_groups(pieces))) else 0
            methods[name] = {"peak_bytes": need + runtime, "largest_tensor": largest,
                             "reads": rounds + cls.passes_for(parsed)}
        first = [p for p in make_pieces(plan, REGISTRY["average"], REGISTRY["average"].Params())
                 if p.target == p.info.name]
        data = {
            "base": str(base_ck.path), "experts": [str(e.path) for e in expert_cks],
            "classes": {c: {"count": counts[c], "bytes": sizes[c]} for c in sorted(counts)},
            "bytes_per_pass": read_volume(plan, first, 1), "runtime_bytes": runtime,
            "methods": methods, "warnings": plan.warnings,
            **({"vocabulary": vocab.describe()} if vocab else {}),
            "tensors": [{"name": i.name, "class": i.cls.value, "shape": list(plan.entry(i.name).shape),
                         "dtype": str(plan.out_dtype[i.name]).removeprefix("torch."),
                         **({"transposed": True} if i.transposed else {}),
                         **({"tied_to": i.tied_to} if i.tied_to else {})} for i in plan.tensors],
        }
        if stats:
            data["stats"] = collect_stats(plan, device, cond_max_dim, progress)
        return data
