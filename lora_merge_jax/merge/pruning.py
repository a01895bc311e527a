"""Pruning LoRA parameters during the adaptive merge's fine-tuning.

The paper prunes LoRA parameters while it fine-tunes the merge; its exact criterion and schedule are not
given in our sources, so each choice is an option (defaults picked on our benchmark, see README):

* criterion: ``magnitude`` |theta|, or ``sensitivity`` |theta * grad| smoothed by an exponential moving
  average over steps (as AdaLoRA does);
* granularity: single ``parameter`` entries, or whole rank-1 ``component``s (a column of A_k with its
  row of B_k);
* scope: entries ranked ``global``ly, per ``layer``, or per ``module`` (one projection of one layer);
* which layers are pruned (``layers``: an inclusive [first, last] range) and an optional final sparsity
  per layer;
* schedule: every ``every`` steps between ``start_step`` and ``end_step`` the sparsity rises along a
  cubic ramp (Zhu & Gupta 2017) to ``final_sparsity``.

Masks only ever shrink: an entry pruned once is scored -inf thereafter. When masks change, the factors
and their Adam moments are zeroed at the pruned entries; since the forward multiplies the factors by the
masks, pruned entries then receive zero gradient and stay exactly zero.

Sparsity counts what is ranked: entries for ``parameter`` granularity, rank-1 components for ``component``
granularity, so a group of n units at target t loses exactly floor(t * n) of them. Only the task LoRAs'
parameters count (``MergedLoraAdapter.support_a/b``): a MELoRA source's off-block zeros are not units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.transforms import MaskedNode
from flax import struct

from lora_merge_jax.merge.adaptive import MergedLoraAdapter

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """When, where and by which score LoRA parameters are pruned."""

    enabled: bool = True  # false gives the ablation without pruning
    criterion: Literal["magnitude", "sensitivity"] = "sensitivity"  # score of an entry
    granularity: Literal["parameter", "component"] = "parameter"  # prune entries or rank-1 components
    scope: Literal["global", "layer", "module"] = "module"  # where entries are ranked against each other
    layers: tuple[int, ...] | None = None  # [first, last] layers to prune (inclusive); None = all
    layer_sparsity: tuple[float, ...] | None = None  # final sparsity of each layer (overrides final_sparsity)
    final_sparsity: float = 0.5  # fraction of LoRA parameters pruned at the end of the schedule
    start_step: int = 0  # first step at which pruning may happen
    end_step: int | None = None  # step at which final_sparsity is reached (default: 3/4 of the steps)
    every: int = 10  # prune every this many steps
    sensitivity_beta: float = 0.85  # EMA factor of the sensitivity score

    def __post_init__(self) -> None:
        for name in ("layers", "layer_sparsity"):  # YAML and callers may give lists
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raises a ValueError naming the first field out of range."""
        for name, value, allowed in (("criterion", self.criterion, ("magnitude", "sensitivity")),
                                     ("granularity", self.granularity, ("parameter", "component")),
                                     ("scope", self.scope, ("global", "layer", "module"))):
            if value not in allowed:
                raise ValueError(f"pruning {name} must be one of {', '.join(allowed)}, got {value!r}")
        sparsities = [("final_sparsity", self.final_sparsity)]
        sparsities += [(f"layer_sparsity[{i}]", s) for i, s in enumerate(self.layer_sparsity or ())]
        for name, value in sparsities:
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}: pruning sparsity must be in [0, 1), got {value}")
        if self.layers is not None and (len(self.layers) != 2 or not 0 <= self.layers[0] <= self.layers[1]):
            raise ValueError(f"pruning layers: expected [first, last] with 0 <= first <= last, got {list(self.layers)}")
        if self.layer_sparsity is not None and self.scope == "global":
            raise ValueError("pruning layer_sparsity needs scope 'layer' or 'module', not 'global'")
        if self.every < 1 or self.start_step < 0:
            raise ValueError("pruning every must be >= 1 and start_step >= 0")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"pruning end_step ({self.end_step}) must be after start_step ({self.start_step})")
        if not 0.0 <= self.sensitivity_beta < 1.0:
            raise ValueError(f"pruning sensitivity_beta must be in [0, 1), got {self.sensitivity_beta}")


