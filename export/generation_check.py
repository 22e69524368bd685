"""Validation that means something for generation: onnxruntime-genai against transformers, token by token.

For each prompt (three short texts and one of several hundred tokens, so the KV cache really carries the
context), onnxruntime-genai generates greedily from the exported folder while recording the logits of every step.
transformers (PyTorch, fp32) then scores the prompt plus the generated tokens in one pass, which gives its logits
at every one of those steps: the logit error per step, and whether its own greedy choice is the token the ONNX
model took. Where every choice agrees, transformers' greedy generation is that same sequence (by induction), so
one forward pass checks a whole generation.

fp32 passes when every token agrees and the largest logit error is within ``FP32_TOLERANCE`` of the logits'
scale. A step where the two disagree only because transformers' top two logits are closer than that tolerance is
a tie, not an error (counted and reported as such). fp16, int8 and int4 are reported, never failed: token
agreement, logit error per step, and the perplexity of both models on a held-out text.

Needs the model in memory twice (transformers fp32 and onnxruntime): export with --no-validate where that does
not fit.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from lowmem_merge.errors import ValidationError

from . import models
from .validate import FP32_TOLERANCE

NEW_TOKENS = 32
LONG_PROMPT_TOKENS = 400
_TEXT = ("Model merging combines the weights of several fine-tuned experts into one model without training. "
         "Each expert starts from the same base, learns a task, and leaves a small change in its weights; "
         "a merge rule decides how those changes add up. ")
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,")
HELD_OUT = ("Streaming reads one tensor at a time from its byte range, so memory stays flat however large the "
            "model is. The merged tensor is written out at once and freed, and the next one is read.")


def check(model_dir: Path, folder: Path, precision: str, new_tokens: int = NEW_TOKENS) -> dict:
    """Generate with both, compare, and measure perplexity; the report says ``passed`` (fp32 only can fail)."""
    import onnxruntime_genai as og
    t0 = time.perf_counter()
    tokenizer = _hf_tokenizer(model_dir)
    reference = _reference(model_dir)
    context = int(getattr(reference.config, "max_position_embeddings", 2048) or 2048)
    model = og.Model(str(folder))
    og_tokenizer = og.Tokenizer(model)
    prompts = list(PROMPTS) + [_long_prompt(tokenizer, min(LONG_PROMPT_TOKENS, context - new_tokens - 1))]
    rows, decode_s, decoded = [], 0.0, 0
    for text in prompts:
        ids = tokenizer(text)["input_ids"][: context - new_tokens - 1]
        tokens, logits, seconds, steps = generate_greedy(og, model, ids, new_tokens)
        decode_s, decoded = decode_s + seconds, decoded + steps
        ref = reference_logits(reference, ids, tokens)
        rows.append(_compare(text, ids, tokens, logits, ref, np.asarray(og_tokenizer.encode(text)).tolist()))
    ppl = _perplexities(og, model, reference, tokenizer(HELD_OUT)["input_ids"])
    scale_ok = max(r["max_logit_rel"] for r in rows) <= FP32_TOLERANCE
    tokens_ok = all(r["same_tokens"] + r["ties"] == r["new_tokens"] for r in rows)
    return {"reference": f"transformers {type(reference).__name__} (PyTorch, fp32)",
            "runtime": f"onnxruntime-genai {og.__version__ if hasattr(og, '__version__') else ''}".strip(),
            "precision": precision, "prompts": rows,
            "tokens_agree": all(r["same_tokens"] == r["new_tokens"] for r in rows),
            "tokenizer_agrees": all(r["tokenizer_agrees"] for r in rows),
            "max_logit_abs": max(r["max_logit_abs"] for r in rows),
            "max_logit_rel": max(r["max_logit_rel"] for r in rows),
            "perplexity": ppl, "decode_tokens_per_s": decoded / decode_s if decode_s else None,
            "tolerance_rel": FP32_TOLERANCE,
            "passed": (tokens_ok and scale_ok) if precision == "fp32" else True,
            "seconds": time.perf_counter() - t0}


def raise_if_failed(report: dict, folder: Path) -> None:
    if report["passed"]:
        return
    worst = min(report["prompts"], key=lambda r: r["same_tokens"] + r["ties"])
    raise ValidationError(
        f"the fp32 ONNX model does not generate what transformers generates: {worst['same_tokens']} of "
        f"{worst['new_tokens']} tokens agree on a {worst['prompt_tokens']}-token prompt, largest logit error "
        f"{report['max_logit_rel']:.1e} of the logits' scale (tolerance {report['tolerance_rel']:.0e})",
        path=folder, diffs=report,
        hint="the export is wrong for this model: please report it with export_report.json from the folder")


def _hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def _reference(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return models.from_pretrained(AutoModelForCausalLM, model_dir)


def _long_prompt(tokenizer, n_tokens: int) -> str:
    """A text of about ``n_tokens`` tokens: the built-in paragraph repeated, cut at a token boundary."""
    text = _TEXT
    while len(tokenizer(text)["input_ids"]) < n_tokens:
        text += _TEXT
    return tokenizer.decode(tokenizer(text)["input_ids"][:n_tokens], skip_special_tokens=True)


def generate_greedy(og, model, ids: list[int], n: int) -> tuple[list[int], np.ndarray, float, int]:
    """``n`` greedy tokens, the logits each was chosen from (n, vocab), and the seconds and number of the decode
    steps (one new token through the KV cache each; the prompt passes are not counted).

    A generation that stops at the end-of-text token goes on from the prompt plus everything generated so far,
    so every prompt checks ``n`` tokens whatever the model says (genai's min_length would hide the eos logit).
    """
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    seconds, steps = 0.0, 0
    while len(tokens) < n:
        context = ids + tokens
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(context) + n - len(tokens), do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(context)           # runs the prompt; its last logits choose the next token
        first, t0 = True, time.perf_counter()
        while len(tokens) < n and not gen.is_done():
            if first:                        # the first choice comes from the prompt pass: not a decode step
                gen.generate_next_token()
                t0, first = time.perf_counter(), False
            else:
                gen.generate_next_token()
                steps += 1
            logits.append(np.array(gen.get_output("logits")[0, -1], dtype=np.float32))
            tokens.append(int(gen.get_next_tokens()[0]))
        seconds += time.perf_counter() - t0
    return tokens, np.stack(logits), seconds, steps


def reference_logits(reference, ids: list[int], tokens: list[int]) -> np.ndarray:
    """transformers' logits at each generation step, scoring the prompt and the ONNX tokens in one pass."""
    seq = torch.tensor([ids + tokens[:-1]])
    with torch.no_grad():
        out = reference(input_ids=seq).logits[0, len(ids) - 1:]
    return out.float().numpy()


def _compare(text: str, ids: list[int], tokens: list[int], got: np.ndarray, ref: np.ndarray,
             og_ids: list[int]) -> dict:
    scale = float(np.abs(ref).max()) or 1.0
    per_step = np.abs(got.astype(np.float64) - ref).max(axis=-1)
    choice = ref.argmax(-1)
    agree = choice == np.asarray(tokens)
    same = int(np.argmin(agree)) if not agree.all() else len(tokens)
    margin = ref[np.arange(len(tokens)), choice] - ref[np.arange(len(tokens)), tokens]
    ties = int(((~agree) & (margin <= FP32_TOLERANCE * scale)).sum())
    return {"prompt": text[:40], "prompt_tokens": len(ids), "new_tokens": len(tokens), "same_tokens": same,
            "teacher_forced_top1": float(agree.mean()), "ties": ties,
            "max_logit_abs": float(per_step.max()), "max_logit_rel": float(per_step.max()) / scale,
            "logit_abs_per_step": [float(x) for x in per_step], "tokenizer_agrees": og_ids == ids}


def _perplexities(og, model, reference, ids: list[int]) -> dict:
    """exp(mean NLL of each next token) of the held-out text under both models."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    onnx_logits = torch.from_numpy(np.array(gen.get_output("logits")[0], dtype=np.float32))
    with torch.no_grad():
        ref_logits = reference(input_ids=torch.tensor([ids])).logits[0].float()
    target = torch.tensor(ids[1:])

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1].double(), target)))
    return {"onnx": ppl(onnx_logits), "transformers": ppl(ref_logits), "tokens": len(ids)}
