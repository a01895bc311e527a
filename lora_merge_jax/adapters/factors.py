"""Any adapter's deltas as exact per-layer LoRA factors: what PEFT export and SVD compression start from."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.deltas import BlockDelta, LowRankDelta

LowRankFactors = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(A [L, in, R], B [L, R, out], scale [L]) float32: delta_W[l] = scale[l] * A[l] @ B[l]; scale 0 = not adapted."""


def _block_diagonal(delta: BlockDelta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MELoRA blocks as one LoRA of rank N*R: A [L, D, N*R], B [L, N*R, F] block-diagonal, gain [L, N*R]."""
    a, b, gain = (np.asarray(jax.device_get(x), np.float32) for x in (delta.a_NxDnxR, delta.b_NxRxFn, delta.gain_NxR))
    layers, n, dn, r = a.shape
    fn = b.shape[-1]
    a_full = np.zeros((layers, n * dn, n * r), np.float32)
    b_full = np.zeros((layers, n * r, n * fn), np.float32)
    for i in range(n):
        a_full[:, i * dn:(i + 1) * dn, i * r:(i + 1) * r] = a[:, i]
        b_full[:, i * r:(i + 1) * r, i * fn:(i + 1) * fn] = b[:, i]
    return a_full, b_full, gain.reshape(layers, n * r)


def _fold_gain(a: np.ndarray, b: np.ndarray, gain_LxR: np.ndarray) -> LowRankFactors:
    """One scale per layer: a uniform positive gain is the scale; otherwise gain goes into B and scale is 1."""
    b = b.copy()
    scale_L = np.zeros(gain_LxR.shape[0], np.float32)
    for layer, gain_R in enumerate(gain_LxR):
        if not gain_R.any():
            continue  # not adapted in this layer
        if gain_R[0] > 0 and np.all(gain_R == gain_R[0]):
            scale_L[layer] = gain_R[0]
        else:
            scale_L[layer] = 1.0
            b[layer] = gain_R[:, None] * b[layer]
    return a, b, scale_L


def lowrank_factors(adapter: Any, cfg: ModelConfig) -> dict[str, LowRankFactors]:
    """Every projection's delta of any adapter as exact per-layer LoRA factors.

    Works from ``adapter.deltas(cfg)``, so it serves LoRA, MELoRA (block-diagonal, rank N*R) and any later
    adapter whose deltas are ``LowRankDelta`` or ``BlockDelta``.

    Args:
        adapter: any adapter with ``deltas(cfg)``.
        cfg: the base model's architecture.

    Returns:
        projection -> (A [L, in, R], B [L, R, out], scale [L]) float32 numpy arrays on the host, with
        ``delta_W[l] == scale[l] * A[l] @ B[l]``; scale is 0 in layers the adapter leaves alone.

    Example:
        >>> a, b, scale = lowrank_factors(melora, model.config)["q_proj"]   # rank N*R, block-diagonal
    """
    out = {}
    for proj, delta in adapter.deltas(cfg).items():
        if isinstance(delta, LowRankDelta):
            a, b, gain = (np.asarray(jax.device_get(x), np.float32) for x in (delta.a_DxR, delta.b_RxF, delta.gain_R))
            gain = np.broadcast_to(gain, a.shape[::2])
        elif isinstance(delta, BlockDelta):
            a, b, gain = _block_diagonal(delta)
        else:
            raise TypeError(f"{proj}: a {type(delta).__name__} delta cannot be written as LoRA factors")
        out[proj] = _fold_gain(a, b, gain)
    return out
