"""The adaptive LoRA merge (Miyano & Arase, Findings of ACL 2025): trainable coefficients *and* factors.

K task LoRAs (ranks may differ) are concatenated along the rank axis, per projection:
``A_cat = [A_1 | ... | A_K]`` [L, in, sum r_k] and ``B_cat`` [L, sum r_k, out]. The merged update is

    delta(x) = ((x @ (A_cat * mask_a)) * gain) @ (B_cat * mask_b),   gain_r = c_{k(r)} * s_{k(r)}

which equals ``sum_k c_k s_k x A_k B_k`` without ever forming delta-W: one rank-(sum r_k) product.
``task_onehot`` [R, K] maps each rank-1 component to its task, so ``gain = (c @ onehot.T) * task_scale``.
Coefficients have one of three granularities (``task``: [K]; ``task_layer``: [L, K]; ``task_module``:
{projection: [L, K]}). Masks are data beside the parameters (0/1, float32): pruned entries receive zero
gradient through the product and are held at exactly zero (see ``pruning.py``).

Entries that are not parameters of any task LoRA stay out of both fine-tuning and the sparsity count: a
MELoRA source arrives (through PEFT) as a block-diagonal LoRA whose off-block entries are exact zeros, a
``rank_pattern`` adapter is zero-padded to the largest rank, and layers a task does not adapt are all zero.
``support_a``/``support_b`` mark the entries that exist; the masks start equal to them, so fine-tuning
never grows a MELoRA into a dense LoRA, and a sparsity of 0.5 prunes half of the real parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.models.deltas import LowRankDelta
from lora_merge_jax.models.weights import ADAPTER_AXES

Array = jax.Array
Granularity = Literal["task", "task_layer", "task_module"]


@struct.dataclass
class MergedLoraAdapter:
    """K task LoRAs merged with trainable coefficients and pruning masks.

    Attributes:
        a: projection -> A_cat [L, in, R] (R = sum of the task ranks).
        b: projection -> B_cat [L, R, out].
        mask_a, mask_b: 0/1 masks of the same shapes (1 = kept).
        support_a, support_b: 0/1, the entries that are parameters of a task LoRA (see the module docstring);
            masks never exceed them.
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
    support_a: dict[str, Array]
    support_b: dict[str, Array]
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
        a_axes = {n: ("layers", ADAPTER_AXES[n][0], "lora_rank") for n in self.a}
        b_axes = {n: ("layers", "lora_rank", ADAPTER_AXES[n][1]) for n in self.b}
        if isinstance(self.coefficients, dict):
            c_axes: Any = {n: ("layers", "task") for n in self.coefficients}
        else:
            c_axes = ("layers", "task")[-self.coefficients.ndim:]
        return MergedLoraAdapter(
            a=a_axes, b=b_axes, mask_a=a_axes, mask_b=b_axes, support_a=a_axes, support_b=b_axes,
            task_scale={n: ("layers", "lora_rank") for n in self.a},
            task_onehot={n: ("lora_rank", "task") for n in self.a},
            coefficients=c_axes, dropout=self.dropout,
        )

    def sparsity(self) -> dict[str, Array]:
        """Fraction of the task LoRAs' parameters pruned, per projection and layer: {projection: [L]}.

        Counted over the support, so a MELoRA's off-block zeros are neither pruned nor kept; a layer that no
        task adapts has sparsity 0.
        """
        out = {}
        for name in self.a:
            live = jnp.sum(self.support_a[name], axis=(1, 2)) + jnp.sum(self.support_b[name], axis=(1, 2))
            kept = jnp.sum(self.mask_a[name], axis=(1, 2)) + jnp.sum(self.mask_b[name], axis=(1, 2))
            out[name] = (live - kept) / jnp.maximum(live, 1.0)
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

    a, b, support_a, support_b, task_scale, onehot = {}, {}, {}, {}, {}, {}
    for name in names:
        a[name] = jnp.concatenate([jnp.asarray(ad.a[name], jnp.float32) for ad in adapters], axis=-1)
        b[name] = jnp.concatenate([jnp.asarray(ad.b[name], jnp.float32) for ad in adapters], axis=-2)
        support_a[name], support_b[name] = factor_support(a[name], b[name])
        ranks = [ad.a[name].shape[-1] for ad in adapters]
        task_of = np.repeat(np.arange(k), ranks)
        onehot[name] = jnp.asarray(np.eye(k, dtype=np.float32)[task_of])
        task_scale[name] = jnp.concatenate(
            [jnp.broadcast_to(jnp.asarray(ad.scale[name], jnp.float32)[:, None], (layers, r))
             for ad, r in zip(adapters, ranks)], axis=-1)

    if granularity == "task":
        coefficients: Any = jnp.asarray(init)
    elif granularity == "task_layer":
        coefficients = jnp.tile(jnp.asarray(init), (layers, 1))
    else:
        coefficients = {name: jnp.tile(jnp.asarray(init), (layers, 1)) for name in names}
    # Masks start as copies: the train step donates its state, and one buffer donated twice crashes XLA.
    mask_a, mask_b = jax.tree.map(jnp.copy, support_a), jax.tree.map(jnp.copy, support_b)
    return MergedLoraAdapter(a, b, mask_a, mask_b, support_a, support_b, task_scale, onehot, coefficients, dropout)


def factor_support(a_LxDxR: Array, b_LxRxF: Array) -> tuple[Array, Array]:
    """0/1 masks of the entries of trained LoRA factors that are parameters, not structural zeros.

    A rank slot whose A column and B row are both all zero is padding (rank_pattern, an unadapted layer):
    none of it is a parameter. In a live slot, exact zeros in a factor that has nonzero entries in that slot
    are structure (a MELoRA's off-block entries); a factor that is zero throughout a live slot (B of a LoRA
    never trained) is all parameters, so that it can still learn.
    """
    nonzero_a, nonzero_b = a_LxDxR != 0, b_LxRxF != 0
    any_a_LxR, any_b_LxR = jnp.any(nonzero_a, axis=1), jnp.any(nonzero_b, axis=2)
    live_LxR = live_slots(a_LxDxR, b_LxRxF)
    support_a = (nonzero_a | ~any_a_LxR[:, None, :]) & live_LxR[:, None, :]
    support_b = (nonzero_b | ~any_b_LxR[:, :, None]) & live_LxR[:, :, None]
    return support_a.astype(jnp.float32), support_b.astype(jnp.float32)


def live_slots(a_LxDxR: Array, b_LxRxF: Array) -> Array:
    """[L, R] the rank slots in use: those whose A column or B row is not all zero (the rest is padding)."""
    return jnp.any(a_LxDxR != 0, axis=1) | jnp.any(b_LxRxF != 0, axis=2)
