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
  ram, ramplus_tl  entries one expert alone moves (|Δt| > ε) kept whole, the others averaged over their movers;
                   RAM+ scales each expert's unique entries by 1 + r·clamp(shared/unique, 0, α) → ram, ramplus_tl
Each rule declares this itself (``mergekit = Mergekit(...)``, ``from_mergekit``: methods/mergekit.py); this module
reads the declarations and knows no rule by name. Without base_model, the rules mergekit runs without one (their
``without_base``) take the first model as the reference, named in the report's warnings.
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
from .io.text_files import require_regular
from .methods import REGISTRY, MergeMethod, mergekit_methods
from .methods.mergekit import REQUIRED, Mergekit
from .recipe_yaml import load_yaml
from .schedule import Schedule, SlicedSchedule, evaluate, varies

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "slices", "tokenizer_source", "tokenizer")
MODEL_KEYS = ("model", "parameters")
MODEL_PARAMS = ("weight", "density")
DTYPES = ("float32", "bfloat16", "float16")


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
    notes: tuple[str, ...] = ()        # for the report's warnings (the reference a base-less recipe merges against)


def load_recipe(path: str | Path) -> Recipe:
    import yaml
    require_regular(path, "recipe", ConfigError)
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
    cls = mergekit_methods().get(name)
    if cls is None and name not in REGISTRY:
        raise ConfigError(f"unknown merge_method {name!r}", hint=_methods_hint())
    schema = cls.mergekit_schema() if cls is not None else None
    models, layer_range, cuts = _slice_models(top) if "slices" in top else (top.get("models"), None, None)
    if not isinstance(models, list) or not models:
        raise ConfigError("the recipe needs a non-empty list 'models' (each '- model: PATH')")
    entries = [_model_entry(m, i) for i, m in enumerate(models)]
    base, keep, notes = _base(name, schema, top.get("base_model"), entries)
    entries = [e for e, k in zip(entries, keep) if k]
    if not entries:
        raise ConfigError("the recipe lists no model besides base_model")
    dtype = _dtype(top)
    glob = _mapping(top.get("parameters") or {}, "parameters", None)
    if cuts is not None and schema is None:
        raise ConfigError(f"merge_method {name!r}: slices with their own parameters are mergekit's form",
                          hint="give lowmerge's methods one list of models, or use one slice")
    if schema is None:
        return Recipe(base, [e[0] for e in entries], name, _own(name, glob, entries), dtype,
                      tokenizer_source=_tokenizer_source(top), layer_range=layer_range)
    paths, settings = [e[0] for e in entries], [e[1] for e in entries]
    extra = schema.without_base_params if notes else {}     # base-less: the rule's form for the weights themselves

    def to_params(g: dict, ms: list[dict]) -> dict[str, Any]:
        return {**_mergekit(cls, g, list(zip(paths, ms))), **extra}
    schedule = None
    try:
        if cuts is not None:        # several slices (or one with its own parameters): each tensor its slice's
            schedule = SlicedSchedule([(a, b, Schedule({**glob, **sp}, [m for m, k in zip(ms, keep) if k],
                                                       to_params)) for a, b, sp, ms in cuts])
            _mergekit(cls, *_at_start({**glob, **cuts[0][2]}, entries))
        elif any(varies(v) for p in [glob, *settings] for v in p.values()):
            schedule = Schedule(glob, settings, to_params)
            _mergekit(cls, *_at_start(glob, entries))
        params = schedule.params("", 0.0) if schedule is not None else to_params(glob, settings)
    except ValueError as e:
        raise ConfigError(f"merge_method {name!r}: {e}") from None
    return Recipe(base, paths, cls.name, params, dtype, schedule, tokenizer_source=_tokenizer_source(top),
                  layer_range=layer_range, notes=notes)


def _base(name: str, schema: Mergekit | None, base: Any, entries: list[tuple[str, dict]]
          ) -> tuple[str, list[bool], tuple[str, ...]]:
    """(the base, which models stay experts, notes for the report). A model listed under ``models`` that is the
    base has no task vector and is skipped, as mergekit does, unless the rule counts it (linear). Without
    base_model, a rule that mergekit runs without one takes the first model as the reference: an expert with
    Δ = 0 ("expert"), or the base the rule counts among its points ("point")."""
    if base is not None:
        keep = [schema is None or schema.base_is_expert or _differs(e[0], str(base)) for e in entries]
        return str(base), keep, ()
    if schema is None or schema.without_base is None:
        raise ConfigError(f"merge_method {name!r}: the recipe has no base_model, and {name} merges task vectors "
                          "against a base", hint="base_model: the model the others were fine-tuned from")
    first = entries[0][0]
    keep = [schema.without_base == "expert" or i > 0 for i in range(len(entries))]
    return first, keep, (f"the recipe has no base_model: {name} merged against its first model, {first}, as the "
                         "reference (mergekit's base-less form; the result does not depend on the choice)",)


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
    from .names import layer_of
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


def _mergekit(cls: type[MergeMethod], glob: dict, entries: list[tuple[str, dict]]) -> dict[str, Any]:
    """A mergekit recipe's values as ``cls``'s parameters, through its declared schema: every key declared, every
    value of its declared type, defaults filled in, then ``cls.from_mergekit``."""
    schema = cls.mergekit_schema()
    where = f"merge_method {schema.name!r}"
    _only(glob, tuple(schema.parameters) + tuple(schema.tensor_parameters), f"{where}: parameter")
    for model, p in entries:
        _only(p, tuple(schema.tensor_parameters), f"{where}: model {model}: parameter")
    values = {}
    for key, default in schema.parameters.items():
        if key not in glob and default is REQUIRED:
            hint = schema.hints.get(key)
            raise ConfigError(f"{where} needs parameters: {key}" + (f" ({hint})" if hint else ""))
        values[key] = _typed(glob.get(key, default), default, key, "parameters")
    models = [{key: _typed(p.get(key, glob.get(key, default)), default, key, model)
               for key, default in schema.tensor_parameters.items()} for model, p in entries]
    try:
        params = cls.from_mergekit(values, models)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return params


def _typed(value: Any, default: Any, key: str, where: str) -> Any:
    """``value`` as the type of the declared default (bool, int, float; a REQUIRED parameter is a number)."""
    if isinstance(default, bool):
        return _bool(value, key)
    number = _number(value, key, where)
    return int(number) if isinstance(default, int) else number


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
    mergekit = mergekit_methods()
    own = [n for n, cls in REGISTRY.items() if cls.mergekit_schema() is None]
    return "supported: mergekit's " + ", ".join([*mergekit, "passthrough"]) + "; lowmerge's " + ", ".join(own)
