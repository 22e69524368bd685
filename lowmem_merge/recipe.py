"""mergekit recipes (``--config recipe.yaml``) as a lowmerge merge: (base, experts, method, params, dtype).

mergekit methods both tools share keep mergekit's semantics (W_t: model t, Δt = W_t − W0, w_t its ``weight``,
K_t its ``density``, λ the ``lambda`` parameter, 1 by default):
  linear           Σ w_t W_t / Σ w_t = W0 + Σ w_t Δt / Σ w_t                      → average(weights)
  task_arithmetic  W0 + λ Σ w_t Δt (÷ Σ w_t with normalize: true)                 → task_arithmetic(scale, weights)
  ties             per-tensor top-K_t trim, weighted sign election, Σ w_t Δt / Σ w_t over the agreeing entries
                   (normalize: true, the default)                                 → ties(trim=tensor, weights, ...)
  dare_linear      W0 + λ Σ w_t (m_t ⊙ Δt) / K_t (÷ Σ w_t with normalize: true)    → dare(scale, weights, densities)
  dare_ties        DARE's drop and rescale, then ties' election and agreeing sum
                   (÷ agreeing Σ w_t with normalize: true; false by default)       → dare_ties(scale, weights, ...)
  breadcrumbs      per tensor, drop the γ largest and the smallest |Δt|, keeping K in between; W0 + λ Σ w_t Δ't
                   (÷ Σ w_t with normalize: true; false by default)                 → breadcrumbs(scale, gamma, ...)
  breadcrumbs_ties breadcrumbs' band, then ties' election and agreeing sum        → breadcrumbs_ties(gamma, ...)
  model_stock      W0 + t·mean(Δt), t from the mean pairwise cosine of the Δt     → model_stock
  slerp            spherical interpolation of each whole tensor, base_model at t = 0, the other at t = 1 → slerp(t)
  multislerp       the task vectors' normalized weighted mean direction × Σ w_t ‖Δt‖ per tensor → multislerp
  nuslerp          SLERP of two task vectors at t = w_1/(w_0 + w_1), per tensor/row/column → nuslerp
  sce              top-variance selection, energy weights per expert, minority signs erased → sce(select_topk)
  karcher          Karcher mean on the sphere of base_model's and the models' weights × their mean norm → karcher
  della            MAGPRUNE (keep probability by magnitude rank in the row), L1 rescale, ties' election and agreeing
                   sum (÷ agreeing Σ w_t with normalize: true, the default)        → della(scale, epsilon, ...)
  della_linear     the same drop and rescale, then λ Σ w_t Δ't (÷ Σ w_t with normalize) → della_linear(scale, ...)
  passthrough      ``slices`` of one source each, stacked: layer ranges of one or more models → stack.stack
  nearswap         base_model and one model: W0 + clamp(Δ, −t, t) (mergekit's lerp at min(1, t/|Δ|)) → nearswap(t)
  arcee_fusion     base_model and one model: Δ kept where |Δ|·KL(row softmaxes) ≥ median + 1.5 IQR → arcee_fusion
Any method may take ``slices`` that cut the base's layers in order, each slice's sources over its own range, with
per-slice ``parameters`` (SlicedSchedule); ``tokenizer_source`` / ``tokenizer.source`` pick the output vocabulary.
A model listed under ``models`` that is the base has no task vector and is skipped, as mergekit does, except in
linear, where it is an expert with Δ = 0 and counts with its weight. lowmerge's own methods are accepted by name,
with their parameters under ``parameters`` and per-model ``weight`` / ``density`` where the rule has per-expert ones.
Anything else is a ConfigError naming it: a recipe never merges differently from what it says.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .methods import REGISTRY
from .recipe_yaml import load_yaml
from .schedule import Schedule, SlicedSchedule, evaluate, varies

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "slices", "tokenizer_source", "tokenizer")
MODEL_KEYS = ("model", "parameters")
MODEL_PARAMS = ("weight", "density")
DTYPES = ("float32", "bfloat16", "float16")
# mergekit method -> (its global parameters, per-model parameters, normalize default)
MERGEKIT = {
    "linear": (("normalize",), ("weight",), True),
    "task_arithmetic": (("normalize", "lambda", "int8_mask"), ("weight",), False),
    "ties": (("normalize", "lambda", "int8_mask"), ("weight", "density"), True),
    "dare_linear": (("normalize", "lambda", "int8_mask"), ("weight", "density"), False),
    "dare_ties": (("normalize", "lambda", "int8_mask"), ("weight", "density"), False),
    "breadcrumbs": (("normalize", "lambda", "int8_mask", "rescale"), ("weight", "density", "gamma"), False),
    "breadcrumbs_ties": (("normalize", "lambda", "int8_mask", "rescale"), ("weight", "density", "gamma"), False),
    "della": (("normalize", "lambda", "int8_mask", "rescale"), ("weight", "density", "epsilon"), True),
    "della_linear": (("normalize", "lambda", "int8_mask", "rescale"), ("weight", "density", "epsilon"), False),
    "model_stock": (("filter_wise",), (), False),
    "slerp": (("t",), (), False),
    "multislerp": (("normalize_weights", "eps"), ("weight",), False),
    "nuslerp": (("nuslerp_flatten", "nuslerp_row_wise"), ("weight",), False),
    "sce": (("select_topk", "int8_mask"), (), False),
    "karcher": (("max_iter", "tol"), (), False),
    "nearswap": (("t",), (), False),
    "arcee_fusion": ((), (), False),
}
ELECTING = ("ties", "dare_ties", "breadcrumbs_ties", "della")  # normalize divides by the agreeing weights, inside the rule


@dataclasses.dataclass(frozen=True)
class Recipe:
    base: str
    experts: list[str]
    method: str
    params: dict[str, Any]  # values for parse_params: numbers, bools, strings, tuples
    dtype: str              # "auto" when the recipe gives none
    schedule: Schedule | None = None   # per-tensor parameters (gradients, filters); params: at t = 0
    slices: list | None = None         # passthrough: stack.Slice per output layer range (base, experts unused)
    tokenizer_source: str | None = None  # base, union or a model path (vocab.py); None: merge()'s default
    layer_range: tuple[int, int] | None = None  # a one-slice recipe's range: the base's whole depth (checked)


def load_recipe(path: str | Path) -> Recipe:
    import yaml
    try:
        data = load_yaml(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the recipe: {e.strerror}", path=path) from None
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        raise ConfigError(f"the recipe is not valid YAML: {e}".split("\n")[0], path=path,
                          hint="fix the YAML (mergekit recipe syntax)") from None
    except ConfigError as e:
        e.path = str(path)
        raise
    try:
        return parse_recipe(data)
    except ConfigError as e:
        e.path = e.path or str(path)
        raise


def parse_recipe(data: Any) -> Recipe:
    """A parsed YAML document → Recipe; every key is either used or a ConfigError."""
    top = _mapping(data, "the recipe", TOP_KEYS)
    name = top.get("merge_method")
    if name is None:
        raise ConfigError("the recipe has no merge_method", hint=_methods_hint())
    if name == "passthrough":
        return _passthrough(top)
    if name not in MERGEKIT and name not in REGISTRY:
        raise ConfigError(f"unknown merge_method {name!r}", hint=_methods_hint())
    models, layer_range, cuts = _slice_models(top) if "slices" in top else (top.get("models"), None, None)
    if not isinstance(models, list) or not models:
        raise ConfigError("the recipe needs a non-empty list 'models' (each '- model: PATH')")
    base = top.get("base_model")
    if base is None:
        hint = ("for linear any of the models works as base_model: the weighted mean does not depend on it"
                if name == "linear" else "base_model: the model the others were fine-tuned from")
        raise ConfigError(f"merge_method {name!r}: the recipe has no base_model, and lowmerge merges task vectors "
                          "against a base", hint=hint)
    entries = [_model_entry(m, i) for i, m in enumerate(models)]
    keep = [name == "linear" or name not in MERGEKIT or _differs(e[0], str(base)) for e in entries]
    entries = [e for e, k in zip(entries, keep) if k]       # mergekit: the base has no task vector
    if not entries:
        raise ConfigError("the recipe lists no model besides base_model")
    dtype = _dtype(top)
    glob = _mapping(top.get("parameters") or {}, "parameters", None)
    schedule = None
    if cuts is not None and name not in MERGEKIT:
        raise ConfigError(f"merge_method {name!r}: slices with their own parameters are mergekit's form",
                          hint="give lowmerge's methods one list of models, or use one slice")
    if name in MERGEKIT:
        paths, settings = [e[0] for e in entries], [e[1] for e in entries]

        def to_params(g: dict, ms: list[dict]) -> dict[str, Any]:
            return _mergekit(name, g, list(zip(paths, ms)))[1]
        if cuts is not None:        # several slices (or one with its own parameters): each tensor its slice's
            schedule = SlicedSchedule([(a, b, Schedule({**glob, **sp}, [m for m, k in zip(ms, keep) if k],
                                                       to_params)) for a, b, sp, ms in cuts])
            try:
                method, _ = _mergekit(name, *_at_start({**glob, **cuts[0][2]}, entries))
                params = schedule.params("", 0.0)
            except ValueError as e:
                raise ConfigError(f"merge_method {name!r}: {e}") from None
        elif any(varies(v) for p in [glob, *settings] for v in p.values()):
            schedule = Schedule(glob, settings, to_params)
            try:
                method, _ = _mergekit(name, *_at_start(glob, entries))
                params = schedule.params("", 0.0)
            except ValueError as e:
                raise ConfigError(f"merge_method {name!r}: {e}") from None
        else:
            method, params = _mergekit(name, glob, entries)
    else:
        method, params = name, _own(name, glob, entries)
    return Recipe(str(base), [e[0] for e in entries], method, params, dtype, schedule,
                  tokenizer_source=_tokenizer_source(top), layer_range=layer_range)


def _slice_models(top: dict) -> tuple[list, tuple[int, int], list | None]:
    """mergekit's slices for a merge of whole models: the slices cut the base's layers in order ([0, a), [a, b), ...,
    ending at its depth: ``check_layer_range``), every slice lists the same models, all of a slice's sources take
    the slice's own range. Returns the models (the first slice's sources), the whole range, and per slice
    (first, end, its parameters, each source's parameters) when there are several slices or slice parameters
    (None: the models form as it is)."""
    if top.get("models"):
        raise ConfigError("give either slices or models, not both")
    raw = top["slices"]
    hint = ("lowmerge merges layer i of every model into layer i: slices cut the base's layers in order and every "
            "source of a slice takes that slice's range; to stack or reorder layers use merge_method: passthrough")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices must be a non-empty list of {sources: [{model, layer_range}], parameters}")
    cuts, models, start = [], None, 0
    for k, entry in enumerate(raw):
        entry = _mapping(entry, f"slices[{k}]", ("sources", "parameters"))
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"slices[{k}] needs sources: [{{model, layer_range}}, ...]")
        ranges, these = set(), []
        for i, src in enumerate(sources):
            src = _mapping(src, f"slices[{k}].sources[{i}]", ("model", "layer_range", "parameters"))
            rng = src.get("layer_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in rng)):
                raise ConfigError(f"slices[{k}].sources[{i}] needs layer_range: [first, end]")
            ranges.add(tuple(rng))
            these.append({key: v for key, v in src.items() if key != "layer_range"})
        if len(ranges) != 1:
            raise ConfigError(f"slices[{k}]: the sources take different layer ranges {sorted(ranges)}", hint=hint)
        first, end = ranges.pop()
        if first != start or end <= first:
            raise ConfigError(f"slices[{k}]: layer_range [{first}, {end}] does not continue at layer {start}",
                              hint=hint)
        names = [m.get("model") for m in these]
        if models is not None and names != [m.get("model") for m in models]:
            raise ConfigError(f"slices[{k}] lists other models than slices[0]", hint=hint)
        models = models or these
        cuts.append((first, end, _mapping(entry.get("parameters") or {}, f"slices[{k}].parameters", None),
                     [_mapping(m.get("parameters") or {}, f"slices[{k}].sources", None) for m in these]))
        start = end
    several = len(cuts) > 1 or bool(cuts[0][2])
    return models, (0, start), cuts if several else None


def check_layer_range(recipe: Recipe) -> None:
    """A slices recipe's layer ranges must end at the base's depth."""
    if recipe.layer_range is None:
        return
    from .io.checkpoint import open_checkpoint
    from .schedule import layer_of
    with open_checkpoint(recipe.base) as ck:
        depth = 1 + max((i for i in map(layer_of, ck.entries) if i is not None), default=-1)
    if tuple(recipe.layer_range) != (0, depth):
        raise ConfigError(f"the slices cover layers {list(recipe.layer_range)}, not the base's whole depth "
                          f"[0, {depth}]", hint=f"lowmerge merges whole models: let the slices end at layer {depth}, "
                          "or stack layers with merge_method: passthrough")


def _passthrough(top: dict) -> Recipe:
    """Layer stacking: ``slices`` of one source each (``model``, ``layer_range: [first, end)``), or one model whole."""
    from .stack import Slice
    dtype = _dtype(top)
    if top.get("parameters"):
        raise ConfigError("merge_method 'passthrough' takes no parameters")
    if _tokenizer_source(top) is not None:
        raise ConfigError("merge_method 'passthrough' keeps the first slice's tokenizer: tokenizer_source is not "
                          "supported there", hint="drop tokenizer_source")
    if "slices" in top and top.get("models"):
        raise ConfigError("give either slices or models, not both")
    if "slices" not in top:
        models = top.get("models")
        if not isinstance(models, list) or len(models) != 1:
            raise ConfigError("merge_method 'passthrough' copies one model: give one entry under models, or slices")
        model, params = _model_entry(models[0], 0)
        _only(params, (), "merge_method 'passthrough': model parameter")
        return Recipe(model, [model], "passthrough", {}, dtype, slices=[Slice(model)])
    raw = top["slices"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices must be a non-empty list of {sources: [{model, layer_range}]}")
    slices = []
    for i, entry in enumerate(raw):
        sources = _mapping(entry, f"slices[{i}]", ("sources",)).get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise ConfigError(f"slices[{i}]: passthrough takes exactly one source per slice",
                              hint="merging several sources inside a slice is not supported")
        src = _mapping(sources[0], f"slices[{i}].sources[0]", ("model", "layer_range"))
        rng = src.get("layer_range")
        if not isinstance(src.get("model"), str) or not (isinstance(rng, list) and len(rng) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in rng)):
            raise ConfigError(f"slices[{i}].sources[0] needs model: PATH and layer_range: [first, end]")
        slices.append(Slice(src["model"], rng[0], rng[1]))
    models = list(dict.fromkeys(s.model for s in slices))
    return Recipe(models[0], models, "passthrough", {}, dtype, slices=slices)


def _tokenizer_source(top: dict) -> str | None:
    """mergekit's ``tokenizer_source: base|union|MODEL``, or its newer ``tokenizer: {source: ...}``."""
    if "tokenizer_source" in top and "tokenizer" in top:
        raise ConfigError("give either tokenizer_source or tokenizer, not both")
    source = top.get("tokenizer_source")
    if "tokenizer" in top:
        block = _mapping(top["tokenizer"], "tokenizer", ("source", "tokens", "pad_to_multiple_of"))
        for key in ("tokens", "pad_to_multiple_of"):
            if key in block:
                raise ConfigError(f"tokenizer.{key} is not supported", hint="lowmerge takes tokenizer.source: the "
                                  "base's rows for tokens it has, the mean base row for tokens only experts add")
        source = block.get("source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"tokenizer source {source!r} must be base, union or a model path")
    return source


def _dtype(top: dict) -> str:
    dtype = top.get("dtype", "auto")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported", hint="supported: " + ", ".join(DTYPES))
    return dtype


def _at_start(glob: dict, entries: list[tuple[str, dict]]) -> tuple[dict, list[tuple[str, dict]]]:
    """The settings at t = 0 for no tensor in particular: enough to name the method and check the keys."""
    def first(settings: dict) -> dict:
        return {k: v for k, v in ((k, evaluate(v, "", 0.0)) for k, v in settings.items()) if v is not None}
    return first(glob), [(m, first(p)) for m, p in entries]


def _mergekit(name: str, glob: dict, entries: list[tuple[str, dict]]) -> tuple[str, dict[str, Any]]:
    allowed, per_model, normalize_default = MERGEKIT[name]
    _only(glob, allowed + per_model, f"merge_method {name!r}: parameter")
    for model, p in entries:
        _only(p, per_model, f"merge_method {name!r}: model {model}: parameter")
    if name in ("slerp", "nearswap", "arcee_fusion") and len(entries) != 1:
        raise ConfigError(f"merge_method {name!r} combines base_model with one other model, not {len(entries)}",
                          hint="list base_model and one more model under models")
    if name in ("slerp", "nearswap"):
        if "t" not in glob:
            what = "0 gives base_model, 1 the other model" if name == "slerp" else "the largest move kept"
            raise ConfigError(f"merge_method {name!r} needs parameters: t ({what})")
        return name, {"t": _number(glob["t"], "t", "parameters")}
    if name == "arcee_fusion":
        return name, {}
    if name == "karcher":
        return "karcher", {"max_iter": int(_number(glob.get("max_iter", 10), "max_iter", "parameters")),
                           "tol": _number(glob.get("tol", 1e-5), "tol", "parameters")}
    if name == "sce":
        return "sce", {"select_topk": _number(glob.get("select_topk", 1.0), "select_topk", "parameters")}
    if name == "model_stock":
        return "model_stock", {"filter_wise": _bool(glob.get("filter_wise", False), "filter_wise")}
    weights = tuple(_number(p.get("weight", glob.get("weight", 1.0)), "weight", m) for m, p in entries)
    if name == "multislerp":
        return "multislerp", {"weights": weights, "eps": _number(glob.get("eps", 1e-8), "eps", "parameters"),
                              "normalize_weights": _bool(glob.get("normalize_weights", True), "normalize_weights")}
    if name == "nuslerp":
        if len(entries) != 2:
            raise ConfigError(f"merge_method 'nuslerp' interpolates between two models besides base_model, "
                              f"not {len(entries)}")
        return "nuslerp", {"weights": weights, "flatten": _bool(glob.get("nuslerp_flatten", True), "nuslerp_flatten"),
                           "row_wise": _bool(glob.get("nuslerp_row_wise", False), "nuslerp_row_wise")}
    densities = tuple(_number(p.get("density", glob.get("density", 1.0)), "density", m) for m, p in entries)
    normalize = _bool(glob.get("normalize", normalize_default), "normalize")
    lam = _number(glob.get("lambda", 1.0), "lambda", "parameters")
    total = sum(weights)
    if name == "linear":
        if not normalize and abs(total - 1) > 1e-6:
            raise ConfigError(f"merge_method 'linear' with normalize: false and weights summing to {total:g} "
                              "scales the base weights themselves (Σ w_t W_t), which a task-vector merge cannot express",
                              hint="use normalize: true, weights summing to 1, or task_arithmetic")
        return "average", {"weights": weights}
    if normalize and total == 0 and name not in ELECTING:
        raise ConfigError(f"merge_method {name!r}: normalize: true divides by the weights' sum, which is 0")
    scale = lam / total if normalize and name not in ELECTING else lam
    if name == "task_arithmetic":
        return "task_arithmetic", {"scale": scale, "weights": weights}
    params = {"scale": scale, "weights": weights, **_one_or_each("density", densities)}
    if name == "ties":
        return "ties", {**params, "trim": "tensor", "normalize": normalize}
    if name == "dare_ties":
        return "dare_ties", {**params, "normalize": normalize}
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        return name, {**params, **_breadcrumbs_params(name, glob, entries, normalize)}
    if name in ("della", "della_linear"):
        return name, {**params, **_della_params(name, glob, entries, normalize)}
    return "dare", params


def _della_params(name: str, glob: dict, entries: list[tuple[str, dict]], normalize: bool) -> dict[str, Any]:
    """ε (mergekit: per model, 0.15 by default), one for all or one per model; rescale defaults to true."""
    epsilons = tuple(_number(p.get("epsilon", glob.get("epsilon", 0.15)), "epsilon", m) for m, p in entries)
    return {**_one_or_each("epsilon", epsilons), "rescale": _bool(glob.get("rescale", True), "rescale"),
            **({"normalize": normalize} if name == "della" else {"normalize": False})}


def _one_or_each(key: str, values: tuple[float, ...]) -> dict[str, Any]:
    """``{key: v}`` when every model has the same value, else ``{key + "s": values}`` (one per expert)."""
    plural = {"density": "densities"}.get(key, key + "s")
    return {key: values[0]} if len(set(values)) == 1 else {plural: values}


def _breadcrumbs_params(name: str, glob: dict, entries: list[tuple[str, dict]], normalize: bool) -> dict[str, Any]:
    """γ (mergekit: per model, 0.01 by default), one for all or one per model; rescale false by default."""
    gammas = tuple(_number(p.get("gamma", glob.get("gamma", 0.01)), "gamma", m) for m, p in entries)
    return {**_one_or_each("gamma", gammas), "rescale": _bool(glob.get("rescale", False), "rescale"),
            **({"normalize": normalize} if name == "breadcrumbs_ties" else {})}


def _own(name: str, glob: dict, entries: list[tuple[str, dict]]) -> dict[str, Any]:
    """lowmerge's own method: ``parameters`` as -p would give them; per-model weight/density → weights/densities."""
    fields = {f.name for f in dataclasses.fields(REGISTRY[name].Params)}
    params = dict(glob)
    for key, plural in (("weight", "weights"), ("density", "densities")):
        given = [p for _, p in entries if key in p]
        if not given:
            continue
        if plural not in fields:
            raise ConfigError(f"merge_method {name!r} has no per-expert {key}",
                              hint=f"per-model parameters of {name}: " + (", ".join(
                                  k for k, pl in (("weight", "weights"), ("density", "densities")) if pl in fields)
                                  or "none"))
        if plural in params or len(given) != len(entries):
            raise ConfigError(f"merge_method {name!r}: give {key} for every model, or {plural} under parameters, "
                              "not both")
        params[plural] = tuple(_number(p[key], key, m) for m, p in entries)
    for model, p in entries:
        _only(p, MODEL_PARAMS, f"merge_method {name!r}: model {model}: parameter")
    return params  # parse_params checks the names and values against the rule's Params


def _model_entry(entry: Any, i: int) -> tuple[str, dict]:
    m = _mapping(entry, f"models[{i}]", MODEL_KEYS)
    if not isinstance(m.get("model"), str):
        raise ConfigError(f"models[{i}] has no 'model: PATH'")
    return m["model"], _mapping(m.get("parameters") or {}, f"models[{i}].parameters", None)


def _mapping(value: Any, where: str, keys: tuple[str, ...] | None) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values")
    if keys is not None:
        _only(value, keys, f"{where}: key")
    return value


def _only(given: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise ConfigError(f"{what} {unknown[0]!r} is not supported",
                          hint="supported: " + (", ".join(allowed) or "none"))


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {key} must be a number, not {value!r}",
                          hint="a number, a list of numbers (a gradient over the layers), or a list of "
                               "{filter, value} for mergekit's methods")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"parameters: {key} must be true or false, not {value!r}")
    return value


def _differs(a: str, b: str) -> bool:
    return os.path.normpath(a) != os.path.normpath(b)


def _methods_hint() -> str:
    own = [n for n in REGISTRY if n not in MERGEKIT]
    return "supported: mergekit's " + ", ".join(MERGEKIT) + "; lowmerge's " + ", ".join(own)
