"""Which transformers class a directory holds, what its graph returns, and the model built without weights.

Export never materializes weights: the graph is traced on fake tensors, and the values the checkpoint lacks
(non-persistent buffers such as rotary ``inv_freq`` or BERT's ``position_ids``) come from a second build whose
parameters live on the meta device while its buffers are computed for real.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_merge.errors import InputError


@dataclass(frozen=True)
class Kind:
    """``task``: causal-lm, sequence-classification or encoder; ``output``: the graph's one output."""
    task: str
    auto_class: str
    output: str


_KINDS = (
    (("ForCausalLM", "LMHeadModel"), Kind("causal-lm", "AutoModelForCausalLM", "logits")),
    (("ForSequenceClassification",), Kind("sequence-classification", "AutoModelForSequenceClassification",
                                          "logits")),
    (("Model",), Kind("encoder", "AutoModel", "last_hidden_state")),
)


def load_config(model_dir: Path):
    """The directory's config with the settings export and validation share: no KV cache, SDPA attention."""
    from transformers import AutoConfig
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError("no config.json", path=model_dir,
                         hint="pass a Hugging Face model directory (config.json + safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise InputError("config.json is not readable JSON", path=path, hint="fix or replace config.json") from None
    if not isinstance(raw, dict):
        raise InputError("config.json is not a JSON object", path=path, hint="fix or replace config.json")
    if "auto_map" in raw:
        raise InputError("config.json asks to run the model's own Python code (auto_map); lowmerge never runs "
                         "code that comes with a model", path=path,
                         hint="export only architectures that transformers itself implements")
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise InputError(f"transformers cannot read config.json: {str(e).splitlines()[0]}", path=model_dir,
                         hint="check config.json's model_type") from None
    if getattr(config, "quantization_config", None):
        raise InputError("the checkpoint is already quantized (config.json has a quantization_config)",
                         path=model_dir / "config.json",
                         hint="export the unquantized model and use --quantize int8|int4 for a quantized ONNX")
    config.use_cache = False
    return config


def kind_of(config, model_dir: Path) -> Kind:
    archs = getattr(config, "architectures", None) or []
    composite = [k for k in ("text_config", "vision_config", "audio_config") if getattr(config, k, None) is not None]
    if composite:
        raise InputError(f"{archs[0] if archs else config.model_type} combines several models ({', '.join(composite)}):"
                         " export takes one text model", path=model_dir / "config.json",
                         hint="export a decoder LM, an encoder or a classifier")
    for arch in archs:
        for suffixes, kind in _KINDS:
            if arch.endswith(suffixes):
                return kind
    raise InputError(f"cannot export architecture {archs or '(none given)'}", path=model_dir / "config.json",
                     hint="supported: *ForCausalLM / GPT2LMHeadModel, *ForSequenceClassification and base models "
                          "(BertModel); set 'architectures' in config.json")


def refuse_plain(config, model_dir: Path) -> None:
    """The no-cache graph is traced by torch.onnx: architectures it cannot trace are refused in one line."""
    if getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise InputError(f"{config.model_type}: mixture-of-experts routing picks experts by value, which torch.onnx "
                         "cannot trace into a graph", path=model_dir / "config.json",
                         hint="export a dense model; lowmerge cannot export this architecture yet")


def build(config, kind: Kind, dtype: torch.dtype) -> torch.nn.Module:
    import transformers
    auto = getattr(transformers, kind.auto_class)
    return _with_attention(lambda attn: auto.from_config(config, dtype=dtype, attn_implementation=attn)).eval()


def from_pretrained(auto_class, model_dir: Path) -> torch.nn.Module:
    """The whole model in fp32 from its directory, never running code from it (the reference of validation)."""
    return _with_attention(lambda attn: auto_class.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn, trust_remote_code=False)).eval()


def _with_attention(make):
    """SDPA where the architecture offers it (the fast kernel), else transformers' eager attention (Gemma 2's
    soft-capping has no SDPA form, and transformers refuses to build it with one)."""
    try:
        return make("sdpa")
    except ValueError as e:
        if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e).lower():
            raise
        return make("eager")


def fake_model(config, kind: Kind, dtype: torch.dtype) -> torch.nn.Module:
    """The model with fake parameters and buffers: shapes only, nothing allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        return build(config, kind, dtype)


def meta_model(config, kind: Kind, dtype: torch.dtype) -> torch.nn.Module:
    """The model with every parameter on the meta device and every buffer real (rotary tables, position ids)."""
    with _parameters_on_meta():
        return build(config, kind, dtype)


def buffers_and_ties(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Real values of every buffer of a :func:`meta_model`, and for each parameter name the names it is tied to
    (itself first)."""
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    ties = {name: [name] + [n for n in names if n != name] for names in by_id.values() for name in names}
    return buffers, ties


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real (and small)."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one may be a tied twin: keep its identity
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
