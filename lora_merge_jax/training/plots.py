"""The plot of an adaptive-merge run: coefficients over training, and sparsity per layer and module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


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
