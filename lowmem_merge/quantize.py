"""``--quantize int8|nf4``: LIN tensors leave the merge as bitsandbytes-serialized weights, in the layout that
transformers' bitsandbytes loader reads back (``quantization_config`` in config.json); every other tensor keeps the
output dtype, bit for bit as without ``--quantize``.

What is written, per quantized ``<module>.weight`` (shapes (out, in) as the module computes, Conv1D transposed):

- int8 (LLM.int8, row-wise absmax): ``<module>.weight`` int8 (out, in), ``<module>.SCB`` fp32 (out,),
  ``<module>.weight_format`` uint8 () = 0 (row-major). The weight is cast to fp16 first, as bitsandbytes'
  ``Int8Params`` does when transformers quantizes on load.
- nf4 (blocks of 64 along the flattened weight, double quantization as in QLoRA): ``.weight`` uint8
  (ceil(numel/2), 1), ``.weight.absmax`` uint8, ``.weight.quant_map`` fp32 (16,), ``.weight.nested_absmax`` fp32,
  ``.weight.nested_quant_map`` fp32 (256,), ``.weight.quant_state.bitsandbytes__nf4`` (JSON bytes).

Streaming: shard headers are planned before any data exists, so every size above is known from the shape alone.
The one value-dependent size, the JSON's ``nested_offset`` float, is padded with spaces to a fixed length
(``json.loads`` ignores them). Both formats are local, so a tensor is quantized as it arrives, in slabs of
``SLAB`` elements: int8 row by row, nf4 block by block (a block split across two row chunks waits in a carry of
< 64 elements). Only the per-row scales (int8) or per-block absmax (nf4, numel/16 bytes) are held until the
tensor's last rows, because they are written after the weight and nf4's double quantization needs the mean of all
absmax values. The result equals quantizing the whole tensor at once, byte for byte.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .errors import ConfigError
from .info import TensorClass, TensorInfo
from .names import is_lm_head

QUANTIZE_CHOICES = ("int8", "nf4")
BLOCK = 64              # nf4 block: transformers' and bitsandbytes' default
NESTED_BLOCK = 256      # blocks of the double quantization of absmax (bitsandbytes' fixed choice)
SLAB = 1 << 20          # elements quantized at once: bitsandbytes' CPU kernels make ~14 bytes of temporaries each
SLAB_TEMP_BYTES = 16 * SLAB
QS_JSON_BYTES_SLACK = 24  # longest repr of a float ("-1.2345678901234567e-308") in place of the offset
Spec = tuple[str, torch.dtype, tuple[int, ...]]


def load_bnb() -> ModuleType:
    """``bitsandbytes.functional``, or a ConfigError saying how to install it. Its import logs a warning about an
    optional CPU kernel package; that warning says nothing about what lowmerge does, so it is kept quiet."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_f
        torch.ops.bitsandbytes.quantize_4bit          # the CPU backend registers its kernels lazily
    except ImportError:
        raise ConfigError("--quantize needs bitsandbytes, which is not installed",
                          hint="pip install 'lowmerge[bnb]'") from None
    finally:
        logger.setLevel(level)
    return bnb_f


def quantizable(info: TensorInfo) -> bool:
    """The tensors transformers turns into bitsandbytes layers: 2-D linear weights (nn.Linear, GPT-2 Conv1D),
    except the output embedding (lm_head), which transformers keeps in full precision."""
    return (info.cls == TensorClass.LIN and len(info.shape) == 2 and info.numel > 0
            and info.name.endswith(".weight") and not is_lm_head(info.name))


@dataclass
class _Pending:
    """A quantized tensor whose rows are still arriving."""
    received: int = 0                                    # elements so far
    stats: list[torch.Tensor] = field(default_factory=list)   # int8: SCB per chunk; nf4: fp32 absmax per slab
    carry: torch.Tensor | None = None                    # nf4: < BLOCK trailing elements of the previous chunk


