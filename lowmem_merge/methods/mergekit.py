"""How a rule reads a mergekit recipe: its ``merge_method`` name, its global and per-model parameters with
mergekit's defaults (mergekit's ``parameters()`` / ``tensor_parameters()``), what it does without ``base_model``,
and (``MergeMethod.from_mergekit``) how those values become the rule's Params. recipe.py knows no rule by name.

Shared here: generalized task arithmetic's λ and ``normalize`` (mergekit's ``GeneralizedTaskArithmeticMerge``):
W0 + λ Σ w_t Δ't, divided by Σ w_t with ``normalize``; the electing rules (TIES' sign election) divide by the
weights that agree with the elected sign instead, which the rule does itself (its ``normalize``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError

REQUIRED = None          # a parameter default: the recipe must give it


@dataclasses.dataclass(frozen=True)
class Mergekit:
    """One rule's mergekit schema. Defaults are mergekit 0.1.5's; a default's type is the parameter's type
    (bool, int or float; REQUIRED: a number). ``tensor_parameters`` may also be given under ``parameters``, for
    every model at once.

    ``without_base`` says what a recipe with no base_model means, as mergekit's input contract does: None, the
    rule needs base_model (mergekit's BasePolicy.REQUIRED); "expert", the first model is the reference the task
    vectors are taken against and stays an expert with Δ = 0 (the result does not depend on the reference:
    linear, or ``without_base_params`` switch the rule to the weights themselves); "point", the first model is
    the base, which the rule already counts as one of its points (karcher)."""

    name: str
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    tensor_parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    hints: dict[str, str] = dataclasses.field(default_factory=dict)   # what a REQUIRED parameter means
    base_is_expert: bool = False           # base_model listed under models stays an expert (linear) instead of
                                           # being skipped (mergekit: the base has no task vector)
    without_base: str | None = None        # None | "expert" | "point"
    without_base_params: dict[str, Any] = dataclasses.field(default_factory=dict)


PLURAL = {"density": "densities"}


def plural(key: str) -> str:
    return PLURAL.get(key, key + "s")


def one_or_each(key: str, values: tuple[float, ...]) -> dict[str, Any]:
    """``{key: v}`` when every model has the same value, else ``{plural(key): values}`` (one per expert)."""
    return {key: values[0]} if len(set(values)) == 1 else {plural(key): values}


def per_model(models: list[dict[str, Any]], key: str) -> tuple[float, ...]:
    return tuple(m[key] for m in models)


def task_arithmetic(name: str, glob: dict[str, Any], models: list[dict[str, Any]], *,
                    elects: bool) -> dict[str, Any]:
    """λ and the weights as ``scale`` and ``weights``: with ``normalize`` a rule without election divides λ by
    Σ w_t here; an electing rule gets λ as it is and divides by the agreeing weights itself."""
    weights = per_model(models, "weight")
    total = sum(weights)
    if glob["normalize"] and total == 0 and not elects:
        raise ConfigError(f"merge_method {name!r}: normalize: true divides by the weights' sum, which is 0")
    lam = glob["lambda"]
    return {"scale": lam / total if glob["normalize"] and not elects else lam, "weights": weights}


GTA = {"normalize": False, "lambda": 1.0, "int8_mask": False}   # int8_mask: mergekit's memory option, no effect
WEIGHT_DENSITY = {"weight": 1.0, "density": 1.0}
