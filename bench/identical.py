"""Byte-identical output before and after a change: the same `lowmerge` commands, run with this tree and with REV.

    python bench/identical.py --against 203ac45

Builds small real models in a temporary directory (tests/' helpers: demo checkpoints, PEFT adapters, experts with
another vocabulary), checks REV out as a detached worktree, and runs every case as a real subprocess
(`python -m lowmem_merge ...`, CPU, OMP_NUM_THREADS=1) twice: with PYTHONPATH at this tree and at REV's (each
run first proves which code it imports). Every output file must have the same sha256; the report JSON and the
model card are compared after dropping timings, memory, dates and absolute paths; commands that print (`methods`,
`--help`, `inspect`) must print the same. One line per case; exit status 1 on any difference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(HERE), str(HERE / "tests")]

from lowmem_merge.demo import LlamaShape, build_example  # noqa: E402

TINY = LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)        # tests/conftest.py
THREE = LlamaShape(hidden=32, intermediate=48, layers=3, vocab=64, heads=4, kv_heads=2)       # test_mergekit_methods
DIST = LlamaShape(hidden=64, intermediate=96, layers=3, vocab=128, heads=4, kv_heads=2)       # test_distributed
BNB = LlamaShape(hidden=64, intermediate=128, layers=2, vocab=128, heads=4, kv_heads=2)       # test_quantize
STACK = LlamaShape(hidden=32, intermediate=48, layers=4, vocab=64, heads=4, kv_heads=2)       # test_stack
FIXED_EXPERTS = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}
REPORT, CARD = "lowmerge_report.json", "README.md"
VOLATILE = {"created", "timings_s", "memory", "peak_rss_bytes", "peak_device_bytes"}   # differ in any two runs


@dataclass
class Case:
    name: str
    args: list[str]                 # after `python -m lowmem_merge` (or torchrun's); "{out}" is the output dir
    torchrun: int = 0               # processes under torch.distributed.run; 0: one plain process
    output: bool = True             # writes {out}; False: only its stdout is compared
    result: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- inputs (built once, with this tree's helpers)

def _calib_texts(base: Path, where: Path, n: int) -> list[Path]:
    """test_lora's: the word-level tokenizer of test_calibrated in ``base``, one text file per task."""
    from test_lora import calibration_files
    return calibration_files(base, where, n)


def _lora(root: Path) -> tuple[Path, list[Path]]:
    import test_lora
    base, adapters, _ = test_lora._adapters(root, test_lora._llama, [
        {"target_modules": test_lora.LLAMA_QV},
        {"target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"], "use_rslora": True,
         "alpha_pattern": {"o_proj": 3}},
        {"target_modules": ["v_proj", "gate_proj", "up_proj"], "rank_pattern": {"up_proj": 2},
         "modules_to_save": ["lm_head"]}])
    return base, adapters


def _vocab(root: Path) -> tuple[Path, list[Path]]:
    """test_vocab's llama models: experts A (62 rows) and B (padded to 8) with added tokens of their own."""
    import transformers
    from tokenizers import AddedToken
    import test_vocab
    from test_calibrated import _tokenizer
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(test_vocab._config("llama")).eval().save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    dirs = []
    for k, (name, pad) in enumerate([("A", None), ("B", 8)]):
        tok = _tokenizer()
        tok.add_tokens([AddedToken(t, special=True) for t in test_vocab.ADDED[name]])
        if name == "A":
            tok.chat_template = test_vocab.TEMPLATE_A
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad)
        test_vocab._perturb(model, 10 + k)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    return root / "base", dirs


def _recipes(root: Path, base: Path, experts: list[Path], stack: list[Path]) -> dict[str, Path]:
    """test_mergekit_methods' gradient/filter and sliced recipes, and test_stack's passthrough slices."""
    grad = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [{"model": str(experts[0]), "parameters": {
                            "weight": 1.0, "density": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]}},
                       {"model": str(experts[1]), "parameters": {"weight": [1.0, 0.0, 0.5], "density": 0.4}}]}
    sliced = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "parameters": {"lambda": 1.0},
              "slices": [{"sources": [{"model": str(base), "layer_range": [0, 1]}]
                          + [{"model": str(e), "layer_range": [0, 1], "parameters": {"weight": w}}
                             for e, w in zip(experts, (0.3, 0.6))], "parameters": {"lambda": 0.5}},
                         {"sources": [{"model": str(base), "layer_range": [1, 3]},
                                      {"model": str(experts[0]), "layer_range": [1, 3],
                                       "parameters": {"weight": [0.2, 1.0]}},
                                      {"model": str(experts[1]), "layer_range": [1, 3],
                                       "parameters": {"weight": 0.6}}]}]}
    a, b = stack
    passthrough = {"merge_method": "passthrough", "dtype": "float32",
                   "slices": [{"sources": [{"model": str(m), "layer_range": [lo, hi]}]}
                              for m, lo, hi in [(a, 0, 2), (b, 1, 4), (a, 3, 4)]]}
    out = {}
    for name, recipe in (("gradients", grad), ("slices", sliced), ("stack", passthrough)):
        out[name] = root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(recipe))
    return out


