"""What the plan knows about one tensor; the only thing a merge method sees besides the deltas."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class TensorClass(str, enum.Enum):
    LIN = "LIN"    # weight of a linear map, (out, in) after any transpose; (E, out, in) for stacked MoE experts
    EMB = "EMB"    # token / position embeddings, tied lm_head
    VEC = "VEC"    # 1-D: biases, norm gains
    CONV = "CONV"  # ndim >= 3
    HEAD = "HEAD"  # task-specific head: never merged, kept per expert
    TIED = "TIED"  # alias of another tensor: written as a copy of its merged canonical tensor
    INT = "INT"    # integer / bool buffer, or a tensor with no elements: copied from the base


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # as the method sees it: (out, in) for LIN even when stored transposed
    cls: TensorClass
    transposed: bool = False    # stored (in, out) on disk (GPT-2 Conv1D, GPT-OSS experts); the stream transposes
    tied_to: str | None = None  # canonical tensor name for TIED
    row_start: int = 0          # first row of this piece when an elementwise rule works in row chunks
    layer: int | None = None    # index of the repeated layer holding it (names.layer_of), set once by the plan

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n
