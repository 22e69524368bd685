"""mergekit recipes for the methods issue 9 adds, run by lowmerge through the CLI: against mergekit's formula written
out here in fp64, and against mergekit itself where bench/vs_mergekit.py's virtual environment exists."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import reference as ref
from lowmem_merge.demo import LlamaShape, build_example

from conftest import merge_configs, run_cli, run_cli_many

SHAPE = LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)
# deterministic in mergekit too: compared with it. Not arcee_fusion: mergekit computes its KL in the inputs' dtype,
# and in fp32 the KL of rows an expert barely moves carries ~1e-4 relative error, which moves 0.2-1 % of a matrix's
# entries (12-14 % of these 64-row embeddings) across the threshold; lowmerge computes it in fp64, and the formula
# test holds it to the fp64 formula (measured with mergekit 0.1.5: its output is the fp32 formula bit for bit).
SAME_DRAWS = ("breadcrumbs", "breadcrumbs_ties", "model_stock", "slerp", "multislerp", "nuslerp", "sce", "karcher",
              "nearswap")   # deterministic in mergekit too: compared with it
MERGEKIT = Path(__file__).resolve().parent.parent / "bench" / "_work" / "mergekit-venv" / "bin" / "mergekit-yaml"
NEARSWAP_T = 1e-3      # below most |Δ| of build_example's experts, above some: entries cut and entries kept
RECIPES = {   # the form of mergekit's own examples: per-model weight and density, method parameters globally
    "breadcrumbs": {"parameters": {"normalize": False, "lambda": 0.9},    # gamma per model
                    "models": [{"density": 0.6, "weight": 0.7, "gamma": 0.05}, {"density": 0.5, "weight": 0.4,
                               "gamma": 0.02}, {"density": 0.8, "weight": 0.6, "gamma": 0.1}]},
    "breadcrumbs_ties": {"parameters": {"gamma": 0.02, "normalize": True, "rescale": True},
                         "models": [{"density": 0.5, "weight": 1.0}, {"density": 0.5, "weight": 0.5},
                                    {"density": 0.7, "weight": 0.8}]},
    "model_stock": {"parameters": {"filter_wise": False}, "models": [{}, {}, {}]},
    "model_stock_rows": {"merge_method": "model_stock", "parameters": {"filter_wise": True}, "models": [{}, {}, {}]},
    "slerp": {"parameters": {"t": 0.3}, "models": [{}]},
    "multislerp": {"parameters": {}, "models": [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]},
    "nuslerp": {"parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                "models": [{"weight": 0.7}, {"weight": 0.4}]},
    "sce": {"parameters": {"select_topk": 0.3}, "models": [{}, {}, {}]},
    "karcher": {"parameters": {"max_iter": 10, "tol": 1e-5}, "models": [{}, {}, {}]},
    "nearswap": {"parameters": {"t": NEARSWAP_T}, "models": [{}]},
    "arcee_fusion": {"parameters": {}, "models": [{}]},
    "della": {"parameters": {"epsilon": 0.1, "lambda": 0.8},
              "models": [{"density": 0.6, "weight": 0.7}, {"density": 0.5, "weight": 0.4},
                         {"density": 0.7, "weight": 0.6}]},
    "della_linear": {"parameters": {"normalize": True},                  # epsilon per model
                     "models": [{"density": 0.5, "weight": 1.0, "epsilon": 0.2}, {"density": 0.5, "weight": 0.5,
                                "epsilon": 0.1}, {"density": 0.6, "weight": 0.8, "epsilon": 0.3}]},
}


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """fp32 inputs: |Δt| takes distinct values, so the band's edges are never tied and mergekit's sort agrees."""
    root = tmp_path_factory.mktemp("mk")
    base, experts = build_example(root / "in", SHAPE, n_experts=3, dtype=torch.float32)
    return root, base, experts


def recipe_experts(method: str, experts: list[Path]) -> list[Path]:
    return experts[:len(RECIPES[method]["models"])]


def both_tools(recipe: Path, out_mk: Path, out_lm: Path) -> None:
    """mergekit and lowmerge on one recipe: every tensor mergekit writes equal up to fp32 rounding."""
    proc = subprocess.run([str(MERGEKIT), str(recipe), str(out_mk), "--no-copy-tokenizer", "--no-write-model-card",
                           "--quiet"], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_cli("merge", "--config", recipe, "-o", out_lm, "-q", "--device", "cpu", check=True)
    a, b = tensors(out_mk), tensors(out_lm)
    assert set(a) <= set(b)
    for name, x in a.items():
        scale = max(1.0, float(x.abs().max()))
        assert (b[name].double() - x.double()).abs().max() <= 16 * 2 ** -23 * scale, name


def write_recipe(root: Path, method: str, base: Path, experts: list[Path]) -> Path:
    spec = RECIPES[method]
    recipe = {"merge_method": spec.get("merge_method", method), "base_model": str(base), "dtype": "float32",
              "parameters": spec["parameters"],
              "models": [{"model": str(e), **({"parameters": p} if p else {})}
                         for e, p in zip(experts, spec["models"])]}   # zip: slerp takes the first expert only
    path = root / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def formula(method: str, base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    """mergekit's generalized task arithmetic with magnitude_outliers, in fp64 on whole tensors."""
    spec = RECIPES[method]
    glob = spec["parameters"]
    w0 = {k: v.double() for k, v in tensors(base).items()}
    ws = [{k: v.double() for k, v in tensors(e).items()} for e in experts[:len(spec["models"])]]
    weights = [m.get("weight", 1.0) for m in spec["models"]]
    out = {}
    for name, b in w0.items():
        if not b.is_floating_point() or b.dim() == 0:
            continue
        if method == "slerp":
            out[name] = _slerp64(glob["t"], b, ws[0][name])
            continue
        if method == "model_stock":
            out[name] = b + ref.model_stock([w[name] - b for w in ws])
            continue
        if method == "nearswap":
            out[name] = _nearswap64(glob["t"], b, ws[0][name])
            continue
        if method == "arcee_fusion":
            out[name] = _arcee_fusion64(b, ws[0][name])
            continue
        if method == "model_stock_rows":
            out[name] = _model_stock_rows64(b, [w[name] for w in ws])
            continue
        if method == "multislerp":
            out[name] = b + _multislerp64([w[name] - b for w in ws], weights)
            continue
        if method == "karcher":
            out[name] = _karcher64([b] + [w[name] for w in ws], glob["max_iter"], glob["tol"])
            continue
        if method == "sce":
            out[name] = b + _sce64(torch.stack([w[name] - b for w in ws]), glob["select_topk"])
            continue
        if method == "nuslerp":
            t = weights[1] / sum(weights)
            out[name] = b + _nuslerp64(t, ws[0][name] - b, ws[1][name] - b, glob["nuslerp_row_wise"],
                                       glob["nuslerp_flatten"])
            continue
        if method.startswith("della"):
            kept = torch.stack([_magprune(name, t, w[name] - b, m["density"], m.get("epsilon", glob.get("epsilon")))
                                for t, (w, m) in enumerate(zip(ws, spec["models"]))])
        else:
            kept = torch.stack([_l1_rescaled(w[name] - b, ref.breadcrumbs_band(
                w[name] - b, m["density"], m.get("gamma", glob.get("gamma"))), glob.get("rescale", False))
                for w, m in zip(ws, spec["models"])])
        if method in ("breadcrumbs", "della_linear"):
            mixed = sum(wt * k for wt, k in zip(weights, kept))
            if glob.get("normalize", method == "della"):
                mixed = mixed / sum(weights)
        else:
            mixed = ref.ties_weighted(kept, weights, "tensor", glob.get("normalize", method == "della"))
        out[name] = b + glob.get("lambda", 1.0) * mixed
    return out


