"""A merged adapter made smaller: pruned components dropped (``compact``), or an SVD truncation (``compress``).

A merged, pruned adapter is one LoRA of rank sum(r_k) per projection (gain folded into B). Components
pruned to zero in every layer are dropped from the exported rank; ``compress`` instead truncates each
layer's delta-W to a given rank by SVD and reports the relative Frobenius error it costs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.merge.adaptive import MergedLoraAdapter


def compact(adapter: MergedLoraAdapter) -> LoraAdapter:
    """The merged adapter as a plain LoRA (scale 1, gain folded into B) without all-zero components."""
    a_out, b_out, scale_out = {}, {}, {}
    deltas = adapter.deltas(None)
    for name, delta in deltas.items():
        a = np.asarray(jax.device_get(delta.a_DxR), np.float32)
        b = np.asarray(jax.device_get(delta.b_RxF * delta.gain_R[..., None]), np.float32)
        alive_R = (np.abs(a).sum(axis=(0, 1)) > 0) & (np.abs(b).sum(axis=(0, 2)) > 0)
        if not alive_R.any():
            alive_R[0] = True  # keep one (zero) component so the module stays well formed
        a_out[name], b_out[name] = a[..., alive_R], b[:, alive_R, :]
        scale_out[name] = np.ones((a.shape[0],), np.float32)
    return LoraAdapter(a_out, b_out, scale_out, adapter.dropout)


def compress(adapter: Any, rank: int) -> tuple[LoraAdapter, dict[str, float]]:
    """Truncated-SVD compression of every projection's delta-W to ``rank``; returns relative errors.

    Returns:
        (LoRA of rank ``rank`` with scale 1, {projection: ||dW - dW_r||_F / ||dW||_F over all layers}).

    Raises:
        ValueError: ``rank`` < 1.

    Example:
        >>> small, errors = compress(merged, rank=8)   # errors["q_proj"] == 0.0 when rank >= the true rank
    """
    if rank < 1:
        raise ValueError(f"compress: rank must be >= 1, got {rank}")
    a_out, b_out, scale_out, errors = {}, {}, {}, {}
    for name, delta in adapter.deltas(None).items():
        dw_LxDxF = np.asarray(jax.device_get(delta.weight()), np.float64)
        u, s, vt = np.linalg.svd(dw_LxDxF, full_matrices=False)
        r = min(rank, s.shape[-1])
        a_out[name] = (u[..., :r] * s[:, None, :r]).astype(np.float32)
        b_out[name] = vt[:, :r, :].astype(np.float32)
        scale_out[name] = np.ones((dw_LxDxF.shape[0],), np.float32)
        approx = np.einsum("ldr,lrf->ldf", a_out[name], b_out[name])
        errors[name] = float(np.linalg.norm(dw_LxDxF - approx) / max(np.linalg.norm(dw_LxDxF), 1e-30))
    return LoraAdapter(a_out, b_out, scale_out, getattr(adapter, "dropout", 0.0)), errors
