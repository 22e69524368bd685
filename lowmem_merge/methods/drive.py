"""The one loop that runs a merge rule over its experts' task vectors: the stream, the in-memory references of
the tests and ``inspect --stats`` all go through it, so none can run a rule with another number of passes."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..info import TensorInfo
from .base import MergeMethod


def drive(method: type[MergeMethod], params: Any, info: TensorInfo, n_experts: int,
          delta: Callable[[int, int], Any], state: Any = None, *, base: torch.Tensor | None = None,
          buffers: Any = None, added: Callable[[Any], None] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Δ* and the rule's statistics for one tensor (or row range of one).

    ``delta(pass_, t)`` gives expert t's Δ for each of ``method.passes_for(params)`` passes, in order; ``state`` is
    the prepass' (see :func:`gather`); ``base`` (W0, oriented as Δ) is required by rules with ``needs_base``;
    ``added(Δ)`` is told when the rule is done with a Δ (the stream reuses its buffer).
    """
    m = method(info, n_experts, params, state, base=base if method.needs_base else None, buffers=buffers)
    for pass_ in range(method.passes_for(params)):
        for t in range(n_experts):
            d = delta(pass_, t)
            m.add(t, d, pass_)
            if added is not None:
                added(d)
            del d       # not held through finalize: the plan prices Δ and the result, never both at once
    return m.finalize(), m.stats()


def gather(method: type[MergeMethod], params: Any, n_experts: int,
           tensors: Callable[[], Iterable[tuple[TensorInfo, list[torch.Tensor]]]], *,
           base_of: Callable[[TensorInfo], torch.Tensor] | None = None) -> Any:
    """The prepass' state from every round over ``tensors()`` (each tensor's Δs, in expert order), or None when the
    rule has no prepass. ``base_of(info)`` gives W0 (oriented as Δ) to the prepasses of rules with ``needs_base``.
    In memory: the stream reads its rounds from disk (``stream.run_prepass``)."""
    if method.needs_base and base_of is None:
        raise ValueError(f"{method.name} reads the base weights: gather() needs base_of=")
    prepass = method.prepass_for(params)
    if prepass is None:
        return None
    pre = prepass(n_experts, params)
    for round_ in range(pre.rounds):
        for info, deltas in tensors():
            pre.base = base_of(info) if method.needs_base else None
            for t, d in enumerate(deltas):
                pre.observe(round_, info, t, d)
            pre.base = None
        pre.end_round(round_)
    return pre.state()
