"""Walks the model block by block in forward order and hands a calibrated rule the input Grams of each linear layer.

Two ways to get a layer's inputs (the rule's ``calibration``):
  "own"    (RegMean, ALGORITHMS.md §8.1): task t's examples through expert t's own model. Each expert's activation
           cache goes through its own block ℓ, with hooks summing the Gram of every linear layer's input on the way.
  "merged" (Chain of Merges, §8.3): task t's examples through the merged model so far. Within block ℓ the linear
           layers are merged group by group in forward order ({q,k,v} → o → {gate,up} → down): a group's Grams come
           from running the partly merged block, whose earlier groups already hold the merged weights the stream
           handed back (``merged``); once every group is merged, each task's cache goes through the merged block.

The stream asks ``state_for`` for each tensor in an order that ``order`` fixed (forward order), so only one block is
ever loaded per model being run. Memory: that block, one activation cache per expert (samples × length × hidden),
the Grams of one block. Everything that is not a linear layer inside a block (embeddings, norms, biases, heads) is
merged by the rule's other-tensor rule, the mean; the merged model's forward uses the experts' mean for those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LowmergeError
from ..info import TensorClass, TensorInfo
from ..methods.calibrated import CalibratedRule, GramState
from ..plan import Plan
from .model import BlockModel, _assign, expert_source, input_of, linear_groups, mean_source, run_block


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the block need not run."""


