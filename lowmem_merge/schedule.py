"""Parameters that vary by tensor, as mergekit recipes write them: a list is a gradient over the layers, a list of
``{filter, value}`` picks by tensor name.

mergekit's rules, reproduced: a tensor of layer i of L gets t = i / (L − 1) (t = 1 when L = 1; tensors outside the
layers, embeddings, final norm and head, get t = 0); a list of numbers [v0 … vn] gives the piecewise-linear value
at t·n (booleans and strings take the entry at ⌊t·n⌋); in a list of conditions the first whose ``filter`` is absent,
``*`` or a substring of the tensor's name gives the value (itself a number or a gradient); none: the default.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .names import is_input_embedding

Setting = Any   # a number, bool or string; a list of them; a list of {filter, value}


def layer_t(layer: int | None, n_layers: int) -> float:
    """mergekit's interpolation point for a tensor of layer ``layer`` (None: outside the layers) of ``n_layers``."""
    if layer is None:
        return 0.0
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def evaluate(setting: Setting, name: str, t: float) -> Any:
    """The value of one setting for tensor ``name`` at ``t`` (None: no condition matched)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, (dict, list)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond:
            raise ValueError(f"a list of conditions needs {{filter, value}} entries, got {cond!r}")
        f = cond.get("filter")
        if f is None or f == "*" or (name and str(f) in name):
            return evaluate(cond["value"], name, t)
    return None


def varies(setting: Setting) -> bool:
    return isinstance(setting, (list, dict))


class Schedule:
    """Per-tensor parameters: the recipe's settings evaluated for a tensor, then mapped by ``to_params`` (the same
    mapping a constant recipe goes through) to the method's parameters."""

    def __init__(self, glob: dict[str, Setting], models: list[dict[str, Setting]],
                 to_params: Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.glob = glob
        self.models = models
        self._to_params = to_params

    def for_tensor(self, name: str, layer: int | None, n_layers: int) -> dict[str, Any]:
        """The parameters of tensor ``name``, of layer ``layer`` (None: outside the layers) in a model of
        ``n_layers`` layers, at mergekit's t for it."""
        return self.params(name, layer_t(layer, n_layers))

    def params(self, name: str, t: float) -> dict[str, Any]:
        def resolved(settings: dict[str, Setting]) -> dict[str, Any]:
            values = {k: evaluate(v, name, t) for k, v in settings.items()}
            return {k: v for k, v in values.items() if v is not None}
        return self._to_params(resolved(self.glob), [resolved(m) for m in self.models])

    def describe(self) -> str:
        """What a resumed run must match."""
        return json.dumps({"parameters": self.glob, "models": self.models}, sort_keys=True, default=str)


class SlicedSchedule:
    """mergekit's slices over one model's layers: [first, end) each with its own Schedule (the slice's parameters
    over the recipe's), t running from 0 to 1 inside each slice; tensors before the layers (embeddings) take the
    first slice's parameters, those after them (final norm, head) the last slice's, both at t = 0, as mergekit
    0.1.5's planner does."""

    def __init__(self, slices: list[tuple[int, int, Schedule]]) -> None:
        self.slices = slices

    def for_tensor(self, name: str, layer: int | None, n_layers: int) -> dict[str, Any]:
        if layer is None:
            return (self.slices[0] if is_input_embedding(name) else self.slices[-1])[2].params(name, 0.0)
        for first, end, schedule in self.slices:
            if first <= layer < end:
                return schedule.params(name, (layer - first) / (end - first - 1) if end - first > 1 else 1.0)
        raise ValueError(f"layer {layer} of {name} is in no slice")

    def params(self, name: str, t: float) -> dict[str, Any]:
        return self.slices[0][2].params(name, t)

    def describe(self) -> str:
        return json.dumps([[a, b, json.loads(s.describe())] for a, b, s in self.slices], sort_keys=True)

