"""mergekit-moe's YAML: a base, dense experts with the prompts that should reach them, and how routers are made.

Keys and defaults as mergekit-moe has them (``base_model``, ``experts`` with ``source_model``, ``positive_prompts``,
``negative_prompts``, ``residual_scale``; ``gate_mode``, ``dtype``, ``experts_per_token``, ``architecture``,
``shared_experts``). Without shared experts the output is a Mixtral; with exactly one it is a Qwen2-MoE, as
mergekit-moe picks. What lowmerge does not build (``noise_scale``, other output architectures) is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.text_files import require_regular
from ..recipe_yaml import load_yaml

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "architecture", "shared_experts")
_FORMAT = "base_model: DIR, experts: [{source_model: DIR, positive_prompts: [...]}] (mergekit-moe's format)"
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "residual_scale", "noise_scale")


@dataclass(frozen=True)
class ExpertSpec:
    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    residual_scale: float | None = None          # multiplies the expert's down_proj (mergekit's residual scaling)


@dataclass(frozen=True)
class MoeConfig:
    path: Path
    base_model: str
    experts: tuple[ExpertSpec, ...]
    gate_mode: str = "hidden"
    dtype: torch.dtype | None = None             # None: the base's config dtype (then each tensor's own)
    experts_per_token: int = 2
    shared: ExpertSpec | None = None             # the Qwen2-MoE form's shared expert

    @property
    def family(self) -> str:
        """The output's transformers model_type."""
        return "mixtral" if self.shared is None else "qwen2_moe"

    @property
    def gated(self) -> tuple[ExpertSpec, ...]:
        """The experts that get a router row: the routed ones, then the shared one (its sigmoid gate)."""
        return self.experts + ((self.shared,) if self.shared else ())

    @property
    def needs_prompts(self) -> bool:
        return self.gate_mode != "random"


def load_moe_config(path: str | Path) -> MoeConfig:
    """The config at ``path``, checked as mergekit-moe checks it (``is_bad_config``), each problem one ConfigError."""
    import yaml
    path = Path(path)
    require_regular(path, "MoE config", ConfigError)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read the MoE config: {e.strerror}", path=path,
                          hint="check the path and its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError("the MoE config is not UTF-8 text", path=path, hint=_FORMAT) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"the MoE config is not valid YAML: {str(e).splitlines()[0]}", path=path,
                          hint=_FORMAT) from None
    if not isinstance(data, dict):
        raise ConfigError("the MoE config is not a YAML mapping", path=path,
                          hint="it needs base_model: and experts: (mergekit-moe's format)")
    _known(data, _TOP_KEYS, "the config", path)
    shared = _shared(data.get("shared_experts"), data.get("architecture"), path)
    if not isinstance(data.get("base_model"), str) or not data["base_model"]:
        raise ConfigError("base_model is missing (a model directory or Hugging Face id)", path=path, hint=_FORMAT)
    raw_experts = data.get("experts")
    if not isinstance(raw_experts, list) or not raw_experts:
        raise ConfigError("experts is missing or empty", path=path,
                          hint="experts: a list of {source_model: ..., positive_prompts: [...]}")
    config = MoeConfig(path, data["base_model"], tuple(_expert(e, i, path) for i, e in enumerate(raw_experts)),
                       _gate_mode(data.get("gate_mode", "hidden"), path), _dtype(data.get("dtype"), path),
                       _int(data.get("experts_per_token", 2), "experts_per_token", path), shared)
    _check(config)
    return config


def _known(data: dict, keys: tuple[str, ...], where: str, path: Path) -> None:
    unknown = sorted(str(k) for k in data if k not in keys)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}", path=path,
                          hint=f"valid keys: {', '.join(keys)}")


