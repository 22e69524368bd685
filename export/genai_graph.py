"""The generation graph of a RoPE decoder, written op by op with onnxruntime's fused operators, weights streamed.

One graph serves the prompt and every later token: it takes ``input_ids`` (batch, seq), ``attention_mask``
(batch, past + seq) and per layer ``past_key_values.{i}.key|value`` (batch, kv_heads, past, head_dim), and returns
``logits`` (batch, seq, vocab, fp32) and ``present.{i}.key|value``. These are the names and layouts
onnxruntime-genai's decoder expects (its ``genai_config.json`` points at them).

Per layer: ``SimplifiedLayerNormalization`` (RMSNorm) / ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm
in one kernel), q, k and v projections packed into one MatMul, ``GroupQueryAttention`` (RoPE from cos/sin tables,
the KV cache, causal and sliding-window masking from the attention mask), the output projection, and the SiLU-gated
MLP. Weights go to the external-data file as each is read: a layer's q, k and v are the most held at once.

Precisions: ``fp32``; ``fp16`` (weights, activations and the cache in fp16; norms and softmax accumulate in fp32
inside onnxruntime's kernels; logits cast to fp32); ``int4`` / ``int8`` (MatMulNBits, blocks of 32, activations
and cache fp32). What stays in higher precision under int4/int8: the embedding table (a lookup, not a product:
quantizing it saves memory, not time, and shifts every hidden state), every norm weight and bias (tiny), the RoPE
tables, and the LM head, which is quantized to 8 bits under int4 (the logits decide every token, and an 8-bit head
is still 4x smaller than fp32).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .decoder import DecoderSpec
from .tensors import ExternalData, quantize_blocks

BLOCK = 32
MS = "com.microsoft"


class Graph:
    """Nodes, inputs, outputs and initializers of one ONNX graph, with unique output names per node."""

    def __init__(self, data: ExternalData, float_type: int) -> None:
        import onnx
        self.onnx = onnx
        self.data = data
        self.float_type = float_type                  # TensorProto.FLOAT or FLOAT16: activations and weights
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.initializers: list = []
        self.constants: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attrs) -> list[str]:
        outs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, name=name, domain=domain or None,
                                                     **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def const(self, values: list[int] | int) -> str:
        """An int64 constant (a scalar for an int), shared by every node that uses the same value."""
        key = (tuple(values) if isinstance(values, list) else values,)
        if key not in self.constants:
            name = ("const/int64/" if isinstance(values, int) else "const/int64s/") + \
                "_".join(map(str, np.atleast_1d(values)))
            arr = np.array(values, dtype=np.int64)
            self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
            self.constants[key] = name
        return self.constants[key]

    def model(self, opset: int):
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, "lowmerge_decoder", self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                                 ir_version=10, producer_name="lowmerge")


Reader = Callable[[str], torch.Tensor]   # model parameter name -> fp32 CPU tensor


class DecoderWriter:
    """Writes the graph of ``spec`` at ``precision``, reading each weight through ``read`` (model names)."""

    def __init__(self, spec: DecoderSpec, precision: str, read: Reader, has: Callable[[str], bool],
                 data: ExternalData, cos_sin: tuple[np.ndarray, np.ndarray]) -> None:
        import onnx
        self.spec, self.precision, self.read, self.has = spec, precision, read, has
        self.np_float = np.float16 if precision == "fp16" else np.float32
        self.g = Graph(data, onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT)
        self.cos_sin = cos_sin

    # -- weights ------------------------------------------------------------------------------------------------
    def _float(self, name: str, t: torch.Tensor) -> str:
        return self.g.weight(name, t.numpy().astype(self.np_float))

    def _linear(self, x: str, w: torch.Tensor, name: str, bits: int | None = None) -> str:
        """``x @ wᵀ`` for a weight ``w`` (N, K) as stored by torch.nn.Linear."""
        bits = bits if bits is not None else {"int4": 4, "int8": 8}.get(self.precision)
        n, k = w.shape
        if bits is None:
            wt = self._float(f"{name}.weight", w.t().contiguous())
            return self.g.one("MatMul", [x, wt], name)
        codes, scales = quantize_blocks(w, bits, BLOCK)
        q = self.g.weight(f"{name}.weight_q{bits}", codes)
        s = self.g.weight(f"{name}.weight_scales", scales.astype(self.np_float))
        return self.g.one("MatMulNBits", [x, q, s], name, domain=MS, K=k, N=n, bits=bits, block_size=BLOCK,
                          accuracy_level=4 if self.precision in ("int4", "int8") else 0)

    def _bias(self, x: str, names: list[str], name: str) -> str:
        if not self.has(names[0]):
            return x
        b = torch.cat([self.read(n) for n in names])
        return self.g.one("Add", [x, self._float(f"{name}.bias", b)], name + "/bias")

    # -- graph --------------------------------------------------------------------------------------------------
    def build(self, opset: int = 21):
        s, g = self.spec, self.g
        helper, tp = g.onnx.helper, g.onnx.TensorProto
        g.inputs += [helper.make_tensor_value_info("input_ids", tp.INT64, ["batch_size", "sequence_length"]),
                     helper.make_tensor_value_info("attention_mask", tp.INT64,
                                                   ["batch_size", "total_sequence_length"])]
        kv_shape = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        out_shape = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        for i in range(s.layers):
            for kind in ("key", "value"):
                g.inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", g.float_type, kv_shape))
        g.outputs.append(helper.make_tensor_value_info("logits", tp.FLOAT,
                                                       ["batch_size", "sequence_length", s.vocab]))
        for i in range(s.layers):
            for kind in ("key", "value"):
                g.outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", g.float_type, out_shape))

        seqlens, total = self._mask_inputs()
        cos = g.weight("cos_cache", self.cos_sin[0].astype(self.np_float))
        sin = g.weight("sin_cache", self.cos_sin[1].astype(self.np_float))
        embed = self.read("model.embed_tokens.weight")
        x = g.one("Gather", [self._float("model.embed_tokens.weight", embed), "input_ids"], "/model/embed_tokens")
        del embed
        residual = None
        for i in range(s.layers):
            p = f"model.layers.{i}"
            normed, residual = self._norm(x, residual, f"{p}.input_layernorm.weight", f"/{p}/input_layernorm")
            attn = self._attention(normed, i, seqlens, total, cos, sin)
            normed, residual = self._norm(attn, residual, f"{p}.post_attention_layernorm.weight",
                                          f"/{p}/post_attention_layernorm")
            x = self._mlp(normed, i)
        normed, _ = self._norm(x, residual, "model.norm.weight", "/model/norm")
        head = self.read("lm_head.weight")
        head_bits = 8 if self.precision == "int4" else None
        logits = self._linear(normed, head, "/lm_head", head_bits)
        del head
        if self.precision == "fp16":
            logits = g.one("Cast", [logits], "/lm_head/cast", to=tp.FLOAT)
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
        return g.model(opset)

    def _mask_inputs(self) -> tuple[str, str]:
        """GroupQueryAttention's view of the mask: per row the index of its last token (seqlens_k, int32) and the
        total length (a scalar int32). genai pads on the left, so ``sum(mask) - 1`` is the last real position."""
        g, tp = self.g, self.g.onnx.TensorProto
        total_ids = g.one("ReduceSum", ["attention_mask", g.const([1])], "/mask/sum", keepdims=0)
        last = g.one("Sub", [total_ids, g.const(1)], "/mask/last")
        seqlens = g.one("Cast", [last], "/mask/seqlens_k", to=tp.INT32)
        shape = g.one("Shape", ["attention_mask"], "/mask/shape")
        length = g.one("Gather", [shape, g.const(1)], "/mask/length", axis=0)
        total = g.one("Cast", [length], "/mask/total_length", to=tp.INT32)
        return seqlens, total

    def _norm(self, x: str, residual: str | None, weight: str, name: str) -> tuple[str, str]:
        """RMSNorm of ``x + residual``; returns (normed, the new residual stream)."""
        w = self._float(weight, self.read(weight))
        if residual is None:
            return self.g.one("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=self.spec.eps,
                              stash_type=1), x
        normed, _, _, summed = self.g.op("SkipSimplifiedLayerNormalization", [residual, x, w], name, 4,
                                         domain=MS, epsilon=self.spec.eps)
        return normed, summed

    def _attention(self, x: str, i: int, seqlens: str, total: str, cos: str, sin: str) -> str:
        s, g = self.spec, self.g
        p = f"model.layers.{i}.self_attn"
        q_rows, kv_rows = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if s.fused:
            qkv_w = self.read(f"{p}.qkv_proj.weight")
            bias_names = [f"{p}.qkv_proj.bias"]
        else:
            qkv_w = torch.cat([self.read(f"{p}.{n}_proj.weight") for n in "qkv"])
            bias_names = [f"{p}.{n}_proj.bias" for n in "qkv"]
        qkv = self._bias(self._linear(x, qkv_w, f"/{p}/qkv_proj"), bias_names, f"/{p}/qkv_proj")
        del qkv_w
        inputs = [qkv, "", ""]
        if s.qk_norm:                           # Qwen3: RMSNorm over each head's q and k before RoPE
            q, k, v = g.op("Split", [qkv, g.const([q_rows, kv_rows, kv_rows])], f"/{p}/split", 3, axis=-1)
            q = self._head_norm(q, s.heads, f"{p}.q_norm.weight", f"/{p}/q_norm")
            k = self._head_norm(k, s.kv_heads, f"{p}.k_norm.weight", f"/{p}/k_norm")
            inputs = [q, k, v]
        out = g.op("GroupQueryAttention",
                   [*inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
                   f"/{p}/attn", 3, domain=MS, num_heads=s.heads, kv_num_heads=s.kv_heads,
                   scale=1.0 / math.sqrt(s.head_dim), local_window_size=s.windows[i], do_rotary=1,
                   rotary_interleaved=0)
        for name, kind in ((out[1], "key"), (out[2], "value")):
            g.nodes.append(g.onnx.helper.make_node("Identity", [name], [f"present.{i}.{kind}"],
                                                   name=f"/{p}/present_{kind}"))
        o = self._linear(out[0], self.read(f"{p}.o_proj.weight"), f"/{p}/o_proj")
        return self._bias(o, [f"{p}.o_proj.bias"], f"/{p}/o_proj")

    def _head_norm(self, x: str, heads: int, weight: str, name: str) -> str:
        g = self.g
        shaped = g.one("Reshape", [x, g.const([0, 0, heads, self.spec.head_dim])], name + "/reshape")
        normed = g.one("SimplifiedLayerNormalization", [shaped, self._float(weight, self.read(weight))], name,
                       axis=-1, epsilon=self.spec.eps, stash_type=1)
        return g.one("Reshape", [normed, g.const([0, 0, heads * self.spec.head_dim])], name + "/flatten")

    def _mlp(self, x: str, i: int) -> str:
        s, g = self.spec, self.g
        p = f"model.layers.{i}.mlp"
        if s.fused:                              # Phi-3: gate_up_proj holds gate's rows, then up's
            both = self.read(f"{p}.gate_up_proj.weight")
            gate_w, up_w = both[:s.intermediate], both[s.intermediate:]
        else:
            gate_w, up_w = self.read(f"{p}.gate_proj.weight"), self.read(f"{p}.up_proj.weight")
        gate = self._bias(self._linear(x, gate_w, f"/{p}/gate_proj"), [f"{p}.gate_proj.bias"], f"/{p}/gate_proj")
        up = self._bias(self._linear(x, up_w, f"/{p}/up_proj"), [f"{p}.up_proj.bias"], f"/{p}/up_proj")
        del gate_w, up_w
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], f"/{p}/sigmoid")], f"/{p}/silu")
        down_in = g.one("Mul", [act, up], f"/{p}/gated")
        down = self._linear(down_in, self.read(f"{p}.down_proj.weight"), f"/{p}/down_proj")
        return self._bias(down, [f"{p}.down_proj.bias"], f"/{p}/down_proj")
