"""Matrix products that accumulate in float32: returned in their operands' dtype (``einsum``) or in float32
(``einsum_float32``: the adapters' rank products, the LM head's logits).

XLA's CPU backend runs a bfloat16 product on the CPU's bfloat16 units (AMX, AVX512-BF16) only when the
product's result is float32; asked for a bfloat16 result, it computes in float32 instead, at a fifth to a
seventh of the rate (a [2048, 576] x [576, 3072] product on a 2-core Sapphire Rapids: 1,358 vs 186 GFLOP/s).
GPUs and TPUs accumulate bfloat16 products in float32 anyway, so asking for it costs them nothing. For
float32 operands this is a plain ``jnp.einsum``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum(subscripts: str, x: Array, y: Array) -> Array:
    """``jnp.einsum`` of two operands, accumulated in float32, in their common dtype."""
    out_dtype = jnp.result_type(x, y)
    return jnp.einsum(subscripts, x, y, preferred_element_type=jnp.float32).astype(out_dtype)


def einsum_float32(subscripts: str, x: Array, y: Array, operand_dtype: Any) -> Array:
    """``jnp.einsum`` of two operands cast to ``operand_dtype``, accumulated and returned in float32."""
    return jnp.einsum(subscripts, x.astype(operand_dtype), y.astype(operand_dtype), preferred_element_type=jnp.float32)