def layer_targets(cfg: PruneConfig, num_layers: int) -> np.ndarray:
    """Final sparsity of every layer [L] (0 for layers outside the pruned range)."""
    if cfg.layer_sparsity is not None:
        if len(cfg.layer_sparsity) != num_layers:
            raise ValueError(f"pruning layer_sparsity has {len(cfg.layer_sparsity)} values for {num_layers} layers")
        final = np.asarray(cfg.layer_sparsity, np.float32)
    else:
        final = np.full((num_layers,), cfg.final_sparsity, np.float32)
    if cfg.layers is not None:
        first, last = cfg.layers
        if last >= num_layers:
            raise ValueError(f"pruning layers [{first}, {last}] outside the model's {num_layers} layers")
        inside = (np.arange(num_layers) >= first) & (np.arange(num_layers) <= last)
        final = np.where(inside, final, 0.0).astype(np.float32)
    return final


def schedule_fraction(cfg: PruneConfig, step: Array, total_steps: int) -> Array:
    """Fraction of the final sparsity reached at ``step``: a cubic ramp from start_step to end_step."""
    end = cfg.end_step if cfg.end_step is not None else max(cfg.start_step + 1, (3 * total_steps) // 4)
    progress = jnp.clip((step - cfg.start_step) / max(end - cfg.start_step, 1), 0.0, 1.0)
    return 1.0 - (1.0 - progress) ** 3


@struct.dataclass
class FactorScores:
    """A score per factor entry, shaped like the adapter's ``a`` and ``b``.

    A dataclass (not a dict) so that its key paths end in ``.a['q_proj']`` like the factors', and
    ``train_step.state_shardings`` shards it like them.
    """

    a: dict[str, Array]
    b: dict[str, Array]


def init_statistics(cfg: PruneConfig, adapter: MergedLoraAdapter) -> dict | None:
    """Pruning state kept in the checkpoint: the sensitivity EMA (for that criterion) and the last target."""
    if not cfg.enabled:
        return None
    stats: dict[str, Any] = {"target_sparsity": jnp.zeros((), jnp.float32)}
    if cfg.criterion == "sensitivity":
        stats["sensitivity"] = FactorScores(a=jax.tree.map(jnp.zeros_like, adapter.a),
                                            b=jax.tree.map(jnp.zeros_like, adapter.b))
    return stats


def _keep_top(scores_GxN: Array, prune_G: Array) -> Array:
    """Per row, 1 for entries whose rank (ascending score) is >= the row's prune count."""
    order = jnp.argsort(scores_GxN, axis=-1)
    ranks = jnp.argsort(order, axis=-1)
    return (ranks >= prune_G[:, None]).astype(jnp.float32)


def _raw_scores(cfg: PruneConfig, adapter: MergedLoraAdapter, stats: dict) -> tuple[dict, dict]:
    """Each factor entry's score, before masking: the sensitivity EMA or the magnitude."""
    if cfg.criterion == "sensitivity":
        return stats["sensitivity"].a, stats["sensitivity"].b
    return {n: jnp.abs(x) for n, x in adapter.a.items()}, {n: jnp.abs(x) for n, x in adapter.b.items()}


def _parameter_units(cfg: PruneConfig, adapter: MergedLoraAdapter, stats: dict) -> dict[str, Array]:
    """[L, D*R + R*F] entry scores per module; masked entries (pruned, or not a parameter) score -inf, so
    that masks only shrink and structural zeros are never counted as pruned parameters."""
    sa, sb = _raw_scores(cfg, adapter, stats)
    num_layers = next(iter(adapter.a.values())).shape[0]
    return {n: jnp.concatenate([jnp.where(adapter.mask_a[n] > 0, sa[n], -jnp.inf).reshape(num_layers, -1),
                                jnp.where(adapter.mask_b[n] > 0, sb[n], -jnp.inf).reshape(num_layers, -1)], -1)
            for n in adapter.a}


def _component_units(cfg: PruneConfig, adapter: MergedLoraAdapter, stats: dict) -> dict[str, Array]:
    """[L, R] component scores per module, over each component's supported entries only.

    A MELoRA source's component has parameters in one block of its column of A and its row of B and
    structural zeros elsewhere; those zeros are not part of it. A component already pruned (no unmasked
    supported entry left) or with no parameter at all scores -inf.
    """
    sa, sb = _raw_scores(cfg, adapter, stats)
    deltas = adapter.deltas(None)
    units = {}
    for n in adapter.a:
        support_a, support_b = adapter.support_a[n], adapter.support_b[n]
        if cfg.criterion == "magnitude":
            # The Frobenius norm of its rank-1 update: |gain| * ||a_r|| * ||b_r|| over its supported entries.
            score = (jnp.abs(deltas[n].gain_R) * jnp.linalg.norm(adapter.a[n] * support_a, axis=1)
                     * jnp.linalg.norm(adapter.b[n] * support_b, axis=2))
        else:  # the sum of its entries' (first-order) loss changes
            score = jnp.sum(sa[n] * support_a, axis=1) + jnp.sum(sb[n] * support_b, axis=2)
        alive = jnp.maximum(jnp.max(adapter.mask_a[n] * support_a, axis=1),
                            jnp.max(adapter.mask_b[n] * support_b, axis=2)) > 0
        units[n] = jnp.where(alive, score, -jnp.inf)
    return units


def _prune_counts(target_G: Array, live_GxN: Array) -> Array:
    """Entries to prune per group [G]: a ``target`` fraction of its live (parameter) entries plus every
    non-parameter entry, which scores -inf (as do those pruned already) and so fills the count first."""
    live_G = jnp.sum(live_GxN, axis=-1)
    return (jnp.floor(target_G * live_G) + (live_GxN.shape[-1] - live_G)).astype(jnp.int32)


def new_masks(cfg: PruneConfig, adapter: MergedLoraAdapter, stats: dict, target_L: Array) -> tuple[dict, dict]:
    """Masks that prune the lowest-scoring entries up to sparsity ``target_L`` [L] in each scope group.

    Sparsity counts the task LoRAs' parameters only (``adapter.support_a/b``), not structural zeros.
    """
    names = list(adapter.a)
    num_layers = next(iter(adapter.a.values())).shape[0]
    if cfg.granularity == "component":
        units = _component_units(cfg, adapter, stats)
        # A component exists where its slot has any parameter.
        live = {n: jnp.maximum(jnp.max(adapter.support_a[n], axis=1), jnp.max(adapter.support_b[n], axis=2))
                for n in names}
    else:
        units = _parameter_units(cfg, adapter, stats)
        live = {n: jnp.concatenate([adapter.support_a[n].reshape(num_layers, -1),
                                    adapter.support_b[n].reshape(num_layers, -1)], -1) for n in names}
    eligible_L = target_L > 0

    if cfg.scope == "module":
        keep = {n: _keep_top(u, _prune_counts(target_L, live[n])) for n, u in units.items()}
    else:
        sizes = [units[n].shape[1] for n in names]
        joined_LxN = jnp.concatenate([units[n] for n in names], axis=1)
        live_LxN = jnp.concatenate([live[n] for n in names], axis=1)
        if cfg.scope == "layer":
            keep_joined = _keep_top(joined_LxN, _prune_counts(target_L, live_LxN))
        else:  # global: rank every eligible layer's entries together
            flat = jnp.where(eligible_L[:, None], joined_LxN, jnp.inf).reshape(1, -1)
            live_count = jnp.sum(jnp.where(eligible_L[:, None], live_LxN, 0.0))
            non_parameters = jnp.sum(eligible_L) * joined_LxN.shape[1] - live_count  # eligible, scored -inf
            prune = (jnp.floor(jnp.max(target_L) * live_count) + non_parameters).astype(jnp.int32)
            keep_joined = _keep_top(flat, prune[None]).reshape(joined_LxN.shape)
        split_at = np.cumsum(sizes)[:-1]
        keep = dict(zip(names, jnp.split(keep_joined, split_at, axis=1)))

    mask_a, mask_b = {}, {}
    for n in names:
        k = jnp.where(eligible_L[:, None], keep[n], 1.0)
        if cfg.granularity == "component":
            mask_a[n] = adapter.mask_a[n] * k[:, None, :]
            mask_b[n] = adapter.mask_b[n] * k[:, :, None]
        else:
            size_a = adapter.a[n][0].size
            mask_a[n] = adapter.mask_a[n] * k[:, :size_a].reshape(adapter.a[n].shape)
            mask_b[n] = adapter.mask_b[n] * k[:, size_a:].reshape(adapter.b[n].shape)
    return mask_a, mask_b


def _mask_moments(optimizer: optax.GradientTransformation, opt_state: Any, trainable: Any, mask_a: dict,
                  mask_b: dict) -> Any:
    """Zeroes every optimizer moment of a factor at its pruned entries; ``optax.tree_utils.tree_map_params``
    finds the parameter-shaped parts of the optimizer state, whatever the optimizer's structure."""
    masks = trainable.replace(a=mask_a, b=mask_b, **({} if trainable.coefficients is None else {
        "coefficients": jax.tree.map(jnp.ones_like, trainable.coefficients)}))
    return optax.tree_utils.tree_map_params(
        optimizer, lambda moment, mask: moment if isinstance(moment, MaskedNode) else moment * mask, opt_state,
        masks, is_leaf=lambda x: isinstance(x, MaskedNode))


def make_post_update(cfg: PruneConfig, total_steps: int, num_layers: int) -> Callable:
    """The ``post_update(state, grads, optimizer) -> state`` hook of the train step: statistics and masks.

    The state's ``extra`` must be ``init_statistics(cfg, adapter)``. With ``cfg.enabled`` false the hook
    returns the state unchanged.

    Example:
        >>> hook = make_post_update(PruneConfig(final_sparsity=0.5), total_steps=1000, num_layers=16)
        >>> step = make_train_step(model.config, tx, post_update=hook)
    """
    if not cfg.enabled:
        return lambda state, grads, optimizer: state
    final_L = jnp.asarray(layer_targets(cfg, num_layers))
    end = cfg.end_step if cfg.end_step is not None else max(cfg.start_step + 1, (3 * total_steps) // 4)

    def post_update(state: Any, grads: Any, optimizer: optax.GradientTransformation) -> Any:
        adapter = state.adapter
        stats = dict(state.extra)
        if cfg.criterion == "sensitivity":
            if grads.a is None or grads.b is None:
                raise ValueError("pruning criterion 'sensitivity' needs gradients of the LoRA factors, but they "
                                 "are frozen (trainable_fields without 'a' and 'b'); use criterion 'magnitude'")
            beta = cfg.sensitivity_beta
            ema = stats["sensitivity"]
            stats["sensitivity"] = FactorScores(
                a={n: beta * ema.a[n] + (1 - beta) * jnp.abs(adapter.a[n] * grads.a[n]) for n in adapter.a},
                b={n: beta * ema.b[n] + (1 - beta) * jnp.abs(adapter.b[n] * grads.b[n]) for n in adapter.b},
            )
        step = state.step
        due = (step >= cfg.start_step) & (((step - cfg.start_step) % cfg.every == 0) | (step == end))
        target_L = final_L * schedule_fraction(cfg, step, total_steps)
        mask_a, mask_b = jax.lax.cond(
            due, lambda: new_masks(cfg, adapter, stats, target_L), lambda: (adapter.mask_a, adapter.mask_b))
        stats["target_sparsity"] = jnp.where(due, jnp.max(target_L), stats["target_sparsity"])
        trainable = state.trainable
        if trainable.a is not None:
            trainable = trainable.replace(a={n: v * mask_a[n] for n, v in trainable.a.items()},
                                          b={n: v * mask_b[n] for n, v in trainable.b.items()})
        frozen = state.frozen.replace(mask_a=mask_a, mask_b=mask_b)
        opt_state = state.opt_state
        if trainable.a is not None:
            opt_state = _mask_moments(optimizer, opt_state, trainable, mask_a, mask_b)
        return state.replace(trainable=trainable, frozen=frozen, opt_state=opt_state, extra=stats)

    return post_update