def _nearswap64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's nearswap: lerp at t/|v0 − v1| (non-finite → 1), clamped to [0, 1]."""
    w = torch.nan_to_num(t / (v0 - v1).abs(), nan=1.0, posinf=1.0, neginf=1.0).clamp(0, 1)
    return w * v1 + (1 - w) * v0


def _arcee_fusion64(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's arcee_fusion (tensors under 10⁶ elements: its quantiles come from the whole sorted tensor)."""
    p = torch.softmax(v1, dim=-1) + 1e-8
    q = torch.softmax(v0, dim=-1) + 1e-8
    importance = (v1 - v0).abs() * (p * torch.log(p / q)).sum(dim=-1).unsqueeze(-1)
    ordered = importance.reshape(-1).sort().values
    q1, median, q3 = (ordered[int(x * (ordered.numel() - 1))] for x in (0.25, 0.5, 0.75))
    mask = (importance >= median + 1.5 * (q3 - q1)).double()
    return v0 + (v1 - v0) * mask


def _slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's slerp of one tensor (its kernel's rows are whole tensors), written out in fp64."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    na, nb = torch.where(na > 1e-8, na, 1.0), torch.where(nb > 1e-8, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum(1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0.0, dot))
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    cb = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
    return (ca * a + cb * b).reshape(v0.shape)


