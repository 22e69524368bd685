"""`lowmerge export`: parse, call export.pipeline, print what it measured.

Importing this module costs only click: torch, transformers, onnx and onnxruntime are imported when the command
runs, so `lowmerge --help` stays fast and works where the ONNX extras are not installed.
"""
from __future__ import annotations

from pathlib import Path

import click

from lowmem_merge.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8", "int4")

_EPILOG = """\b
Examples:
  lowmerge export ./merged -o ./deploy --precision int4           # decoder LM: a folder onnxruntime-genai runs
  lowmerge export ./merged -o ./deploy --precision fp32 --no-validate   # flat memory, no check
  lowmerge export ./encoder -o ./onnx/model.onnx --quantize int8  # encoder / classifier: one graph

\b
Decoder LMs (Llama, Mistral, Qwen2, Qwen3, Phi-3) get a generation folder (--format genai, their default): a graph
with a KV cache (input_ids, attention_mask, past_key_values.N.key/value -> logits, present.N.key/value) built
from onnxruntime's fused operators (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits), its
weights in model.onnx.data, genai_config.json, and the tokenizer files and chat template. Run it with
onnxruntime-genai: og.Model(OUT). --precision: fp32; fp16 (slow on CPU, for GPUs); int8 or int4 (weights
quantized by lowmerge as they stream, MatMulNBits blocks of 32; embeddings, norms and RoPE tables stay fp32, the
LM head 8-bit under int4). Other decoders (Gemma, GPT-2, GPT-NeoX, Falcon, OPT, mixtures of experts) are refused
with the reason; --format plain gives the dense ones a graph without KV cache.

\b
--format plain: one graph (-o FILE.onnx, weights in FILE.onnx.data) taking input_ids and attention_mask and
returning logits of every position (no KV cache), logits [batch, labels] for a classifier, or last_hidden_state
for a base encoder (BertModel); validated against PyTorch on padded batches; --quantize int8|int4 adds
onnxruntime-quantized copies.

\b
Memory: the export reads one tensor at a time (a layer's q, k and v at most) and needs about the runtime
(~0.5 GB) plus that, whatever the model's size. Validation loads the whole model in PyTorch (fp32) and in
onnxruntime: about twice its fp32 size. Use --no-validate where that does not fit. onnxruntime's quantizers
(--quantize, plain format) load the whole fp32 model too.
"""


@click.command(epilog=_EPILOG)
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Generation format: the folder to write. Plain format: the .onnx file (weights go to "
                   "OUT.data, the report to <stem>.report.json).")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(["auto", "genai", "plain"]),
              help="genai: a folder for onnxruntime-genai with KV cache (decoder LMs); plain: one graph without "
                   "KV cache; auto: plain when OUT ends in .onnx or the model is an encoder or classifier, else "
                   "genai.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(list(PRECISIONS)),
              help="Generation format: weight precision, quantized as each weight streams (int4/int8: "
                   "MatMulNBits, blocks of 32).")
@click.option("--validate/--no-validate", "check", default=True, show_default=True,
              help="genai: generate greedily with onnxruntime-genai and transformers on 4 prompts (one of 400 "
                   "tokens), fail if fp32 tokens differ; report token agreement, logit error per step and "
                   "perplexity. plain: compare with PyTorch on padded batches. Needs the model in memory twice.")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Plain format: largest max|onnx - torch| / max|torch| of the output that validation accepts "
                   "(fp32).")
@click.option("--quantize", "schemes", multiple=True, type=click.Choice(["int8", "int4"]),
              help="Plain format: also write <stem>.int8.onnx (dynamic int8) and/or <stem>.int4.onnx (MatMulNBits) "
                   "with onnxruntime's quantizers, which load the whole model; repeatable.")
@click.option("--opset", default=None, type=click.IntRange(min=18),
              help="ONNX opset of the graph (default: 21 for genai, 18 for plain).")
