"""Mixture-of-experts building (``lowmerge moe``): mergekit-moe's YAML in, a Mixtral-style checkpoint out."""
from .build import build_moe
from .config import MoeConfig, load_moe_config

__all__ = ["build_moe", "MoeConfig", "load_moe_config"]
