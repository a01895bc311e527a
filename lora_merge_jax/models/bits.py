"""bfloat16 arrays held as uint16 of the same bits where they are written into or joined into a larger buffer.

XLA's CPU backend has no bfloat16 dynamic-update-slice or concatenation: it rewrites each as a conversion of
every operand to float32, the float32 operation, and a conversion back, so that writing one layer's slice
costs the whole stack (the layer scan's saved activations: a quarter of a bfloat16 SmolLM2 train step; a KV
cache: every decode step), and joining projections' weights side by side costs three passes over them.
Integer buffers it updates and joins in place. A bitcast costs nothing on any backend, so the same code runs
everywhere.
"""

from __future__ import annotations

import functools
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def concatenate(arrays: list[Array], axis: int) -> Array:
    """``jnp.concatenate`` of same-dtype arrays, bfloat16 ones joined as uint16 bits. Differentiable: the
    tangents are joined by ``jnp.concatenate`` (a bitcast has no derivative)."""
    if jnp.dtype(arrays[0].dtype) != jnp.bfloat16:
        return jnp.concatenate(arrays, axis=axis)
    joined = jnp.concatenate([jax.lax.bitcast_convert_type(a, jnp.uint16) for a in arrays], axis=axis)
    return jax.lax.bitcast_convert_type(joined, jnp.bfloat16)


@concatenate.defjvp
def _concatenate_jvp(axis, primals, tangents):
    (arrays,), (d_arrays,) = primals, tangents
    return concatenate(arrays, axis), jnp.concatenate(d_arrays, axis=axis)