def _shared(raw: object, arch: object, path: Path) -> ExpertSpec | None:
    """The shared expert (Qwen2-MoE output), or None (Mixtral), agreeing with ``architecture`` if given."""
    raw = raw or None                            # an empty list is none, as in mergekit
    if raw is not None and (not isinstance(raw, list) or len(raw) != 1):
        raise ConfigError("shared_experts must list exactly one expert (the Qwen2-MoE form)", path=path,
                          hint="shared_experts: [{source_model: DIR, positive_prompts: [...]}], or remove it for "
                               "a Mixtral")
    family = "mixtral" if raw is None else "qwen"
    if arch is not None and not (isinstance(arch, str) and arch and
                                 ("mixtral" if raw is None else "qwen moe").startswith(arch.lower())):
        raise ConfigError(f"architecture {arch!r} does not fit this config: without shared_experts lowmerge writes "
                          "a Mixtral, with one a Qwen2-MoE", path=path,
                          hint=f"remove architecture, or set it to {family}")
    return None if raw is None else _expert(raw[0], 0, path, "shared_experts")


def _expert(raw: object, i: int, path: Path, key: str = "experts") -> ExpertSpec:
    where = f"{key}[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} is not a mapping", path=path, hint="each expert is {source_model: ..., ...}")
    _known(raw, _EXPERT_KEYS, where, path)
    if raw.get("noise_scale") is not None:
        raise ConfigError(f"{where}: noise_scale is not supported (it adds unseeded noise to the expert)", path=path,
                          hint="remove noise_scale")
    model = raw.get("source_model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where} has no source_model", path=path,
                          hint="source_model: a model directory or Hugging Face id")
    scale = raw.get("residual_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ConfigError(f"{where}: residual_scale {scale!r} is not a number", path=path,
                          hint="residual_scale multiplies the expert's down_proj, e.g. 0.5")
    return ExpertSpec(model, _prompts(raw.get("positive_prompts"), f"{where}.positive_prompts", path),
                      _prompts(raw.get("negative_prompts"), f"{where}.negative_prompts", path),
                      None if scale is None else float(scale))


def _prompts(raw: object, where: str, path: Path) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        raise ConfigError(f"{where} is not a list of strings", path=path, hint='e.g. ["write a python function"]')
    return tuple(raw)


def _gate_mode(raw: object, path: Path) -> str:
    if raw not in GATE_MODES:
        raise ConfigError(f"gate_mode {raw!r} is not supported", path=path, hint=f"use one of {', '.join(GATE_MODES)}")
    return str(raw)


def _dtype(raw: object, path: Path) -> torch.dtype | None:
    if raw is None:
        return None
    if raw not in DTYPES:
        raise ConfigError(f"dtype {raw!r} is not supported", path=path, hint="use float32, bfloat16 or float16")
    return DTYPES[raw]


def _int(raw: object, name: str, path: Path) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"{name} {raw!r} is not an integer", path=path, hint="e.g. experts_per_token: 2")
    return raw


def _check(c: MoeConfig) -> None:
    """mergekit-moe's refusals: top-k within the experts; for prompt-routed gates every expert has prompts, and
    not all experts the same prompts (identical routers would make the MoE one expert)."""
    if c.experts_per_token < 1 or c.experts_per_token > len(c.experts):
        raise ConfigError(f"experts_per_token {c.experts_per_token} is outside 1..{len(c.experts)} (the number of "
                          "experts)", path=c.path,
                          hint="experts_per_token is how many experts each token is routed to (mergekit's default 2)")
    if not c.needs_prompts:
        return
    for i, e in enumerate(c.gated):
        if not e.positive_prompts:
            where = f"experts[{i}]" if i < len(c.experts) else "shared_experts[0]"
            raise ConfigError(f"{where} ({e.source_model}) has no positive_prompts, and gate_mode "
                              f"{c.gate_mode} builds its router from them", path=c.path,
                              hint="give each expert one or more prompts that should reach it, or use "
                                   "gate_mode: random")
    first = (c.experts[0].positive_prompts, c.experts[0].negative_prompts)
    if len(c.experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in c.experts[1:]):
        raise ConfigError("every expert has the same prompts: their routers would be identical", path=c.path,
                          hint="give each expert prompts that reflect what should be routed to it")
