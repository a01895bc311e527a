"""Outputs of an adaptive-merge run: compact PEFT export, SVD compression, and the training plot.

A merged, pruned adapter is one LoRA of rank sum(r_k) per projection (gain folded into B). Components
pruned to zero in every layer are dropped from the exported rank; ``compress`` instead truncates each
layer's delta-W to a given rank by SVD and reports the relative Frobenius error it costs.
"""

from __future__ import annotations

import json
from pathlib import Path
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


def plot_training(metrics_file: Path, png: Path) -> bool:
    """Coefficients over training and final sparsity per layer and module, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    records = [r for r in records if "coefficients" in r]
    if not records:
        return False
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    coeffs = [np.asarray(_first_array(r["coefficients"]), np.float64) for r in records]
    series = np.stack([c.reshape(-1, c.shape[-1]).mean(axis=0) for c in coeffs])  # mean over layers
    for k in range(series.shape[1]):
        left.plot(steps, series[:, k], label=f"task {k}")
    left.set(xlabel="step", ylabel="merge coefficient (mean over layers)", title="Merge coefficients")
    left.legend()
    final = records[-1]["sparsity"]
    for name, per_layer in final.items():
        right.plot(range(len(per_layer)), per_layer, marker="o", label=name)
    right.set(xlabel="layer", ylabel="fraction pruned", title=f"Sparsity at step {steps[-1]}", ylim=(0, 1))
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _first_array(coefficients: Any) -> Any:
    return next(iter(coefficients.values())) if isinstance(coefficients, dict) else coefficients


def write_merge_outputs(adapter: MergedLoraAdapter, model: Any, out: Path, export_rank: int | None, log) -> None:
    """Writes ``adapter_compact/`` (pruned components dropped), optionally ``adapter_rank{r}/``, the plot."""
    from lora_merge_jax.adapters import peft_io

    small = compact(adapter)
    peft_io.save_peft_adapter(small, out / "adapter_compact", model)
    ranks = {n: a.shape[-1] for n, a in small.a.items()}
    log(f"compact PEFT export (pruned components dropped): {out / 'adapter_compact'}, ranks {ranks}")
    if export_rank is not None:
        compressed, errors = compress(adapter, export_rank)
        peft_io.save_peft_adapter(compressed, out / f"adapter_rank{export_rank}", model)
        (out / f"adapter_rank{export_rank}" / "svd_error.json").write_text(json.dumps(errors, indent=2))
        log(f"rank-{export_rank} SVD export: relative Frobenius error {errors}")
    if plot_training(out / "metrics.jsonl", out / "merge_training.png"):
        log(f"plot: {out / 'merge_training.png'}")