class Calibration:
    def __init__(self, plan: Plan, method: type[CalibratedRule], params: Any, batches: list[list],
                 device: torch.device) -> None:
        self.plan, self.method, self.params, self.device = plan, method, params, device
        self.net = BlockModel(plan, device)
        self.merged_prefix = method.calibration == "merged"
        self._sources = [expert_source(plan, t) for t in range(plan.n_experts)]
        self._mean = mean_source(plan)
        self.caches = [self.net.prelude(b, self._mean if self.merged_prefix else self._sources[t])
                       for t, b in enumerate(batches)]
        self.current = -1                          # the block whose Grams are being handed out
        self.groups: list[list[str]] = self._discover(0, self._sources[0])   # the structure: any weights do
        self._group_of = {m: g for g, members in enumerate(self.groups) for m in members}
        self._states: dict[str, GramState] = {}
        self._next_group = 0                       # "merged": groups below this one have their Grams
        self._fed: set[str] = set()                # "merged": local names of the block's merged tensors

    # -- what the stream asks -----------------------------------------------------------------------------------------

    def order(self, tensors: list[TensorInfo]) -> list[TensorInfo]:
        """Output order: tensors outside the blocks first (as they were), then block by block, each block's other
        tensors before its linear layers in forward order (a stable sort keeps TIED aliases after their tensor)."""
        def key(info: TensorInfo) -> tuple[int, int]:
            loc = self.net.block_of(info.name)
            if loc is None:
                return (-1, 0)
            group = self._group_of.get(_module(loc[1])) if info.cls == TensorClass.LIN else None
            return (loc[0], -1 if group is None else group)
        return sorted(tensors, key=key)

    def state_for(self, info: TensorInfo) -> GramState | None:
        """The Grams for a LIN tensor inside a block, or None (its rule then takes the mean)."""
        loc = self.net.block_of(info.name)
        if loc is None or info.cls != TensorClass.LIN:
            return None
        index, local = loc
        self._enter(index)
        module = _module(local)
        group = self._group_of.get(module)
        if group is None:
            return None
        if self.merged_prefix:
            while self._next_group <= group:
                self._merged_group_grams(self._next_group)
                self._next_group += 1
        return self._states.get(module)

    def merged(self, name: str, value: torch.Tensor) -> None:
        """The stream's merged value of a tensor (stored layout, fp32): the merged block now holds it."""
        loc = self.net.block_of(name)
        if not self.merged_prefix or loc is None or loc[0] != self.current:
            return
        _assign(self.net.blocks[loc[0]], loc[1], value.to(self.device, torch.float32, copy=True))
        self._fed.add(loc[1])

    # -- the walk -----------------------------------------------------------------------------------------------------

    def _enter(self, index: int) -> None:
        if index < self.current:
            raise LowmergeError(f"calibrated merge: block {index} asked for after block {self.current} "
                                "(tensors must come in forward order)")
        while self.current < index:
            if self.current >= 0 and self.merged_prefix:
                self._propagate(self.current)
            self.current += 1
            self._states.clear()
            if self.merged_prefix:
                self._start_merged(self.current)
            else:
                self._own_grams(self.current)

    def _discover(self, index: int, source: Any) -> list[list[str]]:
        block = self.net.load_block(index, source)
        try:
            hidden, args, kwargs = self.caches[0][0]
            return linear_groups(block, hidden, args, kwargs)
        finally:
            self.net.release_block(index)

    def _check_groups(self, index: int, groups: list[list[str]]) -> None:
        if groups != self.groups:
            raise LowmergeError(f"calibrated merge: block {index}'s linear layers differ from block 0's",
                                hint="calibrated merges need every block to have the same structure")

    def _own_grams(self, index: int) -> None:
        """RegMean: each expert's block ``index`` on its own cache, summing every group's input Gram; the caches
        move on to the next block's inputs."""
        raw: dict[str, list] = {g[0]: [] for g in self.groups}
        for t, source in enumerate(self._sources):
            block = self.net.load_block(index, source)
            if t == 0:
                self._check_groups(index, linear_groups(block, *self.caches[0][0]))
            sums = {leader: _GramSum() for leader in raw}
            hooks = [block.get_submodule(leader).register_forward_pre_hook(self._hook(sums[leader]), with_kwargs=True)
                     for leader in raw]
            try:
                with torch.no_grad():
                    self.caches[t] = [(run_block(block, h, a, kw), a, kw) for h, a, kw in self.caches[t]]
            finally:
                for h in hooks:
                    h.remove()
                self.net.release_block(index)
            for leader, s in sums.items():
                raw[leader].append(s.result())
        for members in self.groups:
            state = self.method.calib_state(self.params, raw[members[0]])
            for m in members:
                self._states[m] = state

    def _start_merged(self, index: int) -> None:
        """Chain: block ``index`` of the merged model, every tensor the experts' mean until the stream hands back its
        merged value."""
        block = self.net.load_block(index, self._mean)
        self._check_groups(index, linear_groups(block, *self.caches[0][0]))
        self._next_group = 0
        self._fed = set()

    def _merged_group_grams(self, group: int) -> None:
        """Chain: the inputs of ``group`` on each task's data through the merged prefix (earlier groups merged)."""
        block = self.net.blocks[self.current]
        self._require_merged(self.groups[:group], "was not merged before the layers after it (tensors must come in "
                                                  "forward order)")
        leader = self.groups[group][0]
        raw = []
        for t in range(self.plan.n_experts):
            s = _GramSum()
            hook = block.get_submodule(leader).register_forward_pre_hook(self._hook(s, stop=True), with_kwargs=True)
            try:
                with torch.no_grad():
                    for h, a, kw in self.caches[t]:
                        try:
                            run_block(block, h, a, kw)
                        except _Stop:
                            pass
            finally:
                hook.remove()
            raw.append(s.result())
        state = self.method.calib_state(self.params, raw)
        for m in self.groups[group]:
            self._states[m] = state

    def _propagate(self, index: int) -> None:
        """Chain: every task's cache through the merged block ``index``."""
        self._require_merged(self.groups, "was never merged")
        block = self.net.blocks[index]
        with torch.no_grad():
            for t in range(self.plan.n_experts):
                self.caches[t] = [(run_block(block, h, a, kw), a, kw) for h, a, kw in self.caches[t]]
        self.net.release_block(index)

    def _require_merged(self, groups: list[list[str]], problem: str) -> None:
        """Chain: every linear layer of ``groups`` in the current block has its merged weight from the stream."""
        missing = [f"{m}.weight" for g in groups for m in g if f"{m}.weight" not in self._fed]
        if missing:
            raise LowmergeError(f"calibrated merge: {missing[0]} of block {self.current} {problem}")

    def _hook(self, total: "_GramSum", stop: bool = False) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            x = input_of(args, kwargs)
            total.add(self.method.calib_rows(self.params, x.reshape(-1, x.shape[-1]).float()))
            if stop:
                raise _Stop
        return hook


class _GramSum:
    """Σ x xᵀ over the rows (tokens) a hook sees, and how many rows."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.sum = rows.T @ rows if self.sum is None else self.sum.addmm_(rows.T, rows)
        self.rows += rows.shape[0]

    def result(self) -> tuple[torch.Tensor, int]:
        return self.sum, self.rows


def _module(local: str) -> str:
    """"self_attn.q_proj.weight" -> "self_attn.q_proj"."""
    return local.rsplit(".", 1)[0]
