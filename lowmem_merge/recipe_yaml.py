"""A recipe's YAML, read with a bound on its expanded size.

YAML aliases share one node, so a few hundred bytes of nested aliases (a "billion laughs" document) describe a tree
of billions of nodes; safe_load builds it cheaply as shared objects, but everything that walks it afterwards (the
resume fingerprint's json.dumps) expands it without bound. The document's node graph is measured as a tree before
anything is built from it.
"""
from __future__ import annotations

from typing import Any

from .errors import ConfigError

MAX_NODES = 100_000       # a recipe of hundreds of models and slices has a few thousand


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a document whose aliases expand to more than MAX_NODES nodes or refer to
    themselves."""
    import yaml
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: Any, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in the tree ``node`` stands for, each shared node counted at every place it appears."""
    import yaml
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ConfigError("the recipe contains itself through a YAML alias", hint="remove the recursive alias")
    open_.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_)
        if total > MAX_NODES:
            raise ConfigError(f"the recipe expands to more than {MAX_NODES} YAML nodes (nested aliases?)",
                              hint="write the recipe out without chains of aliases")
    open_.discard(key)
    sizes[key] = total
    return total
