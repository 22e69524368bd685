"""The one interface every merge rule implements. The stream never looks inside a method.

Life of a method instance (one per output tensor, or per row chunk of it):
    m = Method(info, n_experts, params, state, base=W0, buffers=pool)   # state: the Prepass result, or None
    for pass_ in range(Method.passes_for(params)):
        for t in range(n_experts): m.add(t, delta_t, pass_)   # delta_t: (shape of info) fp32 on the device
    merged_delta = m.finalize()                     # Δ*, same shape, fp32; W* = W0 + Δ*
``methods.drive.drive`` is that loop, the only one: the stream, the tests and ``inspect --stats`` call it.
The caller owns ``delta``: a method may read it during ``add``, and overwrite it (ace centres it in place: the
stream reads it no more and gives it back to its pool), but must not keep a reference to it (LoRA factors, given
only to a method whose ``takes_factors`` says so, are the exception: they are small and the method keeps them).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .mergekit import Mergekit, plural


@dataclasses.dataclass(frozen=True)
class NoParams:
    """Parameters of a rule that has none."""


class Prepass:
    """A model-wide statistic gathered over every tensor of every expert before merging.

    ``rounds`` full reads of the experts; memory must stay bounded (histograms, never the values).
    ``scope`` "model": gathered over every tensor before the merge starts, one state for all tensors (global TIES).
    ``scope`` "tensor": gathered over one tensor (all its row chunks) just before that tensor is merged, a fresh
    instance per tensor whose state goes to the tensor's pieces (per-tensor TIES on row chunks).
    """

    rounds: ClassVar[int] = 1
    scope: ClassVar[str] = "model"
    base: Any = None     # the stream sets the base piece being observed (stored dtype, the method's orientation)

    def __init__(self, n_experts: int, params: Any) -> None:
        self.n_experts = n_experts
        self.params = params

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def counts(self, round_: int) -> list[torch.Tensor]:
        """The host tensors ``observe`` added to in ``round_``: in a torchrun merge each rank observes its own
        tensors, and these are summed over ranks before ``end_round``. A model-wide statistic must be such sums."""
        raise NotImplementedError

    def end_round(self, round_: int) -> None:
        """Called once after every tensor of every expert was observed in ``round_``."""

    def state(self) -> Any:
        """What every per-tensor instance receives as ``state``."""
        raise NotImplementedError

    @classmethod
    def covers(cls, params: Any, info: TensorInfo) -> bool:
        """Whether a per-tensor prepass runs for ``info`` (the whole tensor): a rule may gather tensor-wide
        statistics only where it needs them (the matrix rules: tall LIN tensors, merged in row chunks)."""
        return True

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int | None:
        """For the plan: bytes held while ``piece`` of a covered tensor ``whole`` merges (this prepass's state and
        the piece's own statistics); None: the method's ``state_bytes`` of the piece, as for any tensor."""
        return None


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]                       # one line for `lowmerge methods`
    data_free: ClassVar[bool] = True
    calibration: ClassVar[str | None] = None     # a rule on calibration data: where its Grams come from
                                                 # ("own" | "merged", lowmem_merge.calib); its state per tensor
    passes: ClassVar[int] = 1                    # >1 when a statistic over experts comes first
    Params: ClassVar[type] = NoParams
    prepass: ClassVar[type[Prepass] | None] = None
    param_help: ClassVar[dict[str, str]] = {}    # parameter -> one line, for `lowmerge methods`
    fixed_experts: ClassVar[int | None] = None   # rules of the base and a fixed number of experts (slerp: 1)
    combines: ClassVar[str] = ""                 # what such a rule does with them, for the error naming the count
    mergekit: ClassVar[Mergekit | None] = None   # its mergekit recipe schema (read from the class itself only,
                                                 # never inherited: see ``mergekit_schema``)

    needs_base: ClassVar[bool] = False           # rules on the weights themselves (slerp) read W0 too

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, *,
                 base: torch.Tensor | None = None, buffers: Any = None) -> None:
        """Complete at construction: ``state`` is the prepass's; ``base`` the base piece (stored dtype, this rule's
        orientation; read-only), required by rules with ``needs_base``; ``buffers`` the stream's host BufferPool
        (None: plain allocations). ``drive`` is the one caller that runs a rule."""
        self.info = info
        self.n_experts = n_experts
        self.params = params
        self.state = state
        self.base = base
        self.buffers = buffers
        if state is None and self.uses_prepass(params):   # the stream passes its prepass's state, always
            raise ValueError(f"{self.name} with these parameters needs its prepass state ({info.name})")
        if base is None and self.needs_base:
            raise ValueError(f"{self.name} reads the base weights: construct it with base= ({info.name})")

    def zeros(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An fp32 statistic buffer of zeros. On the CPU it comes from the stream's pool: reused memory, where a fresh
        allocation per tensor would page-fault through new zeroed pages (most of an elementwise rule's time)."""
        if device.type != "cpu" or self.buffers is None:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        return self.buffers.take(4 * math.prod(shape)).view(torch.float32).view(shape).zero_()

    def release(self, *buffers: torch.Tensor) -> None:
        """Give buffers from ``zeros`` back once the method no longer needs them (the result is the stream's)."""
        if self.buffers is not None:
            for b in buffers:
                self.buffers.give(b)

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        raise NotImplementedError

    def finalize(self) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        """Per-tensor numbers worth a line in the report (condition numbers, norms)."""
        return {}

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        """True when this tensor's rows are merged independently, so the stream may work on row ranges of it."""
        return False

    @classmethod
    def passes_for(cls, params: Any) -> int:
        """Reads of every expert this rule takes per tensor with these parameters (``passes`` by default)."""
        return cls.passes

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        """The statistic these parameters need before merging, or None."""
        return cls.prepass

    @classmethod
    def uses_prepass(cls, params: Any) -> bool:
        return cls.prepass_for(params) is not None

    @classmethod
    def takes_factors(cls, info: TensorInfo) -> bool:
        """True when ``add`` accepts a LoRA expert's Δ of this tensor as ``covariance.Factors`` (b, a) instead of the
        dense b·a: rules for which the factor form is cheaper (ALGORITHMS.md §2)."""
        return False

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """Bytes of statistics this rule holds for one tensor (fp32), for the plan's memory estimate."""
        return 4 * info.numel

    @classmethod
    def cuda_state_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> int:
        """``state_bytes`` on a CUDA device (budget.device_bytes), where a rule's buffers may differ: the CPU commits
        a new buffer's pages only as they are written, CUDA's allocator hands it out whole."""
        return cls.state_bytes(info, n_experts, params)

    @classmethod
    def phase_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> tuple[int, int] | None:
        """(adding, finishing) for one whole tensor, or None (the default). adding: what the rule holds while an
        expert is added (its statistics and one add's temporaries; Δ is the stream's); finishing: from finalize on
        (what is left of them, the solve's temporaries and the fp32 result). A rule that gives them has such a
        tensor merged alone, which a statistic far larger than the tensor's reads is worth: the stream reads
        nothing ahead of it and lets the writer finish first (stream.alone_bytes), so the plan counts neither.
        None: state_bytes beside Δ, the result, the read-ahead and the writer's pieces (budget.piece_bytes)."""
        return None

    @classmethod
    def mergekit_schema(cls) -> Mergekit | None:
        """This class's own mergekit schema: a subclass (task_arithmetic of average) is another mergekit method."""
        return cls.__dict__.get("mergekit")

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        """A recipe's values (``glob``: every global parameter, ``models``: every per-model one for each expert,
        defaults filled in) as this rule's parameters. By default global parameters keep their names and per-model
        ones become tuples (weight -> weights, density -> densities)."""
        schema = cls.mergekit_schema()
        params = dict(glob)
        for key in (schema.tensor_parameters if schema else ()):
            params[plural(key)] = tuple(m[key] for m in models)
        return params

    @classmethod
    def check_experts(cls, params: Any, n_experts: int) -> None:
        """Per-expert parameters (tuples, empty = unset) must give one value per expert; merge calls this first."""
        for f in dataclasses.fields(params):
            value = getattr(params, f.name)
            if isinstance(value, tuple) and value and len(value) != n_experts:
                raise ConfigError(f"method '{cls.name}': parameter {f.name} has {len(value)} values for "
                                  f"{n_experts} experts", hint="give one value per expert, in the experts' order")
        if cls.fixed_experts is not None and n_experts != cls.fixed_experts:
            experts, models = {1: ("one expert", "one other model")}.get(
                cls.fixed_experts, (f"{cls.fixed_experts} experts", f"{cls.fixed_experts} models"))
            raise ConfigError(f"{cls.name} {cls.combines}, not {n_experts}",
                              hint=f"give exactly {experts} (mergekit: {models} besides base_model)")


