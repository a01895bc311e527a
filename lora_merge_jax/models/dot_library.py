"""Which library XLA's CPU backend runs a program's matrix products in: compile options for ``jax.jit``.

By default XLA:CPU hands dots to YNNPACK. For the float32 products of a decode step (a few rows against every
weight matrix) its kernels stream the weights at a fraction of the memory bandwidth, and XLA's own (Eigen)
kernels do better: on a 2-core AMD EPYC (AVX2), thirty SmolLM2 layers' products for 16 rows took 50.6 ms with
Eigen against 79.6 ms with YNNPACK, and a whole 16 x 256 greedy ``generate`` of 33 tokens 12.7 s against 15.0
s (bench/RESULTS.md). The training step runs at the same speed either way and a plain forward over 8 x 256
tokens with the full LM head is slower with Eigen (5.3 against 4.4 s), so only decoding asks for it.
Low-precision compute keeps XLA's defaults, with which its bfloat16 products were measured on CPUs that have
bfloat16 units (``products``). GPUs and TPUs have no use for the option, so it is not passed there.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

# An empty list of YNNPACK fusion kinds: no dot (nor elementwise or reduction) goes to YNNPACK.
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler knows these debug options (older ones predate YNNPACK)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(jnp.float32(0)).compile()
    except jax.errors.JaxRuntimeError as err:
        if "No such compile option" in str(err):
            return False
        raise
    return True


def decode_compiler_options(compute_dtype: Any) -> dict[str, str] | None:
    """``compiler_options`` for a decoding program computing in ``compute_dtype``: Eigen's dots on a CPU for
    32-bit compute where this jaxlib can say so; None (XLA's defaults) otherwise, and when ``XLA_FLAGS``
    already names the option (the user's choice stands).

    Example:
        >>> decode_compiler_options(jnp.float32)  # on a CPU
        {'xla_cpu_experimental_ynn_fusion_type': ''}
    """
    if jax.default_backend() != "cpu" or jnp.dtype(compute_dtype).itemsize < 4:
        return None
    if any(option in os.environ.get("XLA_FLAGS", "") for option in EIGEN_DOTS):
        return None
    return dict(EIGEN_DOTS) if _cpu_accepts(tuple(EIGEN_DOTS.items())) else None
