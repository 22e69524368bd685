"""REGISTRY: every merge rule by its CLI name. A new rule is one file and one entry in ``_METHODS``."""
from __future__ import annotations

from ..errors import ConfigError
from .ace import Ace
from .arcee_fusion import ArceeFusion
from .actmat import ActMat
from .average import Average
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .chain import Chain
from .base import MergeMethod, NoParams, Prepass, parse_params, params_dict
from .dare import Dare
from .dare_ties import DareTies
from .della import Della, DellaLinear
from .iso_c import IsoC
from .iso_cts import IsoCts
from .karcher import Karcher
from .model_stock import ModelStock
from .multislerp import MultiSlerp, NuSlerp
from .nearswap import NearSwap
from .ram import Ram, RamPlusTl
from .regmean import RegMean
from .sce import Sce
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import Tsv
from .wudi import Wudi
from .wudi_cfs import WudiCfs

_METHODS: tuple[type[MergeMethod], ...] = (
    Average,
    TaskArithmetic,
    Ties,
    Dare,
    DareTies,
    Breadcrumbs,
    BreadcrumbsTies,
    ModelStock,
    Della,
    DellaLinear,
    Slerp,
    MultiSlerp,
    NuSlerp,
    Sce,
    Karcher,
    NearSwap,
    ArceeFusion,
    Ram,
    RamPlusTl,
    ActMat,
    WudiCfs,
    Wudi,
    Ace,
    Tsv,
    IsoC,
    IsoCts,
    RegMean,
    Chain,
)


def _build_registry(methods: tuple[type[MergeMethod], ...]) -> dict[str, type[MergeMethod]]:
    registry: dict[str, type[MergeMethod]] = {}
    for cls in methods:
        if cls.name in registry:
            raise RuntimeError(f"two merge methods are named {cls.name!r}")
        registry[cls.name] = cls
    return registry


REGISTRY: dict[str, type[MergeMethod]] = _build_registry(_METHODS)
DEFAULT_METHOD = "wudi_cfs"


def mergekit_methods() -> dict[str, type[MergeMethod]]:
    """Every rule a mergekit recipe can name, by its mergekit ``merge_method`` (read from REGISTRY as it is now)."""
    found: dict[str, type[MergeMethod]] = {}
    for cls in REGISTRY.values():
        schema = cls.mergekit_schema()
        if schema is not None:
            if schema.name in found:
                raise RuntimeError(f"two merge methods declare the mergekit name {schema.name!r}")
            found[schema.name] = cls
    return found


def get_method(name: str) -> type[MergeMethod]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}", hint="valid methods: " + ", ".join(REGISTRY)) from None


__all__ = ["REGISTRY", "DEFAULT_METHOD", "MergeMethod", "NoParams", "Prepass", "get_method", "mergekit_methods",
           "parse_params", "params_dict"]
