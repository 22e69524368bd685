"""Weights written straight into an ONNX external-data file, one tensor at a time, and 4/8-bit block quantization.

Each initializer is a ``TensorProto`` that names its byte range in the data file and holds no bytes itself, so the
graph in memory stays a few hundred kilobytes whatever the model's size; a weight exists in memory only between
its read from the safetensors file and its write here.

Block quantization is MatMulNBits' format (onnxruntime's ``com.microsoft`` domain): the weight ``W`` (N, K) of
``y = x Wᵀ`` is cut along K into blocks of ``block`` values; each block has one fp32 scale and is stored as
unsigned ``bits``-bit codes ``q`` with the implicit zero point ``2^(bits-1)``, so ``w = (q - 2^(bits-1)) * scale``.
Symmetric, as onnxruntime's own quantizer does it: the value of largest magnitude ``v`` sets
``scale = v / -2^(bits-1)``, which maps ``v`` exactly onto the lowest code and uses all ``2^bits`` levels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lowmem_merge.errors import InputError, OutputError

ALIGN = 4096  # onnxruntime maps external data; page-aligned tensors can be mapped without a copy


class ExternalData:
    """Appends tensors to ``path`` and returns the initializers that point at them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self.offset = 0

    def add(self, name: str, array: np.ndarray):
        """Write ``array`` and return its ``TensorProto`` (external location, no bytes in the proto)."""
        import onnx
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGN
        self._write(b"\0" * pad)                    # apart from the data: joining them would copy the tensor
        self._write(memoryview(array).cast("B"))
        start = self.offset + pad
        self.offset = start + array.nbytes
        proto = onnx.TensorProto(name=name, dims=list(array.shape),
                                 data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        proto.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(array.nbytes))):
            proto.external_data.add(key=key, value=value)
        return proto

    def _write(self, data) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            raise OutputError(f"cannot write: {e.strerror}", path=self.path,
                              hint="check free disk space; nothing that looks complete was left") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def check_finite(t: torch.Tensor, name: str, where: Path) -> None:
    """NaN or Inf in a weight stops the export before its folder can look complete."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"{bad} NaN/Inf values in the weights", path=where, tensor=name,
                         hint="the merged model is broken; merge again (lowmerge stops on NaN in its inputs)")


def quantize_blocks(w: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` (N, K) fp32 -> (codes uint8 (N, K_blocks, block*bits/8), scales fp32 (N, K_blocks)).

    K is zero-padded to a whole number of blocks (MatMulNBits reads only the first K values of each row).
    4-bit codes are packed two per byte, the even element in the low nibble.
    """
    n, k = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = torch.nn.functional.pad(w, (0, blocks * block - k))
    w = w.reshape(n, blocks, block)
    half = 2 ** (bits - 1)
    idx = w.abs().argmax(dim=-1, keepdim=True)
    scale = torch.gather(w, -1, idx) / -half                      # (N, blocks, 1): the extreme value -> code 0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / safe) + half, 0, 2 * half - 1).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q.numpy(), scale.squeeze(-1).numpy()


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, bits: int, k: int) -> torch.Tensor:
    """The fp32 weight (N, K) that MatMulNBits computes with: the reference the quantized graph is checked against."""
    q = torch.from_numpy(codes)
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    w = (q.float() - 2 ** (bits - 1)) * torch.from_numpy(scales).unsqueeze(-1)
    return w.flatten(1)[:, :k]
