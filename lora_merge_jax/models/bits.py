"""bfloat16 arrays held as uint16 of the same bits where they are written into a larger buffer.

XLA's CPU backend has no bfloat16 dynamic-update-slice: it rewrites one as a conversion of the whole buffer to
float32, the update, and a conversion back, so that writing one layer's slice costs the whole stack (the
layer scan's saved activations: a quarter of a bfloat16 SmolLM2 train step; a KV cache: every decode step).
Integer buffers it updates in place. A bitcast costs nothing on any backend, so the same code runs everywhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def storage_dtype(dtype: Any) -> Any:
    """The dtype a buffer of ``dtype`` values is held in: uint16 for bfloat16, else ``dtype`` itself."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def to_storage(x: Array, stored_dtype: Any) -> Array:
    """``x`` in a buffer of ``stored_dtype`` (``storage_dtype`` of some dtype): bfloat16 bits as uint16, else a
    cast."""
    if jnp.dtype(stored_dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(stored_dtype)


def from_storage(stored: Array, dtype: Any) -> Array:
    """The values of a stored buffer, in ``dtype``."""
    if stored.dtype == jnp.uint16:
        stored = jax.lax.bitcast_convert_type(stored, jnp.bfloat16)
    return stored.astype(dtype)


def tree_to_storage(tree: Any) -> Any:
    """Every bfloat16 leaf of ``tree`` as uint16 bits (others unchanged)."""
    return jax.tree.map(lambda a: to_storage(a, storage_dtype(a.dtype)), tree)


def tree_from_storage(tree: Any) -> Any:
    """The inverse of ``tree_to_storage``."""
    return jax.tree.map(lambda a: from_storage(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a, tree)