def expert_weight(params: Any, t: int) -> float:
    """w_t from ``params.weights`` (empty or absent, as in rules that average some tensors: every expert weighs 1)."""
    weights = getattr(params, "weights", ())
    return weights[t] if weights else 1.0


def sum_factor(params: Any, n_experts: int) -> float:
    """What multiplies Σ w_t Δ't in mergekit's generalized task arithmetic without a consensus step: λ, divided by
    Σ w_t with ``normalize`` (not when |Σ w_t| < 1e-8, mergekit's guard)."""
    total = sum(params.weights) if params.weights else float(n_experts)
    return params.scale / (total if params.normalize and abs(total) >= 1e-8 else 1.0)


def expert_density(params: Any, t: int) -> float:
    """K_t from ``params.densities`` (empty: ``params.density`` for every expert)."""
    return params.densities[t] if params.densities else params.density


def per_expert(params: Any, name: str, t: int) -> float:
    """A parameter given per expert (``params.<name>s``, e.g. gammas) or, when that is empty, for all (``<name>``)."""
    values = getattr(params, name + "s")
    return values[t] if values else getattr(params, name)


def check_densities(method: str, densities: tuple[float, ...]) -> None:
    bad = [d for d in densities if not 0 < d <= 1]
    if bad:
        raise ConfigError(f"{method}: densities {bad[0]} must be in (0, 1]",
                          hint="one fraction kept per expert, e.g. -p densities=0.2,0.5,0.3")


