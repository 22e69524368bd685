"""A Hugging Face directory to one ``.onnx`` graph plus one external-data file, in memory bounded by one tensor.

How: trace the model on fake tensors with the dynamo exporter (``optimize=False``: its constant folding would read
weights), then give every graph initializer a lazy tensor that reads its value from the safetensors when
``onnx_ir.save`` writes it, one at a time. Linear weights reach their MatMul through a Transpose of the stored
matrix; that Transpose is folded into a lazily transposed initializer so the graph has plain ``MatMul(x, W)``,
which onnxruntime runs without a copy and its quantizers recognize.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_merge.errors import ExportError, InputError, OutputError

from . import models
from .folders import make_parent, scratch_beside
from .runtime import require
from .weights import ByParameter, Weights

INPUTS = ("input_ids", "attention_mask")
_PREFIX = "model."          # the wrapper's attribute name, which prefixes every initializer name
_IN_FLIGHT_BYTES = 64 << 20  # what onnx_ir may hold besides the tensor being written


@dataclass
class ExportResult:
    path: Path
    data_path: Path
    task: str
    output: str
    opset: int
    seconds: float


class _Wrapper(torch.nn.Module):
    """(input_ids, attention_mask) -> the one output tensor; eval mode so the reference has no dropout."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[self.output]


def export_onnx(model_dir: Path, out: Path, *, opset: int = 18, force: bool = False) -> ExportResult:
    """Write ``out`` (the graph) and ``out.data`` (every weight), fp32, dynamic batch and sequence axes.

    Both files appear together at the end (written in a temporary folder beside them, then renamed): a run that
    fails leaves no file that looks complete.
    """
    ir, = require("onnx_ir")
    require("onnxscript", "transformers")
    t0 = time.perf_counter()
    _check_output(out, force)
    config = models.load_config(model_dir)
    kind = models.kind_of(config, model_dir)
    models.refuse_plain(config, model_dir)
    weights = Weights(model_dir)
    model = _trace(config, kind, opset)
    meta = models.meta_model(config, kind, torch.float32)
    buffers, ties = models.buffers_and_ties(meta)
    params = ByParameter(meta, weights, ties)
    sources = _attach_weights(ir, model.graph, params, buffers)
    _fold_weight_transposes(ir, model.graph, params, sources)
    _strip_debug_metadata(model.graph)
    data_path = out.with_name(out.name + ".data")
    try:
        _save_atomically(ir, model, out, data_path)
    finally:
        weights.close()
    return ExportResult(out, data_path, kind.task, kind.output, opset, time.perf_counter() - t0)


def _check_output(out: Path, force: bool) -> None:
    if out.suffix != ".onnx":
        raise OutputError("the output must end in .onnx", path=out, hint="e.g. -o model/model.onnx")
    data = out.with_name(out.name + ".data")
    if not force and (out.exists() or data.exists()):
        raise OutputError("output exists", path=out, hint="pass --force to replace it, or choose another -o")
    make_parent(out)


def _trace(config, kind: models.Kind, opset: int):
    """The ONNX graph (an onnx_ir model) of the fake model, with fake initializers."""
    wrapper = _Wrapper(models.fake_model(config, kind, torch.float32), kind.output)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    example = torch.ones(2, 8, dtype=torch.long)
    # its "torchvision is not installed, skipping torchvision::nms" lines are about ops no exported model uses
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, (example, example.clone()), dynamo=True, optimize=False, opset_version=opset,
                input_names=list(INPUTS), output_names=[kind.output], verbose=False,
                dynamic_shapes={name: {0: batch, 1: seq} for name in INPUTS})
        except Exception as e:  # torch.onnx raises many unrelated types; all mean the trace failed
            raise ExportError(f"torch.onnx.export failed: {str(e).splitlines()[0]}",
                              hint="run with --debug for the exporter's traceback") from e
        finally:
            registry_log.setLevel(level)
    return program.model


def _attach_weights(ir, graph, params: ByParameter, buffers: dict[str, torch.Tensor]) -> dict[str, str]:
    """Give every initializer its value: a lazy read of the checkpoint, or a real buffer the checkpoint lacks.

    Returns the parameter name behind each lazily read initializer.
    """
    sources: dict[str, str] = {}
    for name, value in list(graph.initializers.items()):
        key = name.removeprefix(_PREFIX)
        source = params.stored(key)
        shape = tuple(value.shape.numpy())
        if source is not None:
            entry = params.weights.entries[source]
            if entry.shape != shape:
                raise InputError(f"shape {list(entry.shape)} in the checkpoint, config.json implies {list(shape)}",
                                 path=entry.path, tensor=source, hint="config.json does not describe these weights")
            value.const_value = ir.LazyTensor(_reader(ir, params, key, None), dtype=value.dtype,
                                              shape=value.shape, name=name)
            sources[name] = key
        elif key in buffers:
            value.const_value = ir.tensor(buffers[key].to(torch.float32 if buffers[key].is_floating_point()
                                                          else buffers[key].dtype).numpy(), name=name)
        else:
            raise InputError("the checkpoint has no such tensor", path=params.weights.model_dir, tensor=key,
                             hint="config.json's architecture needs it; is this the right directory?")
    return sources


def _reader(ir, params: ByParameter, name: str, perm: tuple[int, ...] | None):
    """A function that reads one parameter as fp32 (transposed by ``perm``) when onnx_ir writes it."""
    def load():
        t = params.read(name)
        if perm is not None:
            t = t.permute(*perm).contiguous()
        return ir.tensor(t.numpy())
    return load


def _fold_weight_transposes(ir, graph, params: ByParameter, sources: dict[str, str]) -> None:
    """Replace ``Transpose(W)`` of a checkpoint weight used once by an initializer read already transposed.

    A weight with other consumers (tied embeddings: Gather and the lm_head's Transpose) keeps its Transpose
    rather than being stored twice.
    """
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or src.name not in sources or len(src.consumers()) != 1:
            continue
        perm = tuple(node.attributes["perm"].as_ints())
        shape = ir.Shape([src.shape[p] for p in perm])
        folded = ir.Value(name=src.name + ".T", shape=shape, type=ir.TensorType(src.dtype))
        folded.const_value = ir.LazyTensor(_reader(ir, params, sources[src.name], perm), dtype=src.dtype,
                                           shape=shape, name=folded.name)
        graph.register_initializer(folded)
        node.outputs[0].replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        del graph.initializers[src.name]


def _strip_debug_metadata(graph) -> None:
    """The exporter stores a stack trace per node: 20x the graph's size and of no use to a deployer."""
    for node in graph.all_nodes():
        node.metadata_props.clear()


def _save_atomically(ir, model, out: Path, data_path: Path) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass
    RemoveUnusedNodesPass()(model)
    RemoveUnusedOpsetsPass()(model)
    try:
        with scratch_beside(out) as tmp:
            ir.save(model, tmp / out.name, external_data=data_path.name, max_workers=1,
                    max_in_flight_bytes=_IN_FLIGHT_BYTES, alignment=4096)
            os.replace(tmp / data_path.name, data_path)
            os.replace(tmp / out.name, out)
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror}", path=out, hint="check free disk space") from None
