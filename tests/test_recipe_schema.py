"""Recipes read through each rule's own mergekit schema (issues 18 and 19): a rule recipe.py has never heard of runs
in a recipe; every method mergekit 0.1.5 runs without base_model runs without it here, with mergekit's numbers (its
formula in fp64 always, mergekit itself where bench/_work's venv exists) and the reference model named in the
report; every mergekit 0.1.5 method and parameter is either declared or refused in one line."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lowmem_merge import merge
from lowmem_merge.errors import ConfigError
from lowmem_merge.methods import REGISTRY, MergeMethod, mergekit_methods
from lowmem_merge.methods.mergekit import REQUIRED, Mergekit
from lowmem_merge.recipe import parse_recipe
from lowmem_merge.demo import build_example

from conftest import merge_configs, run_cli
from test_mergekit_methods import (MERGEKIT, SHAPE, _karcher64, _multislerp64, _nuslerp64, both_tools,
                                   tensors)

# mergekit 0.1.5's registry (mergekit/merge_methods/registry.py), every name a recipe may give
MERGEKIT_015 = ("multislerp", "nearswap", "ram", "ramplus_tl", "sce", "linear", "slerp", "nuslerp", "passthrough",
                "model_stock", "arcee_fusion", "karcher", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
# parameters mergekit 0.1.5 takes that lowmerge refuses in one line (README's method table says why)
REFUSED = {"task_arithmetic": {"rescale", "density"}, "ties": {"rescale"}, "dare_ties": {"rescale"},
           "dare_linear": {"rescale"}}
BASELESS = {   # mergekit's form without base_model: the models themselves interpolated
    "linear": {"parameters": {}, "models": [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]},
    "multislerp": {"parameters": {}, "models": [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]},
    "nuslerp": {"parameters": {}, "models": [{"weight": 0.7}, {"weight": 0.4}]},
    "nuslerp_rows": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                     "models": [{"weight": 0.7}, {"weight": 0.4}]},
    "karcher": {"parameters": {"max_iter": 10, "tol": 1e-5}, "models": [{}, {}, {}]},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("baseless")
    base, experts = build_example(root / "in", SHAPE, n_experts=3, dtype=torch.float32)
    return root, base, experts


def baseless_recipe(root: Path, key: str, experts: list[Path]) -> Path:
    spec = BASELESS[key]
    recipe = {"merge_method": spec.get("merge_method", key), "dtype": "float32", "parameters": spec["parameters"],
              "models": [{"model": str(e), **({"parameters": p} if p else {})}
                         for e, p in zip(experts, spec["models"])]}
    path = root / f"baseless-{key}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def baseless_formula(key: str, experts: list[Path]) -> dict[str, torch.Tensor]:
    """mergekit 0.1.5's rule on the models' weights themselves (no task vectors), in fp64."""
    spec = BASELESS[key]
    ws = [{k: v.double() for k, v in tensors(e).items()} for e in experts[:len(spec["models"])]]
    weights = [m.get("weight", 1.0) for m in spec["models"]]
    glob = spec["parameters"]
    out = {}
    for name, first in ws[0].items():
        if not first.is_floating_point() or first.dim() == 0:
            continue
        xs = [w[name] for w in ws]
        if key == "linear":
            out[name] = sum(w * x for w, x in zip(weights, xs)) / sum(weights)
        elif key == "multislerp":
            out[name] = _multislerp64(xs, weights)
        elif key.startswith("nuslerp"):
            out[name] = _nuslerp64(weights[1] / sum(weights), xs[0], xs[1], glob.get("nuslerp_row_wise", False),
                                   glob.get("nuslerp_flatten", True))
        else:
            out[name] = _karcher64(xs, glob["max_iter"], glob["tol"])
    return out


@pytest.fixture(scope="module")
def baseless_outputs(models) -> dict[str, Path]:
    root, base, experts = models
    return merge_configs(root, {key: baseless_recipe(root, key, experts) for key in BASELESS}, "out-baseless")


@pytest.mark.parametrize("key", list(BASELESS))
def test_baseless_recipe_matches_mergekits_formula(models, baseless_outputs, key: str) -> None:
    root, base, experts = models
    got = tensors(baseless_outputs[key])
    want = baseless_formula(key, experts)
    assert want and set(want) <= set(got)
    for name, w in want.items():
        scale = max(1.0, float(w.abs().max()))
        # fp32 output of W0 + Δ* (W0 the reference model): a few ulps of the weights' scale
        assert float((got[name].double() - w).abs().max()) <= 16 * 2 ** -23 * scale, name


@pytest.mark.parametrize("key", list(BASELESS))
def test_baseless_report_names_the_reference_model(models, baseless_outputs, key: str) -> None:
    root, base, experts = models
    report = json.loads((baseless_outputs[key] / "lowmerge_report.json").read_text())
    notes = [w for w in report["warnings"] if "no base_model" in w]
    assert len(notes) == 1 and str(experts[0]) in notes[0], report["warnings"]


def test_baseless_linear_does_not_depend_on_the_reference(models, tmp_path: Path) -> None:
    """The first model is only the reference: listing the models in another order gives the same weighted mean."""
    root, base, experts = models
    spec = BASELESS["linear"]
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, spec["models"])][::-1]}
    path = tmp_path / "reversed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli("merge", "--config", path, "-o", tmp_path / "out", "-q", "--device", "cpu", check=True)
    got, want = tensors(tmp_path / "out"), baseless_formula("linear", experts)
    for name, w in want.items():
        assert float((got[name].double() - w).abs().max()) <= 16 * 2 ** -23 * max(1.0, float(w.abs().max())), name


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
@pytest.mark.parametrize("key", list(BASELESS))
def test_baseless_recipe_matches_mergekit_itself(models, key: str) -> None:
    root, base, experts = models
    both_tools(baseless_recipe(root, key, experts), root / f"mk-baseless-{key}", root / f"lm-baseless-{key}")


def test_passthrough_of_one_model_needs_no_base_and_copies_it(models, tmp_path: Path) -> None:
    root, base, experts = models
    path = tmp_path / "copy.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": str(experts[1])}]}))
    run_cli("merge", "--config", path, "-o", tmp_path / "out", "-q", check=True)
    got, want = tensors(tmp_path / "out"), tensors(experts[1])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("data,message", [
    ({"merge_method": "ties", "models": [{"model": "a"}, {"model": "b"}]}, "'ties': the recipe has no base_model"),
    ({"merge_method": "ram", "models": [{"model": "a"}, {"model": "b"}]}, "'ram': the recipe has no base_model"),
    ({"merge_method": "passthrough", "models": [{"model": "a", "parameters": {"scale": 0.5}}]},
     "parameter 'scale' is not supported"),
    ({"merge_method": "dare_ties", "base_model": "b", "models": [{"model": "a"}], "parameters": {"rescale": True}},
     "merge_method 'dare_ties': parameter 'rescale' is not supported"),
    ({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a"}],
      "parameters": {"rescale": False}}, "merge_method 'task_arithmetic': parameter 'rescale' is not supported"),
    ({"merge_method": "cabs", "base_model": "b", "models": [{"model": "a"}]}, "unknown merge_method 'cabs'"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}]}, "'slerp' needs parameters: t"),
])
def test_what_lowmerge_lacks_is_refused_naming_it(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert message in err.value.msg and "\n" not in err.value.msg, err.value.msg


def test_every_mergekit_015_method_is_declared_by_one_rule() -> None:
    declared = mergekit_methods()
    assert set(MERGEKIT_015) == set(declared) | {"passthrough"}      # passthrough stacks layers: stack.py
    for name, cls in declared.items():
        assert REGISTRY[cls.name] is cls and cls.mergekit_schema().name == name


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
def test_declarations_match_mergekits_own_registry() -> None:
    """Names, parameters, their defaults and the base policy, read from mergekit 0.1.5's registry itself; what
    lowmerge refuses is listed in REFUSED. mergekit's ``weight`` has no default (a recipe must give it): lowmerge's
    is 1."""
    code = ("import json; from mergekit.merge_methods.registry import registered_methods as r; "
            "print(json.dumps({m.spec.name: [m.spec.contract.base.value, [[p.name, p.scope.value, "
            "None if p.required else p.default] for p in m.spec.parameters]] for m in r()}))")
    proc = subprocess.run([str(MERGEKIT.parent / "python"), "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(theirs) == set(MERGEKIT_015)
    declared = mergekit_methods()
    for name, (base, params) in theirs.items():
        if name == "passthrough":
            continue
        schema = declared[name].mergekit_schema()
        assert (schema.without_base is None) == (base == "required"), name
        refused = REFUSED.get(name, set())
        shared = {p: d for p, scope, d in params if scope == "shared" and p not in refused}
        per_model = {p: d for p, scope, d in params if scope != "shared" and p not in refused}
        assert schema.parameters == shared, name
        assert set(schema.tensor_parameters) == set(per_model), name
        assert all(schema.tensor_parameters[p] == (1.0 if p == "weight" else d) for p, d in per_model.items()), name
        assert not refused & (set(schema.parameters) | set(schema.tensor_parameters)), name


@dataclasses.dataclass(frozen=True)
class PartParams:
    part: float = 0.5
    weights: tuple[float, ...] = ()


class PartOfTheMean(MergeMethod):
    """A rule recipe.py has never heard of: W0 + part · Σ w_t Δt / N."""
    name = "part_of_the_mean_test"
    summary = "a test's rule"
    Params = PartParams
    mergekit = Mergekit("part_of_the_mean", {"part": REQUIRED}, {"weight": 1.0}, hints={"part": "the share kept"})

    def __init__(self, info: Any, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        self.total = delta * self.params.weights[t] if self.total is None else \
            self.total.add_(delta, alpha=self.params.weights[t])

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(self.params.part / self.n_experts)


def test_a_new_rule_with_a_mergekit_name_runs_in_recipes(models, tmp_path: Path, monkeypatch) -> None:
    """Declared and registered, with no edit to recipe.py: parameters, per-model weights and a layer gradient."""
    root, base, experts = models
    monkeypatch.setitem(REGISTRY, PartOfTheMean.name, PartOfTheMean)
    data = {"merge_method": "part_of_the_mean", "base_model": str(base), "dtype": "float32",
            "parameters": {"part": [0.0, 1.0]},          # layer 0 keeps none of the mean, layer 1 all of it
            "models": [{"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (1.0, 2.0, 0.5))]}
    with pytest.raises(ConfigError, match="needs parameters: part"):
        parse_recipe({**data, "parameters": {}})
    recipe = parse_recipe(data)
    assert recipe.method == PartOfTheMean.name and recipe.params == {"part": 0.0, "weights": (1.0, 2.0, 0.5)}
    merge(recipe.base, recipe.experts, tmp_path / "out", recipe.method, schedule=recipe.schedule, **recipe.params)
    got, w0 = tensors(tmp_path / "out"), tensors(base)
    ws = [tensors(e) for e in experts]
    for name, b in w0.items():
        if not b.is_floating_point():
            continue
        part = 1.0 if ".layers.1." in name else 0.0
        mean = sum(w * (x[name].double() - b.double()) for w, x in zip((1.0, 2.0, 0.5), ws)) / 3
        want = b.double() + part * mean
        assert float((got[name].double() - want).abs().max()) <= 16 * 2 ** -23 * max(1.0, float(want.abs().max()))