def parse_params(method: type[MergeMethod], raw: dict[str, str]) -> Any:
    """Build ``method.Params`` from ``-p KEY=VALUE`` strings; unknown keys and bad values are ConfigErrors."""
    fields = {f.name: f for f in dataclasses.fields(method.Params)}
    hints = typing.get_type_hints(method.Params)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(f"{k}={fields[k].default}" for k in fields) or "none"
        raise ConfigError(f"method '{method.name}' has no parameter {', '.join(map(repr, unknown))}",
                          hint=f"valid parameters (with defaults): {valid}")
    values: dict[str, Any] = {}
    for key, text in raw.items():
        kind = hints[key]
        try:
            values[key] = _convert(kind, text)
        except ValueError:
            example = "1,0.5,1" if _is_float_tuple(kind) else fields[key].default
            raise ConfigError(f"method '{method.name}': parameter {key}={text!r} is not a valid {_kind_name(kind)}",
                              hint=f"example: -p {key}={example}") from None
    return method.Params(**values)


def _is_float_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple and typing.get_args(kind) == (float, ...)


def _convert(kind: Any, text: Any) -> Any:
    if _is_float_tuple(kind):  # "1,0.5,1" from -p, "(1, 0.5)" from str(tuple), or a list from YAML / the API
        items = text if isinstance(text, (list, tuple)) else str(text).strip().strip("()[]").split(",")
        values = tuple(float(x) for x in items if not isinstance(x, str) or x.strip())
        if not all(math.isfinite(v) for v in values):
            raise ValueError(text)
        return values
    if not isinstance(text, str):
        text = str(text)
    if kind is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    choices = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Literal:
        if text not in choices:
            raise ValueError(text)
        return text
    return kind(text)


def _kind_name(kind: Any) -> str:
    if _is_float_tuple(kind):
        return "comma-separated list of numbers"
    if typing.get_origin(kind) is typing.Literal:
        return "choice among " + " | ".join(typing.get_args(kind))
    return getattr(kind, "__name__", str(kind))


def params_dict(params: Any) -> dict[str, Any]:
    """JSON-shaped: tuples become lists, so a fingerprint read back from JSON compares equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
