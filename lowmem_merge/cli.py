"""The `lowmerge` command: parse, call the API, format errors. Nothing here knows how a merge works."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import click
from click.core import ParameterSource

from .calib.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from .errors import ConfigError, LowmergeError
from .methods import DEFAULT_METHOD, REGISTRY

_EPILOG_MERGE = """\b
Examples:
  lowmerge merge ./base ./math ./code -o ./merged
  lowmerge merge ./base ./a ./b -o ./merged --method ties -p density=0.3 -p scale=1.0
  lowmerge merge ./base ./a ./b -o ./merged --method actmat -p rho=1e-3 --device cuda --dtype bfloat16
  lowmerge merge ./base ./a ./b -o ./merged --resume      # continue a run that was interrupted
  lowmerge merge ./base ./a ./b -o ./merged --quantize nf4  # 4-bit bitsandbytes weights for transformers
  lowmerge merge --config recipe.yaml -o ./merged         # a mergekit recipe (linear, task_arithmetic, ties, ...)
  lowmerge merge ./base ./lora_a ./lora_b -o ./adapter --output-format peft   # one merged PEFT adapter
  lowmerge merge ./base ./a ./b -o ./merged --method chain --calib a.txt --calib b.txt   # with each task's text

Inputs are Hugging Face directories (model.safetensors, or shards with model.safetensors.index.json), single
.safetensors files, PyTorch .bin checkpoints (loaded with weights_only=True), or Hugging Face ids (org/name,
org/name@revision) already in the local cache: nothing is ever downloaded. Memory stays bounded by one
tensor of one expert plus the method's statistics for it, whatever the number of experts or the model's size.
`lowmerge methods` lists every method and its parameters."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run unwinds as on Ctrl-C: writers stop, finished shards are
    recorded, and only temporary names are left."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


class _Group(click.Group):
    def main(self, *args, **kwargs):  # one line per user error, a traceback only with --debug
        debug = "--debug" in sys.argv
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except LowmergeError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except click.exceptions.Abort as e:
            terminated = isinstance(e.__cause__, _Terminated)
            click.echo("aborted" + (" (SIGTERM)" if terminated else ""), err=True)
            if "merge" in (kwargs.get("args") or sys.argv[1:])[:1]:
                click.echo("hint: rerun the same command with --resume to continue from the finished shards",
                           err=True)
            sys.exit(143 if terminated else 130)
        except click.UsageError as e:  # a bad option reads like every other user error: one line and a hint
            if isinstance(e, click.exceptions.NoArgsIsHelpError):
                e.show()
            else:
                command = e.ctx.command_path if e.ctx else "lowmerge"
                click.echo(f"error: {e.format_message()}\nhint: see '{command} --help'", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="lowmerge")
def main() -> None:
    """lowmerge: merge fine-tuned experts of one base model, streaming, in bounded memory."""


