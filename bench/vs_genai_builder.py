"""How does `lowmerge export` compare with onnxruntime-genai's own model builder on the same merged model: peak memory,
time and size of the export, CPU decode speed of what each writes, and agreement of its greedy tokens with
transformers? And does lowmerge's export peak stay flat with depth?

One run, same files, same machine:
- builds once (cached under bench/_work/vs_genai_builder/) a Llama-shaped base and 2 experts with lowmerge's demo
  writer (random init, bf16, a real byte-level BPE tokenizer from lowmem_merge.demo.write_tokenizer) and merges
  them with `lowmerge merge -m task_arithmetic`: the merged model (written by lowmerge's writer) is what both tools
  export; default hidden 2048, intermediate 5632, 8 layers, 16 heads, 16 kv heads, vocab 8000 (~0.44 B parameters);
- per tool (builder: `python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p P -e cpu -c CACHE`; lowmerge:
  `lowmerge export MERGED -o OUT --precision P --no-validate --force`) and precision (fp32, int4): one export in a
  fresh subprocess under `/usr/bin/time -f %M` (peak RSS of that process; without /usr/bin/time, the wait4 rusage
  ru_maxrss of the child), wall time (interpreter start and imports included), size of the output folder;
- decode speed, per folder, with onnxruntime-genai on the CPU: a fixed 128-token prompt, then 128 greedy tokens
  (max_length 256, do_sample False, min_length 256 so an end-of-text token cannot stop it early); tokens/s of the
  decode steps only (the 127 one-token forward passes after the prompt's, each with its argmax), in a fresh
  subprocess per run that first does one warm-up generation; the builder's and lowmerge's folders of a precision
  alternate (A B A B A B), median of --runs runs each; load average and other processes' CPU share are recorded;
- agreement: transformers fp32 (`AutoModelForCausalLM.from_pretrained(MERGED, dtype=torch.float32)`,
  `generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`) in a fresh subprocess; per folder, the
  length of the prefix of its 128 tokens that equals transformers' and the fraction of equal positions;
- flatness: lowmerge's int4 export of the same model at 2 layers (same width, built and merged the same way) in a
  fresh subprocess, against the 8-layer peak above;
- the two int4 graphs, read without their weights (onnx.load(..., load_external_data=False)): op counts,
  MatMulNBits bits / accuracy_level / block size, fused q/k/v and gate/up, the LM head's op and bits.
Prints a table and appends it to bench/RESULTS.md.

Run (~12 min on 2 cores, ~6 GB under bench/_work):
    python bench/vs_genai_builder.py
Tiny check (a couple of minutes; keep it out of RESULTS.md):
    python bench/vs_genai_builder.py --hidden 256 --intermediate 688 --layers 2 --small-layers 1 --heads 4 \
        --kv-heads 4 --vocab 2000 --runs 1 --results /tmp/scratch.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "_work" / "vs_genai_builder"
PY = sys.executable
TOOLS = ("builder", "lowmerge")
PRECISIONS = ("fp32", "int4")
PROMPT_TOKENS, NEW_TOKENS = 128, 128
PEAK_TARGET = 10**9          # lowmerge int4 export peak ≤ 1 GB
SPEED_TARGET = 0.8           # lowmerge int4 decode ≥ 0.8× the builder's int4 graph
FLAT_TARGET = 1.15           # lowmerge int4 export peak from 2 to 8 layers ≤ 1.15×
TEXT = ("Model merging combines the weights of several fine-tuned experts into one model without training. Each "
        "expert starts from the same base, learns a task, and leaves a small change in its weights; a merge rule "
        "decides how those changes add up. Streaming reads one tensor at a time from its byte range, so memory "
        "stays flat however large the model is. The merged tensor is written out at once and freed, and the next "
        "one is read. ") * 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------- model

def model_dir(args: argparse.Namespace, layers: int) -> Path:
    return WORK / (f"model-h{args.hidden}-i{args.intermediate}-l{layers}-v{args.vocab}-a{args.heads}"
                   f"-kv{args.kv_heads}") / "merged"


def ensure_model(args: argparse.Namespace, layers: int) -> Path:
    """Base + 2 experts (lowmerge.demo, bf16, BPE tokenizer) merged with task_arithmetic; built once."""
    merged = model_dir(args, layers)
    root = merged.parent
    if (root / "complete.json").is_file():
        return merged
    import torch
    sys.path.insert(0, str(REPO))
    from lowmem_merge.demo import LlamaShape, build_example
    shutil.rmtree(root, ignore_errors=True)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=layers, vocab=args.vocab,
                       heads=args.heads, kv_heads=args.kv_heads)
    log(f"building {root} ...")
    t0 = time.perf_counter()
    base, experts = build_example(root / "inputs", shape, n_experts=2, dtype=torch.bfloat16, tokenizer=True)
    subprocess.run([PY, "-m", "lowmem_merge", "merge", str(base), *map(str, experts), "-o", str(merged), "-m",
                    "task_arithmetic", "--device", "cpu", "-q"], check=True, cwd=REPO)
    shutil.rmtree(root / "inputs")      # only the merged model is exported
    (root / "complete.json").write_text(json.dumps({"shape": shape.__dict__, "seconds": time.perf_counter() - t0}))
    log(f"  built and merged in {time.perf_counter() - t0:.0f} s")
    return merged


def n_params(merged: Path) -> int:
    from safetensors import safe_open
    total = 0
    for f in merged.glob("*.safetensors"):
        with safe_open(str(f), "np") as s:
            for k in s.keys():
                n = 1
                for d in s.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def prompt_ids(merged: Path) -> list[int]:
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(merged / "tokenizer.json")).encode(TEXT).ids
    assert len(ids) >= PROMPT_TOKENS, len(ids)
    return ids[:PROMPT_TOKENS]


# ---------------------------------------------------------------------------------------------------- export

@dataclass
class Export:
    tool: str
    precision: str
    layers: int
    folder: Path
    peak_rss: int
    wall_s: float
    size: int


def export_cmd(tool: str, merged: Path, out: Path, precision: str) -> list[str]:
    if tool == "builder":
        return [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out), "-p", precision,
                "-e", "cpu", "-c", str(WORK / "builder_cache")]
    return [str(Path(PY).parent / "lowmerge"), "export", str(merged), "-o", str(out), "--precision", precision,
            "--no-validate", "--force"]


def measured(cmd: list[str], log_path: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` in a fresh process: /usr/bin/time's %M, else wait4's rusage."""
    timer = shutil.which("time", path="/usr/bin")
    rss_file = log_path.with_suffix(".rss")
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        if timer:
            rc = subprocess.run([timer, "-f", "%M", "-o", str(rss_file), *cmd], stdout=out, stderr=out,
                                cwd=REPO).returncode
            wall = time.perf_counter() - t0
            peak = int(rss_file.read_text().split()[-1]) * 1024 if rc == 0 else 0
        else:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
            wall, rc = time.perf_counter() - t0, os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            peak = usage.ru_maxrss * 1024
    if rc != 0:
        sys.exit(f"failed ({rc}): {shlex.join(cmd)}\n" + log_path.read_text(errors="replace")[-3000:])
    return wall, peak


