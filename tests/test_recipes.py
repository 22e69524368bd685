"""mergekit recipes (``--config``): each output against the formula the recipe defines, in fp64; bad recipes fail."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

import reference as ref
from lowmem_merge.errors import ConfigError
from lowmem_merge.recipe import parse_recipe

from conftest import run_cli, run_cli_many
from test_merge import load_model


def _write(tmp_path: Path, text: str, base: Path, experts: list[Path]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(base=base, e0=experts[0], e1=experts[1], e2=experts[2]))
    return path


def _merge(tmp_path: Path, recipe: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    run_cli("merge", "--config", recipe, "-o", out, "-q", "--device", "cpu", check=True)
    return load_model(out)


def _check(got: dict[str, torch.Tensor], base: Path, experts: list[Path], rule) -> None:
    """W* = W0 + rule(name, [Δ_t]) in fp64, within the fp32 output's rounding plus fp32 accumulation."""
    W0 = load_model(base)
    Ws = [load_model(e) for e in experts]
    assert set(got) == set(W0)
    for name, w0 in W0.items():
        assert got[name].dtype == torch.float32, name
        taus = [W[name].double() - w0.double() for W in Ws]
        want = w0.double() + rule(name, taus)
        bound = 1e-6 * (want.abs() + sum(t.abs() for t in taus)) + 1e-12
        assert bool(((got[name].double() - want).abs() <= bound).all()), name


LINEAR = """\
models:
  - model: {e0}
    parameters:
      weight: 1.0
  - model: {e1}
    parameters:
      weight: 0.5
  - model: {e2}
    parameters:
      weight: 0.25
merge_method: linear
base_model: {base}
dtype: float32
"""