def _methods(python: str, tree: Path) -> list[tuple[str, bool]]:
    """(name, needs calibration) of every method `lowmerge methods` lists."""
    text = subprocess.run([python, "-m", "lowmem_merge", "methods"], capture_output=True, text=True, check=True,
                          env=_env(tree)).stdout
    return [(line.split()[0], "needs calibration" in line) for line in text.splitlines()
            if line and not line[0].isspace()]


def build_cases(root: Path, methods: list[tuple[str, bool]]) -> list[Case]:
    tiny, experts = build_example(root / "tiny", TINY, n_experts=3)
    calib = _calib_texts(tiny, root / "calib", 3)
    three, experts3 = build_example(root / "three", THREE, n_experts=2, dtype=torch.float32)
    dist, dist_experts = build_example(root / "dist", DIST, n_experts=3)
    bnb, bnb_experts = build_example(root / "bnb", BNB, n_experts=2)
    stack, stack_experts = build_example(root / "stack", STACK, n_experts=1, dtype=torch.float32)
    recipes = _recipes(root, three, experts3, [stack, stack_experts[0]])
    lora, adapters = _lora(root / "lora")
    vocab, vocab_experts = _vocab(root / "vocab")

    def merge(*paths: Path, extra: tuple[str, ...] = ()) -> list[str]:
        return ["merge", *map(str, paths), "-o", "{out}", "-q", "--device", "cpu", *extra]

    cases = [Case("methods", ["methods"], output=False), Case("merge --help", ["merge", "--help"], output=False),
             Case("inspect", ["inspect", str(tiny), *map(str, experts)], output=False),
             Case("inspect --stats --json", ["inspect", str(tiny), *map(str, experts), "--stats", "--json",
                                             "--device", "cpu"], output=False)]
    for method, calibrated in methods:
        ex = experts[:FIXED_EXPERTS.get(method, len(experts))]
        extra: tuple[str, ...] = ("-m", method)
        if calibrated:
            extra += tuple(a for f in calib[:len(ex)] for a in ("--calib", str(f))) + (
                "--calib-samples", "8", "--calib-seq-len", "8")
        cases.append(Case(f"method {method}", merge(tiny, *ex, extra=extra)))
    cases += [
        Case("ties shards fp32 --max-memory", merge(tiny, *experts, extra=(
            "-m", "ties", "--dtype", "float32", "--shard-size", "30KB", "--max-memory", "300MB"))),
        Case("recipe gradients+filters", ["merge", "--config", str(recipes["gradients"]), "-o", "{out}", "-q",
                                          "--device", "cpu"]),
        Case("recipe slices", ["merge", "--config", str(recipes["slices"]), "-o", "{out}", "-q", "--device", "cpu"]),
        Case("lora task_arithmetic", merge(lora, *adapters, extra=("-m", "task_arithmetic"))),
        Case("lora actmat", merge(lora, *adapters, extra=("-m", "actmat"))),
        Case("vocab union", merge(vocab, *vocab_experts, extra=("-m", "task_arithmetic", "-p", "scale=0.7",
                                                                "--tokenizer-source", "union"))),
        Case("vocab default", merge(vocab, *vocab_experts, extra=("-m", "ties"))),
        Case("torchrun 2 ties", merge(dist, *dist_experts, extra=("-m", "ties", "--shard-size", "60KB")), torchrun=2),
        Case("torchrun 2 actmat", merge(dist, *dist_experts, extra=("-m", "actmat", "--shard-size", "60KB")),
             torchrun=2),
        Case("bnb int8", merge(bnb, *bnb_experts, extra=("--quantize", "int8", "--shard-size", "40KB"))),
        Case("bnb nf4", merge(bnb, *bnb_experts, extra=("--quantize", "nf4", "--shard-size", "40KB"))),
        Case("stack", ["merge", "--config", str(recipes["stack"]), "-o", "{out}", "-q", "--shard-size", "40KB"]),
    ]
    return cases


