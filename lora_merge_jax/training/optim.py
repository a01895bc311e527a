"""The optimizer: AdamW with warmup and decay, clipping, and parameter groups.

Trainable adapter fields are grouped by name: ``coefficients`` (merge coefficients) may have their own
learning rate (``coefficient_learning_rate``, default 1e-1) and no weight decay; every other field (LoRA
factors) is a ``factors`` group whose weight decay applies to matrices only. Groups are built with
``optax.partition``, so the optimizer state exists only for the trainable tree it is initialised with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule."""

    learning_rate: float = 5e-3  # peak rate of the LoRA factors (suits the embedded tiny model; real ones ~2e-4)
    warmup_steps: int = 0  # linear warmup from 0 to the peak
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape of the decay after warmup
    end_learning_rate_ratio: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled weight decay, on matrices only
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Merge coefficients' peak rate. They are O(1) scalars (one per task, layer or module) that must move
    # by tenths within tens to hundreds of steps, while LoRA factors are small and many. Chosen on SmolLM2's
    # dev data (bench/RESULTS.md, "Coefficient learning rate"): 1e-1 beat 1e-2 (the old default) and 1e-3 on
    # every target and seed; 3e-1 did as well or better in that 12-step study but is the edge of what was tried.
    coefficient_learning_rate: float = 1e-1

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be positive, got {self.learning_rate}")
        if self.coefficient_learning_rate <= 0:
            raise ValueError(f"coefficient_learning_rate: must be positive, got {self.coefficient_learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0 or self.clip_norm < 0:
            raise ValueError("weight_decay and clip_norm must be >= 0")
        if not 0.0 <= self.end_learning_rate_ratio <= 1.0:
            raise ValueError(f"end_learning_rate_ratio: must be in [0, 1], got {self.end_learning_rate_ratio}")


def schedule(cfg: OptimConfig, peak: float, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``peak``, then cosine/linear decay (or constant) until ``total_steps``."""
    end = peak * cfg.end_learning_rate_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def param_labels(trainable: Any) -> Any:
    """'coefficients' for merge coefficients, 'factors' for everything else (same tree as ``trainable``)."""

    def label(path: Any, _: Any) -> str:
        return "coefficients" if any(getattr(k, "name", None) == "coefficients" for k in path) else "factors"

    return jax.tree_util.tree_map_with_path(label, trainable)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The full optimizer: clip -> partition(factors: AdamW with matrix-only decay, coefficients: Adam).

    Example:
        >>> tx = make_optimizer(OptimConfig(learning_rate=1e-3), total_steps=1000)
        >>> opt_state = tx.init(trainable)
    """

    def adamw(peak: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.adamw(
            schedule(cfg, peak, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay,
            mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
        )

    groups = optax.partition(
        {
            "factors": adamw(cfg.learning_rate, cfg.weight_decay),
            "coefficients": adamw(cfg.coefficient_learning_rate, 0.0),
        },
        param_labels,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), groups)
    return groups