def test_linear_is_the_weighted_mean(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    got = _merge(tmp_path, _write(tmp_path, LINEAR, base, experts))
    _check(got, base, experts, lambda n, taus: ref.weighted_sum(taus, [1.0, 0.5, 0.25]) / 1.75)


TASK_ARITHMETIC = """\
models:
  - model: {base}
  - model: {e0}
    parameters:
      weight: 0.3
  - model: {e1}
    parameters:
      weight: -0.5
merge_method: task_arithmetic
base_model: {base}
parameters:
  lambda: 0.8
dtype: float32
"""


def test_task_arithmetic_is_lambda_times_the_weighted_sum_and_skips_the_base(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    got = _merge(tmp_path, _write(tmp_path, TASK_ARITHMETIC, base, experts))
    _check(got, base, experts[:2], lambda n, taus: 0.8 * ref.weighted_sum(taus, [0.3, -0.5]))


TIES = """\
models:
  - model: {base}
    # no parameters necessary for base model
  - model: {e0}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {e1}
    parameters:
      density: 0.5
      weight: 0.3
  - model: {e2}
    parameters:
      density: 0.7
      weight: 1.0
merge_method: ties
base_model: {base}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""


def test_ties_trims_per_tensor_and_takes_the_weighted_disjoint_mean(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    got = _merge(tmp_path, _write(tmp_path, TIES, base, experts))
    weights, densities = [0.5, 0.3, 1.0], [0.5, 0.5, 0.7]

    def rule(name: str, taus: list[torch.Tensor]) -> torch.Tensor:
        trimmed = torch.stack([ref._top_k(x, k) for x, k in zip(taus, densities)])
        return ref.ties_weighted(trimmed, weights, "tensor", normalize=True)
    _check(got, base, experts, rule)


def test_dare_ties_elects_signs_over_the_dropped_task_vectors(tiny, tmp_path: Path) -> None:
    """mergekit's dare_ties example (normalize false by default): DARE's masks (seed 0, the ones lowmerge draws for
    (expert, tensor)), rescale by 1/K_t, weighted sign election, agreeing sum."""
    from lowmem_merge.info import TensorClass, TensorInfo
    from lowmem_merge.methods.dare import kept_blocks
    base, experts = tiny
    got = _merge(tmp_path, _write(tmp_path, TIES.replace("merge_method: ties", "merge_method: dare_ties")
                                  .replace("normalize: true", "normalize: false"), base, experts))
    weights, densities = [0.5, 0.3, 1.0], [0.5, 0.5, 0.7]

    def rule(name: str, taus: list[torch.Tensor]) -> torch.Tensor:
        info = TensorInfo(name, tuple(taus[0].shape), TensorClass.LIN)
        dropped = [x * torch.cat([m.reshape(-1) for _, _, m in kept_blocks(0, t, info, x, k)]).view(x.shape) / k
                   for t, (x, k) in enumerate(zip(taus, densities))]
        return ref.ties_weighted(torch.stack(dropped), weights, "tensor", normalize=False)
    _check(got, base, experts, rule)


DARE_LINEAR = """\
models:
  - model: {e0}
    parameters:
      weight: 2.0
  - model: {e1}
    parameters:
      weight: 1.0
merge_method: dare_linear
base_model: {base}
parameters:
  normalize: true
dtype: float32
"""


def test_dare_linear_at_full_density_is_the_weighted_mean(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    got = _merge(tmp_path, _write(tmp_path, DARE_LINEAR, base, experts))
    _check(got, base, experts[:2], lambda n, taus: ref.weighted_sum(taus, [2.0, 1.0]) / 3.0)


def test_dare_linear_densities_and_weights_reach_dare() -> None:
    text = DARE_LINEAR.replace("weight: 2.0", "weight: 2.0\n      density: 0.3").replace(
        "weight: 1.0", "weight: 1.0\n      density: 0.6").replace("normalize: true", "normalize: false\n  lambda: 0.5")
    recipe = parse_recipe(yaml.safe_load(text.format(base="b", e0="x", e1="y", e2="z")))
    assert (recipe.base, recipe.experts, recipe.method, recipe.dtype) == ("b", ["x", "y"], "dare", "float32")
    assert recipe.params == {"scale": 0.5, "weights": (2.0, 1.0), "densities": (0.3, 0.6)}


OWN = """\
merge_method: ties
base_model: {base}
models:
  - model: {e0}
  - model: {e1}
parameters:
  trim: global
"""


def test_own_method_with_its_parameters(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    recipe = _write(tmp_path, OWN.replace("ties", "task_arithmetic").replace("trim: global", "scale: 0.25")
                    .replace("model: {e1}", "model: {e1}\n    parameters:\n      weight: 3.0")
                    .replace("model: {e0}", "model: {e0}\n    parameters:\n      weight: 1.0")
                    + "dtype: float32\n", base, experts)
    # task_arithmetic is mergekit's name: λ comes from "lambda"; lowmerge's "scale" is refused there
    proc = run_cli("merge", "--config", recipe, "-o", tmp_path / "o1", "-q")
    assert proc.returncode == 1 and "parameter 'scale' is not supported" in proc.stderr
    recipe.write_text(recipe.read_text().replace("task_arithmetic", "average").replace("scale: 0.25", ""))
    got = _merge(tmp_path, recipe)
    _check(got, base, experts[:2], lambda n, taus: ref.weighted_sum(taus, [1.0, 3.0]) / 4.0)


@pytest.mark.parametrize("text,message", [
    (LINEAR.replace("dtype", "tokenizer:\n  pad_to_multiple_of: 8\ndtype"),
     "tokenizer.pad_to_multiple_of is not supported"),
    (LINEAR.replace("dtype", "tokenizer_source: 3\ndtype"), "must be base, union or a model path"),
    (LINEAR.replace("weight: 0.5", "weight: 0.5\n      gamma: 0.1"), "parameter 'gamma' is not supported"),
    (LINEAR.replace("merge_method: linear", "merge_method: cabs"), "unknown merge_method 'cabs'"),
    ("merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\n",
     "arcee_fusion fuses the base with one expert, not 2"),
    (TIES.replace("base_model: {base}\n", ""), "no base_model"),
    (TIES.replace("density: 0.7", "density: [x, 0.7, 0.1]"), "density must be a number"),
    (TIES.replace("normalize: true", "normalize: true\n  rescale: true"), "parameter 'rescale' is not supported"),
    (TASK_ARITHMETIC.replace("weight: 0.3", "weight: 0.3\n      density: 0.5"), "'density' is not supported"),
    (LINEAR + "parameters:\n  normalize: false\n", "normalize: false and weights summing to 1.75"),
    (LINEAR.replace("float32", "int4"), "dtype 'int4' is not supported"),
])
def test_bad_recipes_fail_with_one_line_naming_the_key(tiny, tmp_path: Path, text: str, message: str) -> None:
    base, experts = tiny
    proc = run_cli("merge", "--config", _write(tmp_path, text, base, experts), "-o", tmp_path / "out")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_config_with_positional_inputs_or_params_is_an_error(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    recipe = _write(tmp_path, LINEAR, base, experts)
    extras = ([base, experts[0]], ["-p", "scale=1"], ["--method", "ties"], ["--dtype", "bfloat16"])
    for proc in run_cli_many(*(["merge", "--config", recipe, "-o", tmp_path / f"out{i}", *extra]
                               for i, extra in enumerate(extras))):
        assert proc.returncode == 1 and proc.stderr.startswith("error: "), proc.stderr


def test_unsupported_key_hint_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipe({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}], "chat_template": "x"})
    assert "'chat_template'" in err.value.msg and "merge_method, base_model, models, parameters, dtype" in err.value.hint
    with pytest.raises(ConfigError) as err:
        parse_recipe({"merge_method": "ties", "base_model": "b", "slices": []})
    assert "slices must be a non-empty list" in err.value.msg


@pytest.mark.parametrize("slices,message", [
    ([[("a", 0, 2), ("b", 0, 2)], [("a", 3, 4), ("b", 3, 4)]], "does not continue at layer 2"),
    ([[("a", 0, 2), ("b", 0, 2)], [("a", 2, 4), ("c", 2, 4)]], "slices[1] lists other models than slices[0]"),
    ([[("a", 0, 2), ("b", 1, 3)]], "the sources take different layer ranges"),
])
def test_slices_that_do_not_cut_the_layers_in_order_are_refused(slices, message: str) -> None:
    data = {"merge_method": "task_arithmetic", "base_model": "a",
            "slices": [{"sources": [{"model": m, "layer_range": [lo, hi]} for m, lo, hi in sl]} for sl in slices]}
    with pytest.raises(ConfigError) as err:
        parse_recipe(data)
    assert message in err.value.msg and "passthrough" in err.value.hint


def test_cli_weights_count_mismatch_names_method_and_counts(tiny, tmp_path: Path) -> None:
    base, experts = tiny
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "out", "-m", "average", "-p", "weights=1,2")
    assert proc.returncode == 1
    assert "method 'average': parameter weights has 2 values for 3 experts" in proc.stderr


def _alias_bomb(base: Path, expert: Path, levels: int = 9) -> str:
    """A valid recipe whose nested aliases stand for 9**levels nodes, in a few hundred bytes ("billion laughs")."""
    lines = ["merge_method: task_arithmetic", f"base_model: {base}", f"models:\n  - model: {expert}",
             "parameters:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_recipe_that_is_a_fifo_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    proc = run_cli("merge", "--config", fifo, "-o", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {fifo}: the recipe is not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["bomb", "merge_method: &a [*a]\n"], ids=["billion-laughs", "recursive"])
def test_alias_bombs_are_refused_before_anything_expands_them(tiny, tmp_path: Path, text: str) -> None:
    base, experts = tiny
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_alias_bomb(base, experts[0]) if text == "bomb" else text)
    assert recipe.stat().st_size < 1000
    proc = run_cli("merge", "--config", recipe, "-o", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {recipe}: the recipe ") and "alias" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