def _parse_kv(items: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-p {item!r} is not KEY=VALUE", hint="example: -p scale=0.4")
        out[key.strip()] = value.strip()
    return out


def _progress_bar(quiet: bool, desc: str = "merging") -> tuple[Callable[[int, int], None] | None,
                                                               Callable[[], None]]:
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm
    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
    return update, bar.close


@main.command(epilog=_EPILOG_MERGE)
@click.argument("base", required=False, type=click.Path(path_type=Path))
@click.argument("experts", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (must be new or empty unless --resume / --force).")
@click.option("--config", "config", default=None, type=click.Path(path_type=Path),
              help="A mergekit recipe (YAML) giving base, experts, method, parameters and dtype, instead of "
                   "BASE EXPERTS --method -p.")
@click.option("-m", "--method", default=DEFAULT_METHOD, show_default=True,
              type=click.Choice(list(REGISTRY)), help="Merge rule; see `lowmerge methods`.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Method parameter, repeatable (e.g. -p rho=1e-3).")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N: where deltas and statistics are computed (fp32).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Output dtype of float tensors; auto keeps the base's.")
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output shard (e.g. 4GB, 500MB).")
@click.option("--max-memory", default=None,
              help="Host memory for merge buffers (e.g. 8GB; the Python/torch runtime, ~0.3 GB, comes on top): "
                   "elementwise rules take smaller row chunks and read-ahead to fit; a tensor that cannot fit "
                   "(a matrix rule's statistics) stops the run before it starts, naming the tensor.")
@click.option("--max-device-memory", default=None,
              help="GPU memory a merge may use (default: 90% of what is free at the start); a tensor whose "
                   "statistics need more is merged on the CPU.")
@click.option("--quantize", default=None, type=click.Choice(["int8", "nf4"]),
              help="Write linear weights quantized with bitsandbytes (int8: LLM.int8 row-wise; nf4: 4-bit, "
                   "double-quantized), loadable by transformers from config.json's quantization_config; other "
                   "tensors keep --dtype. Needs pip install 'lowmerge[bnb]'.")
@click.option("--calib", "calib", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Calibration data for regmean / chain: once per expert, in the experts' order, "
                                   "each expert's own task text (one example per line, or JSONL with a 'text' "
                                   "field), tokenized with BASE's tokenizer.")
@click.option("--calib-samples", default=DEFAULT_SAMPLES, show_default=True, type=click.IntRange(min=1),
              help="Examples used per calibration file (the first ones).")
@click.option("--calib-seq-len", default=DEFAULT_SEQ_LEN, show_default=True, type=click.IntRange(min=1),
              help="Tokens per example: longer ones are cut, shorter ones padded.")
@click.option("--tokenizer-source", default=None, metavar="base|union|DIR",
              help="Output vocabulary, with rows matched by token: base (the base's tokenizer; tokens only experts "
                   "know are dropped), union (the base's plus every token an expert added, with its added tokens "
                   "and chat template), or a model directory whose tokenizer to use. Default: the base's, or union "
                   "when an expert's vocabulary differs.")
@click.option("--output-format", default="model", show_default=True, type=click.Choice(["model", "peft"]),
              help="model: the merged model. peft (every expert a LoRA adapter of BASE): one merged PEFT adapter "
                   "(adapter_config.json, adapter_model.safetensors) to load onto BASE. Exact for task_arithmetic "
                   "and average (the factors concatenated: rank = sum of ranks) and for actmat / wudi_cfs (their "
                   "core space); every other rule's merged delta is cut to --adapter-rank by SVD, with each "
                   "module's relative error in lowmerge_report.json.")
@click.option("--adapter-rank", default=None, type=click.IntRange(min=1),
              help="With --output-format peft: the rank each module keeps at most; a merged delta of higher rank "
                   "is SVD-truncated (default: exact forms keep their rank, other rules keep the sum of the "
                   "adapters' ranks on the module).")
@click.option("--resume", is_flag=True, help="Continue an interrupted merge in OUT: keeps the shards it "
                                             "finished (verified by sha256) after checking inputs and options.")
@click.option("--force", is_flag=True, help="Replace a previous lowmerge output in OUT (deletes only files "
                                            "lowmerge wrote there).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def merge(base: Path | None, experts: tuple[Path, ...], out: Path, config: Path | None, method: str,
          params: tuple[str, ...], device: str, dtype: str, shard_size: str, max_memory: str | None,
          max_device_memory: str | None, quantize: str | None, calib: tuple[Path, ...], calib_samples: int,
          calib_seq_len: int, tokenizer_source: str | None, output_format: str, adapter_rank: int | None,
          resume: bool, force: bool, quiet: bool, debug: bool) -> None:
    """Merge EXPERTS (fine-tunes of BASE) into one model in OUT.

    OUT receives the merged safetensors shards, config and tokenizer files copied from BASE,
    lowmerge_report.json and a model card; it loads with transformers' from_pretrained as it is. A run
    that stops half way leaves no file that looks complete.

    Under torchrun (torchrun --nproc-per-node N -m lowmem_merge merge ...) each process merges a share of
    the tensors and rank 0 assembles OUT; the output is the same.
    """
    from .merge import merge as run
    if config is not None:
        base, experts, method, kv, dtype, schedule, slices, tokenizer_source, notes = _from_recipe(
            config, base, params, dtype, tokenizer_source)
        if slices:
            return _stack(slices, out, dtype, shard_size, resume, force, quiet)
    elif base is None or not experts:
        raise click.UsageError("missing BASE and EXPERTS (or --config RECIPE)")
    else:
        kv, schedule, notes = _parse_kv(params), None, ()
    if adapter_rank is not None and output_format != "peft":
        raise click.UsageError("--adapter-rank is for --output-format peft")
    update, close = _progress_bar(quiet or int(os.environ.get("RANK", "0")) > 0)   # torchrun: rank 0's bar only
    try:
        report = run(base, list(experts), out, method, device=device, dtype=dtype, shard_size=shard_size,
                     max_memory=max_memory, max_device_memory=max_device_memory, resume=resume, force=force,
                     quantize=quantize, progress=update, schedule=schedule, calib=list(calib) or None,
                     calib_samples=calib_samples, calib_seq_len=calib_seq_len, tokenizer_source=tokenizer_source,
                     output_format=output_format, adapter_rank=adapter_rank, notes=notes, **kv)
    finally:
        close()
    if not quiet and report is not None:             # None: a torchrun rank other than 0
        for line in report.summary_lines():
            click.echo(line)
        if "adapter" in report.data:
            click.echo(f"  PEFT adapter: {len(report.data['adapter']['modules'])} modules, largest relative "
                       f"truncation error {report.data['adapter']['max_rel_error']:.3g}")


def _from_recipe(config: Path, base: Path | None, params: tuple[str, ...], dtype: str,
                 tokenizer_source: str | None) -> tuple:
    """(base, experts, method, params, dtype, schedule, slices, tokenizer_source, notes) from the recipe; the options it
    replaces must not be given too."""
    from .recipe import check_layer_range, load_recipe
    ctx = click.get_current_context()
    given = [name for name, flag in (("BASE/EXPERTS", base is not None), ("-p", bool(params)),
                                     ("--method", ctx.get_parameter_source("method") != ParameterSource.DEFAULT))
             if flag]
    if given:
        raise ConfigError(f"--config gives the inputs, method and parameters: {', '.join(given)} cannot be given too",
                          hint="put them in the recipe, or drop --config")
    recipe = load_recipe(config)
    check_layer_range(recipe)
    if recipe.dtype != "auto" and ctx.get_parameter_source("dtype") != ParameterSource.DEFAULT:
        raise ConfigError(f"--dtype and the recipe's dtype ({recipe.dtype}) are both given", path=config,
                          hint="keep one")
    if recipe.tokenizer_source is not None and tokenizer_source is not None:
        raise ConfigError(f"--tokenizer-source and the recipe's tokenizer_source ({recipe.tokenizer_source}) are "
                          "both given", path=config, hint="keep one")
    return Path(recipe.base), [Path(e) for e in recipe.experts], recipe.method, recipe.params, \
        recipe.dtype if recipe.dtype != "auto" else dtype, recipe.schedule, recipe.slices, \
        recipe.tokenizer_source or tokenizer_source, recipe.notes


def _stack(slices: list, out: Path, dtype: str, shard_size: str, resume: bool, force: bool, quiet: bool) -> None:
    """A passthrough recipe: layer ranges copied into one model (``stack.py``)."""
    from .stack import stack
    update, close = _progress_bar(quiet, "stacking")
    try:
        report = stack(slices, out, dtype=dtype, shard_size=shard_size, resume=resume, force=force, progress=update)
    finally:
        close()
    if not quiet:
        d = report.data
        click.echo(f"stacked {d['output']['layers']} layers from {len(slices)} slice(s) into {d['output']['dir']}")
        click.echo(f"  {d['output']['tensors']} tensors in {len(d['output']['shards'])} shard(s), "
                   f"time {d['timings_s']['total']:.1f} s")


_EPILOG_MOE = """\b
Examples:
  lowmerge moe moe.yaml -o ./moe                  # mergekit-moe's YAML: base_model, experts, gate_mode, ...
  lowmerge moe moe.yaml -o ./moe --device cuda    # run the base on the GPU for gate_mode hidden
  lowmerge moe moe.yaml -o ./moe --force --seed 1 # gate_mode random: another seeded draw

gate_mode hidden (also hidden_avg, hidden_last): each router row is the base's hidden states on the expert's
positive prompts (minus its negative prompts), per layer, normalized; cheap_embed: the prompts' token embeddings;
random: a seeded normal draw. Attention, norms, embeddings and head come from base_model, each expert's MLP goes
into its own expert slot; the output is a MixtralForCausalLM directory with the base's tokenizer
(with one shared_experts entry, a Qwen2MoeForCausalLM)."""


@main.command(epilog=_EPILOG_MOE)
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (a Hugging Face model directory).")
@click.option("--device", default="auto", show_default=True, help="Where the base runs for gate_mode hidden.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of gate_mode random's draw.")
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output shard (e.g. 4GB, 500MB).")
@click.option("--force", is_flag=True, help="Replace a previous lowmerge output in OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def moe(config: Path, out: Path, device: str, seed: int, shard_size: str, force: bool, quiet: bool,
        debug: bool) -> None:
    """Build a Mixtral-style mixture of experts from a base and dense fine-tunes (mergekit-moe's CONFIG)."""
    from .moe import build_moe
    update, close = _progress_bar(quiet, "building")
    try:
        report = build_moe(config, out, device=device, seed=seed, shard_size=shard_size, force=force,
                           progress=update)
    finally:
        close()
    if not quiet:
        for line in report.summary_lines():
            click.echo(line)


@main.command()
def methods() -> None:
    """List every merge method with its parameters and defaults."""
    for name, cls in REGISTRY.items():
        default = " (default)" if name == DEFAULT_METHOD else ""
        kind = "data-free" if cls.data_free else "needs calibration data"
        click.echo(f"{name}{default} [{kind}]: {cls.summary}")
        for f in dataclasses.fields(cls.Params):
            click.echo(f"    {f.name}={f.default}  {cls.param_help.get(f.name, '')}".rstrip())


@main.command()
@click.argument("directory", default="demo-output", type=click.Path(path_type=Path))
@click.option("--method", default="actmat", show_default=True,
              type=click.Choice([m for m, c in REGISTRY.items() if not c.calibration]))  # the example has no data
@click.option("--force", is_flag=True, help="Rebuild DIRECTORY if a previous demo is there.")
@click.option("--export/--no-export", "export_onnx", default=True, show_default=True,
              help="Go on to ONNX: export the merged model, validate it against PyTorch and quantize it to int8 "
                   "(needs the onnx-cpu or onnx-gpu extra; skipped with a note without it).")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def demo(directory: Path, method: str, force: bool, export_onnx: bool, debug: bool) -> None:
    """Build a small Llama-shaped base and three experts in DIRECTORY (no download), merge them, and export
    the merged model to ONNX (validated, then quantized to int8).

    The inputs go to DIRECTORY/inputs, the merged model to DIRECTORY/merged, the ONNX files to DIRECTORY/onnx.
    Ends with one table: time, peak memory, size, onnxruntime latency and error of each step.
    """
    from .demo import run_demo
    for line in run_demo(directory, method, force=force, export=export_onnx):
        click.echo(line)


_EPILOG_INSPECT = """\b
Examples:
  lowmerge inspect ./base ./math ./code                  # the plan, at once
  lowmerge inspect ./base ./math ./code --stats          # + one read of the weights: per-layer diagnostics
  lowmerge inspect ./base ./a ./b --stats --json > stats.json   # every tensor's numbers

--stats, per layer (a layer's tensors taken as one vector) and for the whole model: ‖Δ_t‖ of each expert, the
range of cosines between task vectors, ACE's γ (the largest over the layer's LIN tensors; γ > τ = 0.3 takes ACE's
normalized branch) and the largest condition number λmax/λmin of ACTMat's A = Σ_t Δ_tᵀΔ_t (fp64, no ridge) over
LIN tensors with n ≤ --cond-max-dim input features; ∞ (k): k tensors whose A is singular (LoRA experts, n > T·m).
--json has every tensor's norms, cosine matrix, γ, condition number and rank. Warnings: an expert equal to the
base, total ‖Δ_t‖ of two experts more than 10× apart, tied embeddings."""


@main.command(epilog=_EPILOG_INSPECT)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("experts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="Output dtype, as for merge.")
@click.option("--tensors", "show_tensors", is_flag=True, help="Also list every tensor with its class and shape.")
@click.option("--stats", is_flag=True, help="Also read every weight once for task-vector diagnostics (below).")
@click.option("--device", default="auto", show_default=True,
              help="With --stats: auto (CUDA when present), cpu, cuda or cuda:N: where Δ and statistics are computed.")
@click.option("--cond-max-dim", default=4096, show_default=True, type=click.IntRange(min=0),
              help="With --stats: condition numbers only for LIN tensors with at most this many input features "
                   "(A costs 8n² bytes and about an ACTMat merge's time); 0: none.")
@click.option("-m", "--method", default=None, type=click.Choice(list(REGISTRY)),
              help="Plan this rule with -p's parameters (the others keep their defaults).")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter of --method, repeatable, as for merge (e.g. -p select_topk=0.1).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and --stats) as JSON.")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def inspect(base: Path, experts: tuple[Path, ...], dtype: str, show_tensors: bool, stats: bool, device: str,
            cond_max_dim: int, method: str | None, params: tuple[str, ...], as_json: bool, debug: bool) -> None:
    """Show what a merge of EXPERTS into BASE would do, from the headers alone (reads no weights).

    Tensor classes and sizes, bytes each pass reads, the peak memory each method would need, and the input
    errors a merge would stop on. With --stats it reads the inputs once more for per-layer diagnostics.
    """
    import json

    from .inspect import describe_plan
    if params and method is None:
        raise ConfigError("-p needs --method: the rule whose parameters they are", hint="e.g. -m sce -p select_topk=0.1")
    update, close = _progress_bar(not stats, "reading")
    try:
        data = describe_plan(base, list(experts), dtype, stats=stats, device=device, cond_max_dim=cond_max_dim,
                             progress=update, params={method: _parse_kv(params)} if method else None)
    finally:
        close()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for line in _plan_lines(data, show_tensors):
        click.echo(line)


def _plan_lines(data: dict, show_tensors: bool) -> list[str]:
    from .sizes import format_size
    lines = [f"base: {data['base']}", f"experts ({len(data['experts'])}): " + ", ".join(data["experts"]),
             "tensors: " + ", ".join(f"{c} {v['count']} ({format_size(v['bytes'])})"
                                     for c, v in data["classes"].items()),
             f"one read of base and experts: {format_size(data['bytes_per_pass'])}",
             *([_vocab_line(data["vocabulary"])] if "vocabulary" in data else []),
             f"estimated peak memory (runtime ~{format_size(data['runtime_bytes'])} included):"]
    for name, m in data["methods"].items():
        lines.append(f"  {name:16s} {format_size(m['peak_bytes']):>9s}  reads x{m['reads']}  "
                     f"largest: {m['largest_tensor']}")
    lines += [f"warning: {w}" for w in data["warnings"]]
    if "stats" in data:
        from .diagnostics import stats_lines
        lines += stats_lines(data["stats"])
    if show_tensors:
        lines += [f"  {t['name']}  {t['class']}  {t['shape']}  {t['dtype']}" for t in data["tensors"]]
    return lines


def _vocab_line(v: dict) -> str:
    added = ", ".join(v["added_tokens"][:8]) + (", ..." if len(v["added_tokens"]) > 8 else "")
    return (f"vocabulary: the experts' differ from the base's: merged over the {v['tokenizer_source']} vocabulary, "
            f"{v['rows']} rows (base {v['base_rows']}), matched by token" + (f"; added: {added}" if added else ""))

def _add_export_command() -> None:
    """`lowmerge export` lives in export/ (which knows nothing of merging); importing it costs only click."""
    from export.cli import export
    main.add_command(export)


_add_export_command()

