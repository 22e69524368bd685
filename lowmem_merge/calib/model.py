"""The base's architecture from transformers, run one block at a time on weights read tensor by tensor.

The model object is built with every parameter on the meta device (buffers such as rotary frequencies are real and
small), so it costs nothing. A block's parameters are read from a ``Source`` (one expert, or the mean of the experts)
just before it runs and dropped after; the modules before the first block (embeddings) load lazily the first time
they run. The inputs of the first block are caught as transformers' own forward produces them (attention mask,
position embeddings), so attention is never re-implemented.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..io.lora import LoraAdapter, LowRank
from ..plan import Plan
from . import refuse_remote_code, require_transformers

Source = Callable[[str], torch.Tensor]   # checkpoint tensor name -> its fp32 value (stored layout, CPU)


def expert_source(plan: Plan, t: int) -> Source:
    """Expert t's own weights (a LoRA expert: the base plus its s·B·A)."""
    ckpt = plan.experts[t]

    def read(name: str) -> torch.Tensor:
        if isinstance(ckpt, LoraAdapter) and name not in ckpt.entries:
            w = plan.base.read(name).float()
            low = ckpt.read(name)
            if isinstance(low, LowRank) and low.b is not None:
                delta = (low.b.float() @ low.a.float()).mul_(low.scale)
                w += delta.T if low.fan_in_fan_out else delta
            return w
        return ckpt.read(name).float()
    return read