def _model_stock_rows64(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock with filter_wise: true, as its source writes it (rows along the last dimension); NaN
    in the rows where mergekit's clamp of a pair's norm product to 1e-6 binds (lowmerge takes the true cosine there,
    model_stock.py)."""
    shape = w0.shape
    if w0.dim() == 1:
        w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    offsets = [w - w0 for w in ws]
    cos, clamped = [], torch.zeros(w0.shape[:-1], dtype=torch.bool)
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            prod = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            clamped |= prod < 1e-6
            cos.append(((offsets[i] * offsets[j]).sum(-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    out = t * (sum(ws) / n) + (1 - t) * w0
    out[clamped] = float("nan")
    return out.reshape(shape)


def _l1_rescaled(x: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit's rescaled_masked_tensor with the L1 norm (no rescale where either sum is below 1e-7)."""
    before, after = float(x.abs().sum()), float(kept.abs().sum())
    return kept * (before / after) if rescale and before >= 1e-7 and after >= 1e-7 else kept


def _multislerp64(taus: list[torch.Tensor], weight: list[float], eps: float = 1e-8) -> torch.Tensor:
    """mergekit's multislerp as its source writes it (tangent space at the weighted mean, exponential map back)."""
    x = torch.stack(taus).reshape(len(taus), -1)
    w = torch.tensor(weight, dtype=x.dtype)
    w = w / w.sum()
    norms = x.norm(dim=-1, keepdim=True)
    unit = x / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangent = ((unit - (unit * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    tn = tangent.norm() + eps
    result = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * w).sum()
    return result.reshape(taus[0].shape)


def _karcher64(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit's karcher_merge_tensors with α = 1/N, the base first, as its source writes it."""
    alphas = [1 / len(tensors)] * len(tensors)
    norms = [float(x.norm()) for x in tensors]
    units = [x / n if n else torch.zeros_like(x) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = [alphas[i] / sum(alphas[i] for i in valid) for i in valid]
    us = [units[i] for i in valid]
    mean = sum(x * u for x, u in zip(a, us))
    mean = us[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for x, u in zip(a, us):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += x * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = tangent.norm()
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    return sum(x * n for x, n in zip(alphas, norms)) * mean


def _sce64(deltas: torch.Tensor, topk: float) -> torch.Tensor:
    """mergekit's sce as its source writes it: variance top-k mask, energy weights, sign erase, normalized sum."""
    if topk < 1:
        var = torch.var(deltas, dim=0, unbiased=False)
        k = int(topk * int(torch.count_nonzero(var)))
        mask = torch.zeros_like(var)
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k).indices] = 1
        deltas = deltas * mask
    w = torch.tensor([float((d ** 2).sum()) / d.numel() for d in deltas], dtype=deltas.dtype)
    w = w / w.sum() if abs(float(w.sum())) >= 1e-6 else torch.full_like(w, 1 / len(w))   # sce_weight's threshold
    w = w.view(-1, *[1] * (deltas.dim() - 1))
    majority = (deltas.sum(0) >= 0).to(deltas.dtype) * 2 - 1
    erased = w * (deltas.sign() == majority).to(deltas.dtype)
    return (deltas * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


def _nuslerp64(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """mergekit's nuslerp kernel: slerp of the unnormalized vectors along the last dim (after its transposes)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(-1, keepdim=True).clamp(-1, 1))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _magprune(name: str, t: int, x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """mergekit's della_magprune and L1 rescale (rescale: true, its default) with lowmerge's draws."""
    from lowmem_merge.info import TensorClass, TensorInfo
    from lowmem_merge.methods.della import della_blocks
    info = TensorInfo(name, tuple(x.shape), TensorClass.LIN)
    keep = torch.cat([m.reshape(-1) for _, _, m in della_blocks(0, t, info, x.float(), density, epsilon)])
    y = x * keep.reshape(x.shape)
    return y * (x.abs().sum() / y.abs().sum())


@pytest.fixture(scope="module")
def recipe_outputs(models) -> dict[str, Path]:
    """Every RECIPES merge through the CLI, two at a time on two cores: method -> its output directory."""
    root, base, experts = models
    return merge_configs(root, {method: write_recipe(root, method, base, experts) for method in RECIPES})


@pytest.mark.parametrize("method", list(RECIPES))
def test_recipe_matches_mergekits_formula(models, recipe_outputs, method: str) -> None:
    root, base, experts = models
    got = tensors(recipe_outputs[method])
    want = formula(method, base, experts)
    assert want and set(want) <= set(got)
    compared = 0
    for name, w in want.items():
        ok = ~torch.isnan(w)                # NaN: rows the formula marks as not comparable (model_stock_rows)
        compared += int(ok.sum())
        scale = max(1.0, float(w[ok].abs().max())) if bool(ok.any()) else 1.0
        diff = (got[name].double() - w)[ok].abs()
        assert not diff.numel() or diff.max() <= 16 * 2 ** -23 * scale, name
    assert compared > 0.5 * sum(w.numel() for w in want.values())


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
@pytest.mark.parametrize("method", SAME_DRAWS)
def test_recipe_matches_mergekit_itself(models, method: str) -> None:
    root, base, experts = models
    recipe = write_recipe(root, method, base, experts)
    both_tools(recipe, root / f"mk-{method}", root / f"lm-{method}")


@pytest.fixture(scope="module")
def far_expert(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An expert far from the base (independent weights): every tensor takes slerp's spherical branch."""
    root = tmp_path_factory.mktemp("far")
    base, experts = build_example(root / "in", SHAPE, n_experts=1, dtype=torch.float32)
    f = next(experts[0].glob("*.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in load_file(f).items()},
              str(f), metadata={"format": "pt"})
    recipe = root / "slerp.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
                                      "parameters": {"t": 0.3}, "models": [{"model": str(experts[0])}]}))
    return root, base, recipe


def test_slerp_of_far_models_takes_the_spherical_branch(far_expert) -> None:
    root, base, recipe = far_expert
    run_cli("merge", "--config", recipe, "-o", root / "out", "-q", "--device", "cpu", check=True)
    got, w0, w1 = tensors(root / "out"), tensors(base), tensors(next(root.glob("in/expert0")))
    for name, b in w0.items():
        if b.is_floating_point():
            a, c = b.double(), w1[name].double()
            cos = float((a.reshape(-1) @ c.reshape(-1)) / (a.norm() * c.norm()))
            assert abs(cos) < 0.9995, name                                   # not the linear fallback
            want = _slerp64(0.3, a, c)
            assert (got[name].double() - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), name


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
def test_slerp_of_far_models_matches_mergekit_itself(far_expert) -> None:
    root, _, recipe = far_expert
    both_tools(recipe, root / "mk-far", root / "lm-far")


SHAPE3 = LlamaShape(hidden=32, intermediate=48, layers=3, vocab=64, heads=4, kv_heads=2)
GRADIENTS = {   # mergekit's layer gradients and name filters
    "task_arithmetic": {"parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
                        "models": [{"weight": [0.2, 1.0]}, {"weight": 0.7}]},
    "ties": {"parameters": {"normalize": True},
             "models": [{"weight": 1.0, "density": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]},
                        {"weight": [1.0, 0.0, 0.5], "density": 0.4}]},
}


@pytest.fixture(scope="module")
def models3(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("grad")
    base, experts = build_example(root / "in", SHAPE3, n_experts=2, dtype=torch.float32)
    return root, base, experts


def gradient_recipe(root: Path, method: str, base: Path, experts: list[Path]) -> Path:
    spec = GRADIENTS[method]
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": spec["parameters"],
              "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, spec["models"])]}
    path = root / f"grad-{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_layer_gradients_and_filters_follow_mergekits_interpolation(models3) -> None:
    """task_arithmetic with a per-model weight gradient and a filtered λ, against the rule written out: layer i of
    3 sits at t = i/2, so a [0.2, 1.0] gradient gives 0.2, 0.6, 1.0; embeddings and the head take t = 0."""
    root, base, experts = models3
    out = root / "out-grad-ta"
    run_cli("merge", "--config", gradient_recipe(root, "task_arithmetic", base, experts), "-o", out, "-q",
            "--device", "cpu", check=True)
    got, w0 = tensors(out), tensors(base)
    ws = [tensors(e) for e in experts]
    checked = 0
    for name, b in w0.items():
        if not b.is_floating_point():
            continue
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if layer is None else layer / 2
        lam = 0.5 if "mlp" in name else 1.0
        want = b.double() + lam * ((0.2 + 0.8 * t) * (ws[0][name].double() - b.double())
                                   + 0.7 * (ws[1][name].double() - b.double()))
        assert (got[name].double() - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max())), name
        checked += 1
    assert checked > 10


def sliced_recipe(root: Path, base: Path, experts: list[Path]) -> Path:
    """Two slices over the 3 layers: [0, 1) with its own λ, [1, 3) with a weight gradient on its first source."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "parameters": {"lambda": 1.0},
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 1]}]   # mergekit wants the base there
                          + [{"model": str(e), "layer_range": [0, 1], "parameters": {"weight": w}}
                             for e, w in zip(experts, (0.3, 0.6))], "parameters": {"lambda": 0.5}},
                         {"sources": [{"model": str(base), "layer_range": [1, 3]},
                                      {"model": str(experts[0]), "layer_range": [1, 3],
                                       "parameters": {"weight": [0.2, 1.0]}},
                                      {"model": str(experts[1]), "layer_range": [1, 3],
                                       "parameters": {"weight": 0.6}}]}]}
    path = root / "sliced-ta.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_slices_cut_the_layers_with_their_own_parameters_and_t(models3) -> None:
    """mergekit's planner: t runs 0 → 1 inside each slice (a one-layer slice at t = 1), a slice's parameters
    override the recipe's, source parameters the slice's; embeddings take the first slice's parameters, the final
    norm and head the last slice's, both at t = 0 (mergekit 0.1.5)."""
    root, base, experts = models3
    out = root / "out-sliced"
    run_cli("merge", "--config", sliced_recipe(root, base, experts), "-o", out, "-q", "--device", "cpu", check=True)
    got, w0 = tensors(out), tensors(base)
    ws = [tensors(e) for e in experts]
    for name, b in w0.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer == 0 or "embed_tokens" in name:
            lam, w1, w2 = 0.5, 0.3, 0.6
        else:
            t = 0.0 if layer is None else (layer - 1) / 1
            lam, w1, w2 = 1.0, 0.2 + 0.8 * t, 0.6
        want = b.double() + lam * (w1 * (ws[0][name].double() - b.double()) + w2 * (ws[1][name].double() - b.double()))
        assert (got[name].double() - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max())), name


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
def test_slices_match_mergekit_itself(models3) -> None:
    root, base, experts = models3
    both_tools(sliced_recipe(root, base, experts), root / "mk-sliced", root / "lm-sliced")


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
@pytest.mark.parametrize("method", list(GRADIENTS))
def test_layer_gradients_and_filters_match_mergekit_itself(models3, method: str) -> None:
    root, base, experts = models3
    recipe = gradient_recipe(root, method, base, experts)
    both_tools(recipe, root / f"mk-grad-{method}", root / f"lm-grad-{method}")


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_row_chunks_equals_whole_tensors(models, tmp_path, monkeypatch, filter_wise: bool) -> None:
    """The per-tensor prepass sees a tensor chunk by chunk; per-row t must land on the right rows."""
    from lowmem_merge import merge, stream
    root, base, experts = models
    merge(base, experts, tmp_path / "whole", "model_stock", filter_wise=filter_wise)
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)     # every 2-D tensor in row ranges of 3 rows or fewer
    merge(base, experts, tmp_path / "chunks", "model_stock", filter_wise=filter_wise)
    got, want = tensors(tmp_path / "chunks"), tensors(tmp_path / "whole")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-8, msg=name)


