"""`lowmerge export`: parse, call export.pipeline, print what it measured.

Importing this module costs only click: torch, transformers, onnx and onnxruntime are imported when the command
runs, so `lowmerge --help` stays fast and works where the ONNX extras are not installed.
"""
from __future__ import annotations

from pathlib import Path

import click

_EPILOG = """\b
Examples:
  lowmerge export ./merged -o ./onnx/model.onnx                    # export + validation
  lowmerge export ./merged -o ./onnx/model.onnx --quantize int8 --quantize int4
  lowmerge export ./merged -o ./onnx/model.onnx --no-validate      # memory bounded by one tensor

\b
Models: Llama-family and GPT-2 decoder LMs (*ForCausalLM, GPT2LMHeadModel), BERT-family encoders (BertModel)
and their classifiers (*ForSequenceClassification), as Hugging Face directories with safetensors weights.
The graph takes input_ids and attention_mask (int64, [batch, sequence], both axes dynamic; 1 = token, 0 =
padding) and returns one fp32 tensor: logits [batch, sequence, vocab] of every position for a decoder (no KV
cache: each call recomputes the whole sequence), logits [batch, labels] for a classifier, last_hidden_state
[batch, sequence, hidden] for a base encoder. OUT holds the graph; OUT.data beside it holds every weight.

\b
Memory: the export itself reads one tensor at a time and needs about the runtime (~0.5 GB) plus the largest
tensor, whatever the model's size. Validation loads the whole model in PyTorch and in onnxruntime (about twice
its fp32 size); onnxruntime's quantizers load the whole fp32 model too (int8: several times its size). Export
on a small machine with --no-validate and quantize elsewhere.
"""


@click.command(epilog=_EPILOG)
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The .onnx file to write; its weights go to OUT.data and the report to <stem>.report.json.")
@click.option("--validate/--no-validate", "check", default=True, show_default=True,
              help="Compare onnxruntime with transformers (PyTorch) on padded batches of several shapes; fail "
                   "above --tolerance. Needs the model in memory twice (see Memory below).")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Largest max|onnx - torch| / max|torch| of the output that validation accepts (fp32).")
@click.option("--quantize", "schemes", multiple=True, type=click.Choice(["int8", "int4"]),
              help="Also write <stem>.int8.onnx (dynamic int8, onnxruntime.quantization) and/or <stem>.int4.onnx "
                   "(4-bit weight-only MatMulNBits, blocks of 32); repeatable. Reports size, latency and "
                   "agreement with the fp32 model. The quantizers load the whole model.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=18),
              help="ONNX opset of the graph.")
@click.option("--force", is_flag=True, help="Replace OUT and OUT.data if they exist.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def export(model_dir: Path, out: Path, check: bool, tolerance: float, schemes: tuple[str, ...], opset: int,
           force: bool, debug: bool) -> None:
    """Export MODEL_DIR to ONNX: one graph with dynamic batch and sequence axes, weights as external data.

    The weights are streamed from the safetensors files into OUT.data one tensor at a time (fp32), so the
    export's peak memory does not grow with the model. A JSON report (validation errors, sizes, latencies,
    peak memory) is written beside OUT and summarized here.
    """
    from .pipeline import report_path, run
    report = run(model_dir, out, check=check, schemes=tuple(dict.fromkeys(schemes)), tolerance=tolerance,
                 opset=opset, force=force)
    for line in summary_lines(report):
        click.echo(line)
    click.echo(f"report: {report_path(out)}")


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