@click.option("--force", is_flag=True, help="Replace a previous export at OUT.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def export(model_dir: Path, out: Path, fmt: str, precision: str, check: bool, tolerance: float,
           schemes: tuple[str, ...], opset: int | None, force: bool, debug: bool) -> None:
    """Export MODEL_DIR to ONNX: a generation folder for onnxruntime-genai (decoder LMs), or one graph.

    Weights stream from the safetensors files into the ONNX data file one tensor at a time (quantized on the
    way for int4/int8), so the export's peak memory does not grow with the model. A JSON report (validation,
    sizes, speed, peak memory) goes beside the model and is summarized here.
    """
    from .pipeline import choose_format, report_path, run, run_genai
    fmt = choose_format(model_dir, fmt, out)
    if fmt == "genai":
        if schemes:
            raise ConfigError("--quantize is for --format plain; the generation folder takes --precision int4|int8",
                              hint=f"lowmerge export {model_dir} -o {out} --precision int4")
        report = run_genai(model_dir, out, precision=precision, check=check, force=force)
        lines = genai_summary(report)
    else:
        if precision != "fp32":
            raise ConfigError("--precision is for the generation folder; --format plain writes fp32 and "
                              "--quantize int8|int4 for quantized copies", hint="e.g. --quantize int4")
        report = run(model_dir, out, check=check, schemes=tuple(dict.fromkeys(schemes)), tolerance=tolerance,
                     opset=opset or 18, force=force)
        lines = summary_lines(report) + [f"report: {report_path(out)}"]
    for line in lines:
        click.echo(line)


def genai_summary(report: dict) -> list[str]:
    e = report["export"]
    lines = [f"exported {e['model_type']} ({e['layers']} layers) at {report['precision']} to {e['path']}: "
             f"{_mb(e['bytes'])}, {e['seconds']:.1f} s, peak memory {_mb(e['peak_rss_bytes'])}"]
    v = report.get("validation")
    if v:
        rows = v["prompts"]
        same, total = sum(r["same_tokens"] for r in rows), sum(r["new_tokens"] for r in rows)
        ties = sum(r["ties"] for r in rows)
        verdict = ("passed" if v["passed"] else "FAILED") if report["precision"] == "fp32" else "reported"
        lines.append(f"validation: onnxruntime-genai vs {v['reference']}, greedy, {len(rows)} prompts of "
                     f"{min(r['prompt_tokens'] for r in rows)}-{max(r['prompt_tokens'] for r in rows)} tokens: "
                     f"{verdict}")
        lines.append(f"  tokens: {same}/{total} generated tokens agree" + (f" ({ties} ties)" if ties else "") +
                     f", teacher-forced top-1 {100 * min(r['teacher_forced_top1'] for r in rows):.1f}% (worst "
                     f"prompt); max logit error {v['max_logit_abs']:.1e} ({v['max_logit_rel']:.1e} of scale)")
        p = v["perplexity"]
        lines.append(f"  perplexity on a held-out text ({p['tokens']} tokens): onnx {p['onnx']:.4g}, "
                     f"transformers {p['transformers']:.4g}; decode {v['decode_tokens_per_s']:.0f} tokens/s; "
                     f"tokenizer {'agrees' if v['tokenizer_agrees'] else 'DIFFERS'} with transformers'")
    lines.append(f"report: {Path(e['path']) / 'export_report.json'}")
    lines += [f"note: {n}" for n in report["notes"]]
    return lines


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def summary_lines(report: dict) -> list[str]:
    e = report["export"]
    lines = [f"exported {report['task']} ({report['output']}) to {e['path']} + {Path(e['data_path']).name}: "
             f"{_mb(e['bytes'])}, {e['seconds']:.1f} s, peak memory {_mb(e['peak_rss_bytes'])}"]
    v = report.get("validation")
    if v:
        top1 = f", top-1 agreement {100 * v['top1']:.1f}%" if v["top1"] is not None else ""
        lines.append(f"validation vs {v['reference']} on {v['provider']}: max abs {v['max_abs']:.2e}, max rel "
                     f"{v['max_rel']:.2e} (tolerance {v['tolerance_rel']:.0e}){top1} over {v['positions']} "
                     f"positions: {'passed' if v['passed'] else 'FAILED'}")
        lines += [f"  {c['case']:18s} max abs {c['max_abs']:.2e}  max rel {c['max_rel']:.2e}" for c in v["cases"]]
    q = report.get("quantized")
    if q:
        fp32 = q["fp32"]
        lines.append(f"fp32: {_mb(fp32['bytes'])}, latency {fp32['latency_ms']:.2f} ms for {fp32['latency_input']} "
                     f"on {fp32['provider']}")
        for scheme, r in q.items():
            if scheme == "fp32":
                continue
            agree = r["vs_fp32"]
            top1 = f"top-1 {100 * agree['top1']:.1f}%, " if agree["top1"] is not None else ""
            lines.append(f"{scheme}: {_mb(r['bytes'])} ({r['bytes'] / fp32['bytes']:.2f}x), latency "
                         f"{r['latency_ms']:.2f} ms, vs fp32 {top1}max rel {agree['max_rel']:.1e}, "
                         f"{r['quantized_nodes']['quantized']} matmuls quantized, quantization peak memory "
                         f"{_mb(r['peak_rss_bytes'])}")
    lines += [f"note: {n}" for n in report["notes"]]
    return lines