# ---------------------------------------------------------------- running and comparing

def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONDONTWRITEBYTECODE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _imports_from(python: str, tree: Path) -> Path:
    code = "import lowmem_merge, pathlib; print(pathlib.Path(lowmem_merge.__file__).resolve().parent)"
    got = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=_env(tree),
                         cwd=tempfile.gettempdir()).stdout.strip()
    return Path(got)


def _normalize(value, root: Path, out: Path):
    """Drop what differs between any two runs (timings, memory, dates) and the runs' own directories."""
    if isinstance(value, dict):
        return {k: _normalize(v, root, out) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normalize(v, root, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out), "<OUT>").replace(str(root), "<ROOT>")
    return value


def _fingerprint(out: Path, root: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        data = path.read_bytes()
        if path.name == REPORT:
            data = json.dumps(_normalize(json.loads(data), root, out), sort_keys=True).encode()
        elif path.name == CARD:
            text = re.sub(r" on \d{4}-\d\d-\d\dT[\d:+.-]+\.", " on <DATE>.", data.decode("utf-8", "replace"))
            data = text.replace(str(out), "<OUT>").replace(str(root), "<ROOT>").encode()
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def run_case(case: Case, python: str, tree: Path, label: str, root: Path) -> dict:
    out = root / "out" / label / re.sub(r"[^A-Za-z0-9]+", "-", case.name)
    args = [a.replace("{out}", str(out)) for a in case.args]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(case.torchrun), "--master-addr", "127.0.0.1",
              "--master-port", str(_free_port())] if case.torchrun else []
    start = time.perf_counter()
    proc = subprocess.run([python, *launch, "-m", "lowmem_merge", *args], capture_output=True, text=True,
                          env=_env(tree), cwd=root, timeout=900)
    result = {"rc": proc.returncode, "seconds": time.perf_counter() - start,
              "stdout": proc.stdout.replace(str(out), "<OUT>").replace(str(root), "<ROOT>"),
              "stderr": proc.stderr[-2000:]}
    if case.output and proc.returncode == 0:
        result["files"] = _fingerprint(out, root)
    return result


def compare(case: Case) -> str | None:
    """None when the two runs agree, else what differs."""
    new, old = case.result["new"], case.result["old"]
    if new["rc"] != 0 or old["rc"] != 0:
        return f"exit status {new['rc']} (this tree) vs {old['rc']} (REV): {(new['stderr'] or old['stderr'])[-300:]}"
    if new["stdout"] != old["stdout"]:
        return "stdout differs"
    if case.output:
        a, b = new["files"], old["files"]
        if a.keys() != b.keys():
            return f"files differ: only here {sorted(a.keys() - b.keys())}, only in REV {sorted(b.keys() - a.keys())}"
        diff = [k for k in a if a[k] != b[k]]
        if diff:
            return f"bytes differ: {', '.join(diff)}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="the git revision to compare with (e.g. main, 203ac45)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at a time")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory and print it")
    args = ap.parse_args()
    python = sys.executable
    root = Path(tempfile.mkdtemp(prefix="lowmerge-identical-"))
    rev = root / "rev"
    try:
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(rev), args.against],
                       check=True, capture_output=True)
        for tree in (HERE, rev):
            got = _imports_from(python, tree)
            if got != (tree / "lowmem_merge").resolve():
                print(f"error: with PYTHONPATH={tree}, lowmem_merge is imported from {got}", file=sys.stderr)
                return 2
        cases = build_cases(root / "in", _methods(python, HERE))
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        jobs = [(c, tree, label) for c in cases for tree, label in ((HERE, "new"), (rev, "old"))]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = pool.map(lambda j: run_case(j[0], python, j[1], j[2], root), jobs)
            for (case, _, label), result in zip(jobs, results):
                case.result[label] = result
        failed = 0
        for case in cases:
            problem = compare(case)
            failed += problem is not None
            files = len(case.result["new"].get("files", {}))
            secs = case.result["new"]["seconds"], case.result["old"]["seconds"]
            print(f"{'DIFF' if problem else 'same'}  {case.name:34s} {files:3d} files  "
                  f"{secs[0]:5.1f} s / {secs[1]:5.1f} s" + (f"  {problem}" if problem else ""), flush=True)
        print(f"{len(cases) - failed}/{len(cases)} cases identical to {args.against}")
        return 1 if failed else 0
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(rev)], capture_output=True)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