def mean_source(plan: Plan) -> Source:
    """The mean of the experts' weights: what a merged model holds for tensors merged by averaging."""
    experts = [expert_source(plan, t) for t in range(plan.n_experts)]

    def read(name: str) -> torch.Tensor:
        total = experts[0](name)
        for ex in experts[1:]:
            total += ex(name)
        return total.div_(len(experts))
    return read


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile lives on the meta device; buffers stay real (accelerate's
    init_empty_weights(include_buffers=False), in a few lines)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)
    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("caught")
        self.call = (args, kwargs)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class BlockModel:
    """The base's architecture on the meta device: ``blocks`` (the repeated layers), run one at a time."""

    def __init__(self, plan: Plan, device: torch.device) -> None:
        self.device = device
        transformers = require_transformers()
        model_dir = plan.base.model_dir
        if model_dir is None or not (Path(model_dir) / "config.json").is_file():
            raise InputError("calibrated merges need the base's config.json", path=plan.base.path,
                             hint="the base must be a Hugging Face model directory")
        refuse_remote_code(Path(model_dir))
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                                         trust_remote_code=False)
        layer_types = getattr(config, "layer_types", None)
        if layer_types and len(set(layer_types)) > 1:
            raise InputError(f"layers of different attention types ({', '.join(sorted(set(layer_types)))})",
                             path=model_dir, hint="calibrated merges support models whose layers all share one "
                                                  "attention mask (Llama, GPT-2, BERT families)")
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with _params_on_meta():
            self.model = cls(config) if cls is not None else \
                transformers.AutoModel.from_config(config, trust_remote_code=False)
        self.model.eval()
        for m in self.model.modules():             # buffers (rotary frequencies, position ids) to the device
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.to(device)
        n_layers = getattr(config, "num_hidden_layers", None)
        lists = [(n, m) for n, m in self.model.named_modules()
                 if isinstance(m, nn.ModuleList) and n_layers and len(m) == n_layers]
        if not lists:
            raise InputError(f"cannot find the {n_layers} repeated layers of {type(self.model).__name__}",
                             path=model_dir, hint="calibrated merges support Llama, GPT-2 and BERT families")
        self.prefix, self.blocks = lists[0]
        self._entries = plan.base.entries
        self._block_re = re.compile(rf"^{re.escape(self.prefix)}\.(\d+)\.(.+)$")
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        base_prefix = getattr(self.model, "base_model_prefix", "")
        self._names = {n: self._checkpoint_name(n, base_prefix) for n, _ in self.model.named_parameters()}
        self._model_names = {c: n for n, c in self._names.items() if c is not None}

    def _checkpoint_name(self, name: str, base_prefix: str) -> str | None:
        """The checkpoint's name for the model's parameter ``name`` (a head class saves the base model under
        ``base_model_prefix.``, a bare base model without it)."""
        candidates = [name]
        if base_prefix:
            candidates += [name.removeprefix(base_prefix + "."), f"{base_prefix}.{name}"]
        return next((c for c in candidates if c in self._entries), None)

    def checkpoint_name(self, name: str) -> str:
        found = self._names.get(name)
        if found is None:
            raise InputError("the base's checkpoint has no tensor for this parameter of the model", tensor=name,
                             hint="the checkpoint does not match its config.json")
        return found

    def block_of(self, tensor: str) -> tuple[int, str] | None:
        """(block index, name inside the block) of a checkpoint tensor, or None outside the blocks."""
        m = self._block_re.match(self._model_names.get(tensor, tensor))
        return (int(m.group(1)), m.group(2)) if m else None

    def block_tensor(self, index: int, local: str) -> str:
        """Checkpoint name of parameter ``local`` of block ``index``."""
        return self.checkpoint_name(f"{self.prefix}.{index}.{local}")

    # -- weights in and out -------------------------------------------------------------------------------------------

    def load_block(self, index: int, source: Source) -> nn.Module:
        """Block ``index`` with every parameter read from ``source``, on the device."""
        block = self.blocks[index]
        for local, _ in list(block.named_parameters()):
            _assign(block, local, source(self.block_tensor(index, local)).to(self.device))
        return block

    def release_block(self, index: int) -> None:
        _release(self.blocks[index])

    def prelude(self, batches: list, source: Source) -> list[tuple[torch.Tensor, tuple, dict]]:
        """Per batch, the first block's inputs (hidden states, other positional args, keyword args) as the model's own
        forward makes them, with the modules before the first block read from ``source``."""
        hooks = [self.blocks[0].register_forward_pre_hook(_catch, with_kwargs=True)]
        outside = [(n, m) for n, m in self.model.named_modules()
                   if not (n == self.prefix or n.startswith(self.prefix + "."))
                   and any(True for _ in m.parameters(recurse=False))]
        for qual, module in outside:
            hooks.append(module.register_forward_pre_hook(self._lazy_loader(qual, source), with_kwargs=True))
        extra = {"use_cache": False} if "use_cache" in self._forward_args else {}
        caught = []
        try:
            for b in batches:
                try:
                    with torch.no_grad():
                        self.model(input_ids=b.input_ids.to(self.device),
                                   attention_mask=b.attention_mask.to(self.device), **extra)
                except _Caught as c:
                    args, kwargs = c.call
                    caught.append((args[0], tuple(args[1:]), kwargs))
                else:
                    raise InputError("the model's forward never reached its first layer", path=self.prefix)
        finally:
            for h in hooks:
                h.remove()
            for _, module in outside:
                _release(module, recurse=False)
        return caught

    def _lazy_loader(self, qual: str, source: Source) -> Callable:
        def load(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for pname, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    full = f"{qual}.{pname}" if qual else pname
                    _assign(module, pname, source(self.checkpoint_name(full)).to(self.device))
        return load


def _catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
    raise _Caught(args, kwargs)


def _assign(module: nn.Module, local: str, value: torch.Tensor) -> None:
    *path, pname = local.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    current = owner._parameters[pname]
    if tuple(current.shape) != tuple(value.shape):
        raise InputError(f"shape {list(value.shape)} does not match the model's {list(current.shape)}", tensor=local,
                         hint="the checkpoint does not match its config.json")
    owner._parameters[pname] = nn.Parameter(value, requires_grad=False)


def _release(module: nn.Module, recurse: bool = True) -> None:
    """Parameters back to the meta device: their memory is freed."""
    for m in (module.modules() if recurse else [module]):
        for pname, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def linear_groups(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> list[list[str]]:
    """The block's linear modules in the order its forward calls them, grouped by shared input ({q, k, v},
    {gate, up}, ...): one forward with hooks that note each module's input tensor."""
    calls: list[tuple[str, Any]] = []
    seen: set[str] = set()
    hooks = []
    for name, module in block.named_modules():
        if is_linear(module):
            def note(m: nn.Module, a: tuple, kw: dict, name: str = name) -> None:
                if name not in seen:
                    seen.add(name)
                    calls.append((name, input_of(a, kw)))
            hooks.append(module.register_forward_pre_hook(note, with_kwargs=True))
    try:
        with torch.no_grad():
            run_block(block, hidden, args, kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, x in calls:
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """A linear module's input from a forward pre-hook's arguments."""
    return args[0] if args else next(iter(kwargs.values()))
