"""The adaptive LoRA merge (Miyano & Arase, Findings of ACL 2025): trainable coefficients *and* factors.

K task LoRAs (ranks may differ) are concatenated along the rank axis, per projection:
``A_cat = [A_1 | ... | A_K]`` [L, in, sum r_k] and ``B_cat`` [L, sum r_k, out]. The merged update is

    delta(x) = ((x @ (A_cat * mask_a)) * gain) @ (B_cat * mask_b),   gain_r = c_{k(r)} * s_{k(r)}

which equals ``sum_k c_k s_k x A_k B_k`` without ever forming delta-W: one rank-(sum r_k) product.
``task_onehot`` [R, K] maps each rank-1 component to its task, so ``gain = (c @ onehot.T) * task_scale``.
Coefficients have one of three granularities (``task``: [K]; ``task_layer``: [L, K]; ``task_module``:
{projection: [L, K]}). Masks are data beside the parameters (0/1, float32): pruned entries receive zero
gradient through the product and are held at exactly zero (see ``pruning.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_merge_jax.adapters.deltas import LowRankDelta
from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.model import PROJ_AXES
from lora_merge_jax.model_config import ModelConfig

Array = jax.Array
Granularity = Literal["task", "task_layer", "task_module"]


@struct.dataclass
class MergedLoraAdapter:
    """K task LoRAs merged with trainable coefficients and pruning masks.

    Attributes:
        a: projection -> A_cat [L, in, R] (R = sum of the task ranks).
        b: projection -> B_cat [L, R, out].
        mask_a, mask_b: 0/1 masks of the same shapes (1 = kept).
        task_scale: projection -> [L, R] the scale s_k of each component's task LoRA (0 where it does not
            adapt that layer).
        task_onehot: projection -> [R, K] component -> task.
        coefficients: merge coefficients c: [K], [L, K], or {projection: [L, K]}.
        dropout: adapter-input dropout rate.
    """

    a: dict[str, Array]
    b: dict[str, Array]
    mask_a: dict[str, Array]
    mask_b: dict[str, Array]
    task_scale: dict[str, Array]
    task_onehot: dict[str, Array]
    coefficients: Any
    dropout: float = struct.field(pytree_node=False, default=0.0)

    TRAINABLE = ("a", "b", "coefficients")

    @property
    def num_tasks(self) -> int:
        return next(iter(self.task_onehot.values())).shape[-1]

    def coefficients_for(self, name: str, num_layers: int) -> Array:
        """The [L, K] coefficients that apply to projection ``name``."""
        c = self.coefficients[name] if isinstance(self.coefficients, dict) else self.coefficients
        return jnp.broadcast_to(c, (num_layers, self.num_tasks))

    def deltas(self, cfg: ModelConfig) -> dict[str, LowRankDelta]:
        out = {}
        for name, a in self.a.items():
            c_LxK = self.coefficients_for(name, a.shape[0])
            gain_LxR = jnp.einsum("lk,rk->lr", c_LxK, self.task_onehot[name]) * self.task_scale[name]
            out[name] = LowRankDelta(a * self.mask_a[name], self.b[name] * self.mask_b[name], gain_LxR)
        return out

    def logical_axes(self, cfg: ModelConfig) -> MergedLoraAdapter:
        a_axes = {n: ("layers", PROJ_AXES[n][0], "lora_rank") for n in self.a}
        b_axes = {n: ("layers", "lora_rank", PROJ_AXES[n][1]) for n in self.b}
        if isinstance(self.coefficients, dict):
            c_axes: Any = {n: ("layers", "task") for n in self.coefficients}
        else:
            c_axes = ("layers", "task")[-self.coefficients.ndim:]
        return MergedLoraAdapter(
            a=a_axes, b=b_axes, mask_a=a_axes, mask_b=b_axes,
            task_scale={n: ("layers", "lora_rank") for n in self.a},
            task_onehot={n: ("lora_rank", "task") for n in self.a},
            coefficients=c_axes, dropout=self.dropout,
        )

    def sparsity(self) -> dict[str, Array]:
        """Fraction of pruned entries per projection and layer: {projection: [L]}."""
        out = {}
        for name in self.a:
            pruned = jnp.sum(1 - self.mask_a[name], axis=(1, 2)) + jnp.sum(1 - self.mask_b[name], axis=(1, 2))
            total = self.mask_a[name][0].size + self.mask_b[name][0].size
            out[name] = pruned / total
        return out


def merge_for_training(adapters: Sequence[LoraAdapter], granularity: Granularity = "task",
                       init_coefficients: float | Sequence[float] | None = None, dropout: float = 0.0,
                       num_layers: int | None = None) -> MergedLoraAdapter:
    """Concatenates K task LoRAs into a MergedLoraAdapter with all masks at 1.

    Args:
        adapters: the task LoRAs; they must adapt the same projections (ranks and layers may differ).
        granularity: ``task``, ``task_layer`` or ``task_module`` coefficients.
        init_coefficients: a value for every c_k, or one per task (default 1/K: the average).
        dropout: adapter-input dropout rate during fine-tuning.
        num_layers: L (default: from the adapters' factors).

    Raises:
        ValueError: no adapters, an unknown granularity, adapters that target different projections (naming
            them) or whose factors have different layer counts or feature sizes.

    Example:
        >>> merged = merge_for_training([lora_a, lora_b, lora_c], granularity="task_layer")
    """
    if not adapters:
        raise ValueError("merge: at least one task LoRA is needed, got zero")
    if granularity not in ("task", "task_layer", "task_module"):
        raise ValueError(f"merge: granularity '{granularity}' is not one of task, task_layer, task_module")
    k = len(adapters)
    names = list(adapters[0].a)
    for i, ad in enumerate(adapters[1:], 1):
        if set(ad.a) != set(names):
            diff = sorted(set(ad.a) ^ set(names))
            raise ValueError(
                f"merge: task LoRA {i} targets {sorted(ad.a)} but task LoRA 0 targets {sorted(names)}; "
                f"they differ on {diff}. All task LoRAs must adapt the same projections"
            )
        for name in names:
            # [L, in] of A and [L, out] of B must agree; only the rank may differ.
            got, want = (ad.a[name].shape[:2], ad.b[name].shape[::2]), (adapters[0].a[name].shape[:2],
                                                                         adapters[0].b[name].shape[::2])
            if got != want:
                raise ValueError(f"merge: task LoRA {i}'s {name} has [layers, in] / [layers, out] {got}, but task "
                                 f"LoRA 0's has {want}; task LoRAs must come from the same base model")
    layers = num_layers or adapters[0].a[names[0]].shape[0]
    if init_coefficients is None:
        init = np.full((k,), 1.0 / k, np.float32)
    elif np.ndim(init_coefficients) == 0:
        init = np.full((k,), float(init_coefficients), np.float32)
    else:
        init = np.asarray(init_coefficients, np.float32)
        if init.shape != (k,):
            raise ValueError(f"merge: init_coefficients has {init.size} values for {k} task LoRAs")

    a, b, mask_a, mask_b, task_scale, onehot = {}, {}, {}, {}, {}, {}
    for name in names:
        a[name] = jnp.concatenate([jnp.asarray(ad.a[name], jnp.float32) for ad in adapters], axis=-1)
        b[name] = jnp.concatenate([jnp.asarray(ad.b[name], jnp.float32) for ad in adapters], axis=-2)
        ranks = [ad.a[name].shape[-1] for ad in adapters]
        task_of = np.repeat(np.arange(k), ranks)
        onehot[name] = jnp.asarray(np.eye(k, dtype=np.float32)[task_of])
        task_scale[name] = jnp.concatenate(
            [jnp.broadcast_to(jnp.asarray(ad.scale[name], jnp.float32)[:, None], (layers, r))
             for ad, r in zip(adapters, ranks)], axis=-1)
        mask_a[name] = jnp.ones_like(a[name])
        mask_b[name] = jnp.ones_like(b[name])

    if granularity == "task":
        coefficients: Any = jnp.asarray(init)
    elif granularity == "task_layer":
        coefficients = jnp.tile(jnp.asarray(init), (layers, 1))
    else:
        coefficients = {name: jnp.tile(jnp.asarray(init), (layers, 1)) for name in names}
    return MergedLoraAdapter(a, b, mask_a, mask_b, task_scale, onehot, coefficients, dropout)
