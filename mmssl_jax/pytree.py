"""Parameter trees by '/'-joined path ("image_encoder/blocks_0/attn/qkv/kernel"): the one way
every room names a leaf (rules, shardings, checkpoints, exports, init-from)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax


def path_of(keypath: Sequence[Any]) -> str:
    """'/'-joined names of a jax key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flat_items(tree: Any) -> list[tuple[str, Any]]:
    """[(path, leaf)] in tree order."""
    return [(path_of(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def flatten(tree: Any) -> dict[str, Any]:
    """{path: leaf}; a name holding "/" is an error (it would not unflatten)."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = path_of(keypath).split("/")
        if len(names) != len(keypath):
            raise ValueError(f"variable path {keypath} has a '/' in a name")
        out["/".join(names)] = leaf
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten` for nested dicts."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out