def run_export(tool: str, merged: Path, layers: int, precision: str) -> Export:
    out = WORK / "out" / f"l{layers}-{tool}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(WORK / "builder_cache", ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"export: {tool} {precision} ({layers} layers) ...")
    wall, peak = measured(export_cmd(tool, merged, out, precision), out.parent / f"l{layers}-{tool}-{precision}.log")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"  {wall:.1f} s, peak {fmt_mib(peak)}, {fmt_mib(size)}")
    return Export(tool, precision, layers, out, peak, wall, size)


# ---------------------------------------------------------------------------------------------------- decode

def decode_child(folder: str, ids_json: str) -> None:
    """In a fresh process: load, one warm-up generation, one timed generation; prints JSON."""
    import onnxruntime_genai as og
    ids = json.loads(ids_json)
    t0 = time.perf_counter()
    model = og.Model(folder)
    load_s = time.perf_counter() - t0

    def generate() -> tuple[list[int], float, float]:
        params = og.GeneratorParams(model)
        total = len(ids) + NEW_TOKENS
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        a = time.perf_counter()
        gen.append_tokens(ids)                  # the prompt's forward pass
        gen.generate_next_token()               # argmax of the prompt's last logits: no forward pass
        b = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()           # one one-token forward pass + argmax each
        c = time.perf_counter()
        new = list(map(int, gen.get_sequence(0)))[len(ids):]
        return new, b - a, (len(new) - 1) / (c - b)

    generate()
    tokens, prompt_s, tps = generate()
    print(json.dumps({"tokens": tokens, "prompt_s": prompt_s, "tokens_per_s": tps, "load_s": load_s,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def reference_child(merged: str, request: str) -> None:
    """transformers fp32: its own greedy tokens; then, per folder's tokens, one teacher-forced pass (prompt + those
    tokens) giving the share of steps where transformers' argmax is the folder's token (no propagation), and on its
    own path the median gap between its top two logits (in units of the logits' standard deviation)."""
    import torch
    from transformers import AutoModelForCausalLM
    req = json.loads(Path(request).read_text())
    ids = torch.tensor([req["ids"]])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    n = ids.shape[1]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
        ref = out[0, n:].tolist()

        def steps(tokens: list[int]) -> torch.Tensor:    # logits that choose each of ``tokens``
            seq = torch.tensor([req["ids"] + tokens])
            return model(seq).logits[0, n - 1: n - 1 + len(tokens)]

        own = steps(ref)
        top2 = own.topk(2, -1).values
        gap = ((top2[:, 0] - top2[:, 1]) / own.std(-1)).median().item()
        forced = {}
        for name, tokens in req["sequences"].items():
            choice = steps(tokens).argmax(-1)
            forced[name] = (choice == torch.tensor(tokens)).float().mean().item()
    print(json.dumps({"tokens": ref, "teacher_forced": forced, "gap": gap}))


def child(mode: str, *argv: str) -> dict:
    out = subprocess.run([PY, __file__, mode, *argv], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy_cpu_s() -> float:
    """CPU seconds every process has used since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


@dataclass
class Decode:
    tps: list[float] = field(default_factory=list)
    prompt_s: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    tokens: list[int] | None = None
    deterministic: bool = True


def decode_all(exports: dict[tuple[str, str], Export], ids: list[int], runs: int) -> tuple[dict, dict]:
    ids_json = json.dumps(ids)
    result = {key: Decode() for key in exports}
    load = {"loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    busy, mine, t0 = busy_cpu_s(), children_cpu_s(), time.perf_counter()
    for precision in PRECISIONS:
        for r in range(runs):
            for tool in TOOLS:
                d = child("_decode", str(exports[tool, precision].folder), ids_json)
                res = result[tool, precision]
                res.tps.append(d["tokens_per_s"])
                res.prompt_s.append(d["prompt_s"])
                res.load_s.append(d["load_s"])
                res.rss.append(d["rss"])
                res.deterministic &= res.tokens is None or res.tokens == d["tokens"]
                res.tokens = d["tokens"]
                log(f"decode {tool} {precision} run {r + 1}: {d['tokens_per_s']:.1f} tokens/s "
                    f"(prompt {d['prompt_s']:.2f} s, load {d['load_s']:.1f} s)")
    wall = time.perf_counter() - t0
    others = max(0.0, busy_cpu_s() - busy - (children_cpu_s() - mine)) / (wall * (os.cpu_count() or 1))
    load["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    load["others_share"] = others
    return result, load


def agreement(tokens: list[int], ref: list[int]) -> tuple[int, float]:
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    same = sum(a == b for a, b in zip(tokens, ref)) / max(len(ref), 1)
    return prefix, same


# ---------------------------------------------------------------------------------------------------- graphs

def graph_summary(folder: Path) -> dict:
    import onnx
    cfg = json.loads((folder / "genai_config.json").read_text())
    m = onnx.load(str(folder / cfg["model"]["decoder"]["filename"]), load_external_data=False)
    ops: dict[str, int] = {}
    nbits = []
    head = None
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            nbits.append((attrs.get("bits", 4), attrs.get("accuracy_level", 0), attrs.get("block_size")))
        if "lm_head" in n.name and n.op_type in ("MatMul", "MatMulNBits", "Gemm"):
            head = f"{n.op_type}" + (f" {attrs.get('bits', 4)}-bit" if n.op_type == "MatMulNBits" else "")
    names = " ".join(n.name for n in m.graph.node if n.op_type in ("MatMul", "MatMulNBits"))
    return {"ops": ops, "matmulnbits": sorted(set(nbits)), "matmulnbits_count": len(nbits), "head": head,
            "qkv_fused": "qkv" in names, "gate_up_fused": "gate_up" in names or "gate_proj" not in names,
            "nodes": len(m.graph.node), "session_options": cfg["model"]["decoder"].get("session_options", {})}


def graph_lines(summaries: dict[str, dict]) -> list[str]:
    lines = []
    for tool, s in summaries.items():
        nb = ", ".join(f"{b}-bit acc{a} block {bs}" for b, a, bs in s["matmulnbits"])
        top = ", ".join(f"{k} {v}" for k, v in sorted(s["ops"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {tool} int4 graph: {s['nodes']} nodes ({top}); MatMulNBits: {s['matmulnbits_count']} "
                     f"({nb}); q/k/v fused: {'yes' if s['qkv_fused'] else 'no'}, gate/up fused: "
                     f"{'yes' if s['gate_up_fused'] else 'no'}; LM head: {s['head']}")
    return lines


# ---------------------------------------------------------------------------------------------------- report

def machine() -> str:
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (f"{cpu}, {os.cpu_count()} cores, RAM {ram / 2**30:.2f} GiB, torch {torch.__version__}, onnxruntime "
            f"{onnxruntime.__version__}, onnxruntime-genai {onnxruntime_genai.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}")


def git_commit() -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=REPO, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain").strip() else "")


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--small-layers", type=int, default=2, help="depth of the flatness check's shallow model")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--runs", type=int, default=3, help="timed decode runs per folder (median)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = ap.parse_args()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    commit = git_commit()
    t_start = time.perf_counter()

    merged = ensure_model(args, args.layers)
    small = ensure_model(args, args.small_layers)
    params = n_params(merged)
    ids = prompt_ids(merged)

    exports = {}
    for precision in PRECISIONS:
        for tool in TOOLS:
            exports[tool, precision] = run_export(tool, merged, args.layers, precision)
    flat = run_export("lowmerge", small, args.small_layers, "int4")

    decodes, load = decode_all(exports, ids, args.runs)
    log("transformers reference ...")
    request = WORK / "reference_request.json"
    request.write_text(json.dumps({"ids": ids, "sequences": {f"{t}-{p}": d.tokens for (t, p), d in decodes.items()}}))
    reference = child("_reference", str(merged), str(request))
    ref = reference["tokens"]
    graphs = {tool: graph_summary(exports[tool, "int4"].folder) for tool in TOOLS}

    rows = []
    med = {k: statistics.median(d.tps) for k, d in decodes.items()}
    for precision in PRECISIONS:
        for tool in TOOLS:
            e, d = exports[tool, precision], decodes[tool, precision]
            prefix, same = agreement(d.tokens, ref)
            rows.append(f"| {tool} | {precision} | {fmt_mib(e.peak_rss)} | {e.wall_s:.1f} | {fmt_mib(e.size)} | "
                        f"{med[tool, precision]:.1f} ({', '.join(f'{x:.1f}' for x in d.tps)}) | "
                        f"{statistics.median(d.prompt_s):.2f} | {fmt_mib(max(d.rss))} | {prefix}/{len(ref)} | "
                        f"{100 * same:.1f} %{'' if d.deterministic else ' (runs differ)'} | "
                        f"{100 * reference['teacher_forced'][f'{tool}-{precision}']:.1f} % |")
        b, lm = exports["builder", precision], exports["lowmerge", precision]
        rows.append(f"| **lowmerge / builder** | {precision} | **{lm.peak_rss / b.peak_rss:.2f}×** | "
                    f"{lm.wall_s / b.wall_s:.2f}× | {lm.size / b.size:.2f}× | "
                    f"**{med['lowmerge', precision] / med['builder', precision]:.2f}×** | | | | | |")
    peak4 = exports["lowmerge", "int4"].peak_rss
    speed4 = med["lowmerge", "int4"] / med["builder", "int4"]
    growth = peak4 / flat.peak_rss
    total_min = (time.perf_counter() - t_start) / 60
    text = "\n".join([
        f"## vs onnxruntime-genai's model builder — {when} UTC — {commit}",
        "",
        "Question: on the same merged model, how do `lowmerge export` and onnxruntime-genai's builder compare in "
        "export peak memory, time and size, CPU decode speed, and greedy-token agreement with transformers; and "
        "does lowmerge's export peak stay flat with depth?",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}` ({total_min:.1f} min in all)",
        f"- model: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads, {args.kv_heads} kv heads, vocab {args.vocab} (byte-level BPE from "
        f"`lowmem_merge.demo.write_tokenizer`), untied head, bf16, {params / 1e9:.3f} B parameters; base + 2 experts "
        "from `lowmem_merge.demo.build_example` (random init) merged by `lowmerge merge -m task_arithmetic`",
        "- export: `python -m onnxruntime_genai.models.builder -i MERGED -o OUT -p P -e cpu -c CACHE` vs "
        "`lowmerge export MERGED -o OUT --precision P --no-validate`, each in a fresh process; peak RSS = "
        "`/usr/bin/time -f %M` of that process; wall includes interpreter start and imports; size = the output "
        "folder's files",
        f"- decode: onnxruntime-genai {NEW_TOKENS} greedy tokens after a fixed {PROMPT_TOKENS}-token prompt "
        "(max_length = min_length = 256, do_sample False), tokens/s of the 127 one-token steps after the prompt's "
        f"forward pass; a fresh process per run (load, one warm-up generation, the timed one), builder and "
        f"lowmerge alternating, median of {args.runs} (runs in brackets); prompt s = the prompt's forward pass; "
        "run RSS = the decode process's peak; load average "
        f"{' '.join(load['loadavg_before'])} before, {' '.join(load['loadavg_after'])} after; other processes took "
        f"{100 * load['others_share']:.1f} % of the CPUs meanwhile",
        f"- agreement: with transformers fp32 `generate(do_sample=False, max_new_tokens={NEW_TOKENS}, "
        "min_new_tokens=128)` on the same prompt: matching prefix / 128 and share of equal positions; "
        "teacher-forced top-1 = share of the folder's 128 steps where transformers, fed the prompt and the "
        "folder's own tokens (one pass), takes the same argmax (no propagation after a first difference). The "
        "weights are random: on transformers' greedy path the median gap between its top two logits is "
        f"{reference['gap']:.2f} standard deviations of the logits, so int4 noise flips many near-ties and a "
        "first difference then sends the two greedy paths apart",
        "",
        "| tool | precision | export peak RSS | export wall s | size | decode tokens/s (runs) | prompt s | run RSS "
        "| prefix = transformers | equal positions | teacher-forced top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *graph_lines(graphs),
        f"- flatness: lowmerge int4 export peak at {args.small_layers} layers {fmt_mib(flat.peak_rss)} "
        f"({flat.wall_s:.1f} s), at {args.layers} layers {fmt_mib(peak4)}: {growth:.2f}×",
        "",
        f"Targets: lowmerge int4 export peak ≤ 1 GB: {met(peak4 <= PEAK_TARGET)} ({peak4 / 1e9:.2f} GB; the builder "
        f"{exports['builder', 'int4'].peak_rss / 1e9:.2f} GB); lowmerge int4 decode ≥ {SPEED_TARGET}× the "
        f"builder's: {met(speed4 >= SPEED_TARGET)} ({speed4:.2f}×); peak from {args.small_layers} to "
        f"{args.layers} layers ≤ {FLAT_TARGET}×: {met(growth <= FLAT_TARGET)} ({growth:.2f}×).",
        "",
    ])
    print(text)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write("\n" + text + "\n")
    log(f"appended to {args.results}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_decode":
        decode_child(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_reference":
        reference_child(*sys.argv[2:])
    else:
        main()