def test_nearswap_and_arcee_fusion_cut_part_of_the_task_vector(models) -> None:
    """The recipes above exercise both sides of each rule: some entries kept whole, some cut."""
    root, base, experts = models
    b, e = tensors(base), tensors(experts[0])
    name = "model.layers.0.mlp.down_proj.weight"
    delta = (e[name] - b[name]).abs()
    assert 0.1 < float((delta > NEARSWAP_T).double().mean()) < 0.9
    fused = _arcee_fusion64(b[name].double(), e[name].double()) - b[name].double()
    kept = float((fused != 0).double().mean())
    assert 0.01 < kept < 0.5


def test_one_slice_form_is_the_models_form(models) -> None:
    """mergekit's slerp examples list the models as the sources of one slice over every layer: the same merge."""
    root, base, experts = models
    recipe = {"merge_method": "slerp", "base_model": str(base), "dtype": "float32",
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.7]}, {"value": 0.4}]},
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]},
                                      {"model": str(experts[0]), "layer_range": [0, 2]}]}]}
    sliced = root / "sliced.yaml"
    sliced.write_text(yaml.safe_dump(recipe))
    del recipe["slices"]
    recipe["models"] = [{"model": str(base)}, {"model": str(experts[0])}]
    plain = root / "plain.yaml"
    plain.write_text(yaml.safe_dump(recipe))
    short = root / "short.yaml"
    short.write_text(sliced.read_text().replace("- 2", "- 1"))        # not the whole depth
    *merged, proc = run_cli_many(*(["merge", "--config", path, "-o", root / out, "-q", "--device", "cpu"]
                              for path, out in ((sliced, "out-sliced"), (plain, "out-plain"), (short, "out-bad"))))
    assert all(p.returncode == 0 for p in merged), [p.stderr for p in merged]
    a, b = tensors(root / "out-sliced"), tensors(root / "out-plain")
    assert a and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert proc.returncode == 1 and "cover layers [0, 1], not the base's whole depth [0, 2]" in proc.stderr, proc.stderr
    assert not (root / "out-bad").exists()


