"""Nested dicts of arrays <-> flat dicts keyed by "/"-joined names ("image_head/params/fc_0/kernel").

One implementation for the parameter partition (`model`), the on-disk tower format
(`tower_weights`) and the converters. Leaves are passed through untouched (jax arrays, tracers,
`ShapeDtypeStruct`s, NumPy arrays): a caller that needs NumPy converts itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SEP = "/"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; empty sub-dicts vanish."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{SEP}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict (inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def update_digest(digest, tree: Mapping[str, Any]) -> None:
    """Feed a nested dict of arrays into a hashlib `digest`: every leaf's name, dtype, shape
    and bytes, in name order (the one content hash of the feature cache's fingerprint, the
    embeddings key and the embeddings file's checksum)."""
    for name, leaf in sorted(flatten(tree).items()):
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(value.tobytes())