class Quantizer:
    """Output specs, tensors and config for ``--quantize mode`` over the plan's ``infos``."""

    def __init__(self, mode: str, infos: list[TensorInfo], out_dtype: dict[str, torch.dtype],
                 device: torch.device) -> None:
        if mode not in QUANTIZE_CHOICES:
            raise ConfigError(f"unknown --quantize {mode!r}", hint="use int8 or nf4")
        self.F = load_bnb()
        self.mode = mode
        self.device = device                             # where slabs are quantized (CUDA: bitsandbytes' kernels)
        self.targets = {i.name: i for i in infos if quantizable(i)}
        self.out_dtype = out_dtype
        self.skipped = sorted({i.name.removesuffix(".weight") for i in infos
                               if i.name.endswith(".weight") and len(i.shape) == 2 and i.name not in self.targets
                               and i.cls not in (TensorClass.INT, TensorClass.VEC)} | {"lm_head"})
        self._pending: dict[str, _Pending] = {}

    # -- planned up front -----------------------------------------------------------------------------------
    def specs(self, name: str, dtype: torch.dtype, stored: tuple[int, ...]) -> list[Spec]:
        """The tensors written for ``name`` in file order; the first keeps ``name``."""
        info = self.targets.get(name)
        if info is None:
            return [(name, dtype, stored)]
        out, inp = info.shape
        if self.mode == "int8":
            mod = name.removesuffix(".weight")
            return [(name, torch.int8, (out, inp)), (mod + ".SCB", torch.float32, (out,)),
                    (mod + ".weight_format", torch.uint8, ())]
        n = out * inp
        blocks = math.ceil(n / BLOCK)
        return [(name, torch.uint8, ((n + 1) // 2, 1)), (name + ".absmax", torch.uint8, (blocks,)),
                (name + ".quant_map", torch.float32, (16,)),
                (name + ".nested_absmax", torch.float32, (math.ceil(blocks / NESTED_BLOCK),)),
                (name + ".nested_quant_map", torch.float32, (256,)),
                (name + ".quant_state.bitsandbytes__nf4", torch.uint8, (self._qs_size(name, dtype),))]

    def attached(self) -> set[str]:
        """Names that must stay in the shard of their weight (a resumed run skips a weight by its shard)."""
        return {s[0] for name in self.targets for s in self.specs(name, self.out_dtype[name], ())[1:]}

    def extra_bytes(self) -> int:
        """Host memory beyond the unquantized merge's: slab temporaries and the largest tensor's statistics
        (fp32 absmax, numel/16 bytes; int8: 4 bytes a row) held until its last rows."""
        largest = max((i.numel // 16 + 4 * i.shape[0] for i in self.targets.values()), default=0)
        return SLAB_TEMP_BYTES + largest if self.targets else 0

    def config(self) -> dict:
        """config.json's ``quantization_config``, as ``BitsAndBytesConfig.to_dict`` writes it."""
        compute = next((str(self.out_dtype[n]).removeprefix("torch.") for n in self.targets), "float32")
        return {"quant_method": "bitsandbytes", "load_in_8bit": self.mode == "int8",
                "load_in_4bit": self.mode == "nf4", "llm_int8_threshold": 6.0,
                "llm_int8_skip_modules": self.skipped, "llm_int8_enable_fp32_cpu_offload": False,
                "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": self.mode == "nf4", "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_storage": "uint8"}

    def _qs_doc(self, name: str, dtype: torch.dtype, offset: float) -> bytes:
        """bitsandbytes' packed quant_state: the JSON ``QuantState.as_dict(packed=True)`` makes, keys in its order."""
        return json.dumps({"quant_type": "nf4", "blocksize": BLOCK, "dtype": str(dtype).removeprefix("torch."),
                           "shape": list(self.targets[name].shape), "nested_blocksize": NESTED_BLOCK,
                           "nested_dtype": "float32", "nested_offset": offset}).encode()

    def _qs_size(self, name: str, dtype: torch.dtype) -> int:
        """The planned length: the JSON with the longest float repr in place of the offset."""
        return len(self._qs_doc(name, dtype, 0.0)) - len("0.0") + QS_JSON_BYTES_SLACK

    def _qs_json(self, name: str, dtype: torch.dtype, offset: float) -> bytes:
        raw = self._qs_doc(name, dtype, offset)
        return raw + b" " * (self._qs_size(name, dtype) - len(raw))

    # -- as the merge streams -------------------------------------------------------------------------------
    def writer(self, write: Callable[[str, torch.Tensor], None],
               release: Callable[[torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
        """``write`` as the stream calls it, quantizing targets as their rows arrive; ``release`` gets the merged
        buffers back (the writer gets only what it writes)."""
        def quantizing_write(name: str, part: torch.Tensor) -> None:
            if name not in self.targets:
                write(name, part)
                return
            for out_name, t in self.feed(name, part):
                write(out_name, t)
            release(part)
        return quantizing_write

    def feed(self, name: str, part: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The serialized tensors ready after ``part`` (the whole stored tensor, or its next rows) arrives."""
        info = self.targets[name]
        rows = part.mT if info.transposed else part.reshape(-1, info.shape[1])   # (r, in): rows of the (out, in) map
        st = self._pending.setdefault(name, _Pending())
        st.received += part.numel()
        last = st.received == info.numel
        ready = self._int8_rows(st, rows) if self.mode == "int8" else self._nf4_rows(st, rows, last)
        out = [(name, ready)]
        if last:
            del self._pending[name]
            out += self._int8_tail(name, st) if self.mode == "int8" else self._nf4_tail(name, st, part.dtype)
        return out

    def _slabs(self, rows: torch.Tensor) -> Iterator[tuple[torch.Tensor, bool]]:
        """Row ranges of about SLAB elements, contiguous, on the quantizing device (one alive at a time), each
        with whether it is the last."""
        step = max(1, SLAB // rows.shape[1])
        for r in range(0, rows.shape[0], step):
            yield rows[r:r + step].contiguous().to(self.device), r + step >= rows.shape[0]

    def _int8_rows(self, st: _Pending, rows: torch.Tensor) -> torch.Tensor:  # -> (r, in) int8
        cb = torch.empty(rows.shape, dtype=torch.int8)
        r0 = 0
        for slab, _ in self._slabs(rows):
            q, scb, _ = self.F.int8_vectorwise_quant(slab.to(torch.float16))
            cb[r0:r0 + len(q)].copy_(q)
            st.stats.append(scb.cpu())
            r0 += len(q)
        return cb

    def _int8_tail(self, name: str, st: _Pending) -> list[tuple[str, torch.Tensor]]:
        mod = name.removesuffix(".weight")
        return [(mod + ".SCB", torch.cat(st.stats)), (mod + ".weight_format", torch.tensor(0, dtype=torch.uint8))]

    def _nf4_rows(self, st: _Pending, rows: torch.Tensor, last: bool) -> torch.Tensor:  # -> (k, 1) uint8
        """Packed nibbles of every whole block available (everything on the last rows; a partial block waits)."""
        carried = st.carry.numel() if st.carry is not None else 0
        total = carried + rows.numel()
        packed = torch.empty(((total if last else total - total % BLOCK) + 1) // 2, dtype=torch.uint8)
        done = 0
        for slab, final in self._slabs(rows):
            buf = slab.reshape(-1) if st.carry is None else torch.cat([st.carry, slab.reshape(-1)])
            n = buf.numel() if last and final else buf.numel() - buf.numel() % BLOCK
            if n:
                q, qs = self.F.quantize_4bit(buf[:n], blocksize=BLOCK, quant_type="nf4", quant_storage=torch.uint8)
                packed[done // 2:(done + n + 1) // 2].copy_(q.reshape(-1))
                st.stats.append(qs.absmax.float().cpu())
            done += n
            st.carry = buf[n:].clone() if n < buf.numel() else None
        return packed.view(-1, 1)

    def _nf4_tail(self, name: str, st: _Pending, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        """absmax double-quantized around its mean, exactly as ``quantize_4bit(compress_statistics=True)`` does."""
        F = self.F
        absmax = torch.cat(st.stats)
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCK)
        state = F.QuantState(absmax=qabsmax, shape=torch.Size(self.targets[name].shape), dtype=dtype,
                             blocksize=BLOCK, code=F.get_4bit_type("nf4", device="cpu"), quant_type="nf4",
                             offset=offset, state2=state2)
        d = state.as_dict(packed=True)
        qs = self._qs_json(name, dtype, float(offset))
        return [(name + ".absmax", d["absmax"]), (name + ".quant_map", d["quant_map"]),
                (name + ".nested_absmax", d["nested_absmax"]), (name + ".nested_quant_map", d["nested_quant_map"]),
                (name + ".quant_state.bitsandbytes__nf4", torch.frombuffer(bytearray(qs), dtype=torch.uint8))]
