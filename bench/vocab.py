"""What does matching vocabularies by token cost? The same merge of the same experts, once with the base's
vocabulary and once with experts that added tokens (merged over the union), in fresh subprocesses.

Builds (under bench/_work/vocab/) a Llama-shaped base with a word-level tokenizer of VOCAB tokens, experts with the
same vocabulary, and the same experts with ADDED special tokens each (embed_tokens and lm_head resized, the new rows
the mean row plus noise), then runs `lowmerge merge` on both sets and reports wall time and peak RSS (the report's
own numbers) and the ratio. Appends a table to bench/RESULTS.md.

Run:  python bench/vocab.py [--hidden 1024 --layers 8 --vocab 32000 --experts 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lowmem_merge.demo import LlamaShape, build_example  # noqa: E402

ADDED = 2


def _tokenizer(vocab: int, added: list[str]):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(vocab - 4)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_tokens([AddedToken(t, special=True) for t in added])
    return fast


def build(root: Path, shape: LlamaShape, n_experts: int) -> tuple[Path, list[Path], list[Path]]:
    """(base, experts with the base's vocabulary, the same experts with ADDED tokens each)."""
    if (root / "done").is_file():
        return root / "base", sorted(root.glob("same/expert*")), sorted(root.glob("added/expert*"))
    base, same = build_example(root, shape, n_experts=n_experts)
    _tokenizer(shape.vocab, []).save_pretrained(base)
    added = []
    for t, e in enumerate(same):
        (root / "same").mkdir(exist_ok=True)
        moved = root / "same" / e.name
        e.rename(moved)
        _tokenizer(shape.vocab, []).save_pretrained(moved)
        out = root / "added" / e.name
        out.mkdir(parents=True)
        tensors = load_file(moved / "model.safetensors")
        g = torch.Generator().manual_seed(t)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = tensors[name]
            new = w.float().mean(0, keepdim=True) + 0.01 * torch.randn(ADDED, w.shape[1], generator=g)
            tensors[name] = torch.cat([w, new.to(w.dtype)])
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((moved / "config.json").read_text())
        cfg["vocab_size"] = shape.vocab + ADDED
        (out / "config.json").write_text(json.dumps(cfg))
        _tokenizer(shape.vocab, [f"<|task{t}_{k}|>" for k in range(ADDED)]).save_pretrained(out)
        added.append(out)
    (root / "done").write_text("")
    return base, sorted(root.glob("same/expert*")), added


def run(base: Path, experts: list[Path], out: Path, method: str) -> dict:
    cmd = [sys.executable, "-m", "lowmem_merge", "merge", str(base), *map(str, experts), "-o", str(out), "--force",
           "-q", "--device", "cpu", "-m", method]
    subprocess.run(cmd, check=True, cwd=REPO)
    return json.loads((out / "lowmerge_report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = ap.parse_args()
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=16, kv_heads=4)
    root = REPO / "bench" / "_work" / f"vocab-{args.hidden}-{args.layers}-{args.vocab}-{args.experts}"
    base, same, added = build(root, shape, args.experts)
    rows = []
    for method in args.methods.split(","):
        a = run(base, same, root / "out-same", method)
        b = run(base, added, root / "out-added", method)
        ta, tb = a["timings_s"]["total"], b["timings_s"]["total"]
        ma, mb = a["memory"]["peak_rss_bytes"] / 2**20, b["memory"]["peak_rss_bytes"] / 2**20
        rows.append(f"| `{method}` | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} | {ma:.0f} | {mb:.0f} | {mb - ma:+.0f} |")
        print(rows[-1])
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        f"\n## Vocabulary matching by token ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)\n",
        "Question: what does merging experts with added tokens over the union vocabulary cost, against the same "
        "merge of experts with the base's vocabulary?\n",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `python bench/vocab.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab} "
        f"--experts {args.experts} --methods {args.methods}`",
        f"- model: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab} (word-level tokenizer), bf16, base + {args.experts} experts; the 'added' experts have "
        f"{ADDED} special tokens each (embed_tokens and lm_head {args.vocab + ADDED} rows), merged over "
        f"{args.vocab + ADDED * args.experts} rows; time and peak RSS from each run's lowmerge_report.json, "
        "warm page cache\n",
        "| method | same vocab: s | added tokens (union): s | ratio | same: peak RSS MiB | union: peak RSS MiB | Δ MiB |",
        "|---|---|---|---|---|---|---|", *rows, ""])
    with open(args.results, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