# Rules whose statistics are the whole tensor's (norms, angles), gathered by a per-tensor prepass over row chunks.
# Bitwise: every sum is per-row fp64 added by math.fsum (order-free), and the merge itself is elementwise.
FLAT_BITWISE = [("slerp", 1, {"t": 0.3}), ("multislerp", 3, {"weights": (0.5, 0.3, 0.2)}), ("multislerp", 2, {}),
                ("nuslerp", 2, {"weights": (0.3, 0.7)}), ("nuslerp", 2, {"flatten": False}),
                ("sce", 3, {"select_topk": 0.3}), ("sce", 3, {}), ("arcee_fusion", 1, {}), ("karcher", 3, {})]


@pytest.mark.parametrize("method,n,params", FLAT_BITWISE, ids=lambda x: str(x))
def test_tensor_wide_rules_in_row_chunks_equal_whole_tensors_bitwise(models, tmp_path, monkeypatch, method: str,
                                                                    n: int, params: dict) -> None:
    from lowmem_merge import merge, stream
    from lowmem_merge.methods import REGISTRY
    root, base, experts = models
    assert REGISTRY[method].row_chunkable(REGISTRY[method].Params(**params), None)
    merge(base, experts[:n], tmp_path / "whole", method, **params)
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)     # every 2-D tensor in row ranges of 3 rows or fewer
    merge(base, experts[:n], tmp_path / "chunks", method, **params)
    got, want = tensors(tmp_path / "chunks"), tensors(tmp_path / "whole")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
