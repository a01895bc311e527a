"""Static merges of task LoRAs: PEFT's ``add_weighted_adapter`` combinations, plus an exact one.

Every PEFT ``combination_type`` is reproduced with PEFT's semantics (``peft/tuners/lora/model.py`` and
``peft/utils/merge_utils.py``, PEFT 0.21), on our stacked ``LoraAdapter`` layout (A [L, in, R], B [L, R, out],
scale [L]). They fall in three families:

* ``cat``: the factors are concatenated along the rank with ``w_k * s_k`` folded into A, so
  ``delta = sum_k w_k s_k B_k A_k`` exactly; the rank is the sum of the ranks.
* factor methods (``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): A's and B's are
  combined *separately*, A_k weighted by ``sign(w_k s_k) sqrt|w_k s_k|`` and B_k by ``sqrt|w_k s_k|``, so
  ``delta = (sum_k sqrt.. B_k)(sum_k sign.. sqrt.. A_k)`` has cross terms ``B_j A_k``: an approximation of
  the weighted sum that needs equal ranks. Pruning and TIES sign election act on the factors' entries.
* SVD methods (``svd``, ``ties_svd``, ``dare_*_svd``, ``magnitude_prune_svd``): each module's full delta
  ``w_k s_k B_k A_k`` is combined by the rule, then truncated to ``svd_rank`` (default: the largest rank) by
  an SVD; ``svd_clamp`` clips both factors to a quantile of their entries.

The merged adapter has PEFT's ``lora_alpha = r``, i.e. scale 1 in every adapted layer (0 elsewhere). Two
PEFT rules carry over: a single adapter is always merged with ``linear``, and magnitude pruning keeps
``int(density * numel)`` entries per module, with ``numel`` counting real ranks only (a rank slot whose A
column and B row are both zero is taken as padding). DARE draws its masks from a JAX ``key``, not torch's
generator, so DARE merges match PEFT in distribution, not bit for bit. The SVD's singular vectors have
arbitrary signs that differ between LAPACK builds (torch's and JAX's do); the truncated product does not
depend on them, but ``svd_clamp``'s quantile does, so clamped merges follow PEFT's rule on our SVD.

One PEFT behaviour is deliberately not reproduced: PEFT copies the first adapter's config into the merged
one, so when that adapter is rsLoRA the merged scale is ``r / sqrt(r) = sqrt(r)`` instead of 1 (delta-W
multiplied by sqrt(r)); our merged scale is always 1.

``method="exact"`` is ours: ``cat`` without its restrictions. It accepts adapters that target different
projections or layers (the sum is still exact) and traced weights, so it can sit inside ``jax.jit`` and be
differentiated with respect to the coefficients (LoraHub, learned merges).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.adapters.targets import module_path
from lora_merge_jax.merge.adaptive import live_slots
from lora_merge_jax.models.config import PROJECTIONS

Array = jax.Array

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("exact", "cat", *FACTOR_METHODS, *SVD_METHODS)
_PRUNING_RULES = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")
_HIGHEST = jax.lax.Precision.HIGHEST


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | Array,
    method: str = "linear",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    key: Array | None = None,
) -> LoraAdapter:
    """One LoRA from several, as PEFT's ``add_weighted_adapter(adapters, weights, combination_type=method)``.

    Args:
        adapters: task LoRAs for the same base model.
        weights: one weight per adapter (may be negative). For ``exact``, a JAX array (traced or not).
        method: one of ``METHODS`` (see the module docstring).
        density: fraction of entries kept by the pruning methods (ties, dare, magnitude_prune), in (0, 1];
            ignored by the others, as in PEFT.
        majority_sign_method: TIES sign election, ``"total"`` (sum of values) or ``"frequency"`` (count).
        svd_rank: rank of the SVD merges (default: the largest rank among the adapters).
        svd_clamp: quantile in [0, 1] at which the SVD factors' entries are clipped (default: no clipping).
        key: PRNG key for the random DARE masks.

    Returns:
        A LoraAdapter (float32 factors) whose delta-W is PEFT's merged adapter's delta-W.

    Raises:
        ValueError: no adapters, a weight count that differs, an unknown method or sign method, a density
            outside (0, 1] or missing where needed, unequal ranks for a factor method, adapters that target
            different modules (except for ``exact``), a DARE method without a key.

    Example:
        >>> merged = merge_adapters([lora_a, lora_b], [0.6, 0.4], "ties", density=0.5)
        >>> logits = forward(model, ids, adapter=merged)
    """
    if len(adapters) == 0:
        raise ValueError("merge_adapters: no adapters to merge")
    if len(weights) != len(adapters):
        raise ValueError(f"merge_adapters: {len(weights)} weights for {len(adapters)} adapters")
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose among {', '.join(METHODS)}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if majority_sign_method not in _SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and svd_rank < 1:
        raise ValueError(f"svd_rank must be a positive rank, got {svd_rank}")
    if svd_clamp is not None and not 0.0 <= svd_clamp <= 1.0:
        raise ValueError(f"svd_clamp is a quantile and must be in [0, 1], got {svd_clamp}")
    _check_shapes(adapters)
    if method == "exact":
        return _concatenate(adapters, weights)
    if len(adapters) == 1:
        method = "linear"  # PEFT merges a single adapter with `linear` whatever was asked
    rule = "linear" if method == "svd" else method.removesuffix("_svd")
    if rule in _PRUNING_RULES and density is None:
        raise ValueError(f"method {method!r} prunes: pass density in (0, 1]")
    if rule.startswith("dare") and key is None:
        raise ValueError(f"method {method!r} drops entries at random: pass key=jax.random.key(...)")
    _check_same_targets(adapters, method)
    weights_K = np.asarray(weights, np.float64)
    if method == "cat":
        return _concatenate(adapters, weights)
    if method in FACTOR_METHODS:
        return _merge_factors(adapters, weights_K, rule, density, majority_sign_method, key)
    return _merge_svd(adapters, weights_K, rule, density, majority_sign_method, key, svd_rank, svd_clamp)


def _adapted_layers(adapter: LoraAdapter, proj: str) -> set[int]:
    if proj not in adapter.a:
        return set()
    return {int(i) for i in np.flatnonzero(np.asarray(adapter.scale[proj]))}


def _check_shapes(adapters: Sequence[LoraAdapter]) -> None:
    for proj in PROJECTIONS:
        shapes = {(ad.a[proj].shape[:2], ad.b[proj].shape[2]) for ad in adapters if proj in ad.a}
        if len(shapes) > 1:
            raise ValueError(f"adapters disagree on the shape of {proj} ([layers, in], out): {sorted(shapes)}; "
                             "were they made for different base models?")


def _check_same_targets(adapters: Sequence[LoraAdapter], method: str) -> None:
    reference = {proj: _adapted_layers(adapters[0], proj) for proj in PROJECTIONS}
    for k, adapter in enumerate(adapters[1:], 1):
        for proj in PROJECTIONS:
            here = _adapted_layers(adapter, proj)
            if here != reference[proj]:
                layer = min(here ^ reference[proj])
                has, lacks = (k, 0) if layer in here else (0, k)
                raise ValueError(
                    f"adapters target different modules: adapter {has} adapts {module_path(layer, proj)}, "
                    f"adapter {lacks} does not; method {method!r} needs identical targets "
                    "(method='exact' merges any targets)")
        if set(adapter.a) != set(adapters[0].a):
            proj = sorted(set(adapter.a) ^ set(adapters[0].a))[0]
            raise ValueError(f"adapters target different modules: only some of adapters 0 and {k} have {proj} "
                             f"factors; method {method!r} needs identical targets")


def _adapted_scale(adapters: Sequence[LoraAdapter], proj: str, xp: Any = jnp) -> Array:
    """PEFT's merged adapter has lora_alpha = r: scale 1 where any input adapter adapts the layer, else 0."""
    adapted_L = xp.any(xp.stack([xp.asarray(ad.scale[proj]) != 0 for ad in adapters if proj in ad.scale]), axis=0)
    return jnp.asarray(adapted_L, jnp.float32)


@jax.jit
def _concatenate(adapters: Sequence[LoraAdapter], weights: Sequence[float] | Array) -> LoraAdapter:
    """``cat``/``exact``: [w_1 s_1 A_1 | w_2 s_2 A_2 | ...] and [B_1; B_2; ...], so delta = sum_k w_k s_k B_k A_k."""
    weights_K = jnp.asarray(weights, jnp.float32)
    a, b, scale = {}, {}, {}
    for proj in PROJECTIONS:
        members = [k for k, ad in enumerate(adapters) if proj in ad.a]
        if not members:
            continue
        gains_L = [weights_K[k] * adapters[k].scale[proj].astype(jnp.float32) for k in members]
        a[proj] = jnp.concatenate(
            [g[:, None, None] * adapters[k].a[proj].astype(jnp.float32) for g, k in zip(gains_L, members)], axis=-1)
        b[proj] = jnp.concatenate([adapters[k].b[proj].astype(jnp.float32) for k in members], axis=1)
        scale[proj] = _adapted_scale(adapters, proj)
    return LoraAdapter(a, b, scale, adapters[0].dropout)


def _active_ranks(a_LxDxR: Array, b_LxRxF: Array) -> np.ndarray:
    """Per layer, the number of rank slots in use (``adaptive.live_slots``)."""
    return np.sum(np.asarray(live_slots(a_LxDxR, b_LxRxF)), axis=-1)


def _keep_counts(density: float | None, numel_KxL: np.ndarray) -> np.ndarray:
    """PEFT's ``int(density * numel)`` per module, in Python floats as PEFT computes it."""
    if density is None:
        return np.zeros(numel_KxL.shape, np.int32)
    return np.array([[int(density * int(n)) for n in row] for row in numel_KxL], np.int32)


def _magnitude_prune(x_LxN: Array, keep_L: Array) -> Array:
    """PEFT's ``magnitude_based_pruning`` per layer: keep the ``keep_L`` largest |entries| (ties kept too)."""
    magnitude_LxN = jnp.abs(x_LxN)
    descending_LxN = -jnp.sort(-magnitude_LxN, axis=-1)
    kth_L = jnp.take_along_axis(descending_LxN, jnp.clip(keep_L - 1, 0, x_LxN.shape[1] - 1)[:, None], axis=1)[:, 0]
    threshold_L = jnp.where(keep_L > 0, kth_L, jnp.inf)
    return jnp.where(magnitude_LxN >= threshold_L[:, None], x_LxN, 0.0)


def _combine(tensors: Sequence[Array], weights_KxL: Array, keep_KxL: Array, key: Array | None, density: Array | None,
             *, rule: str, sign_method: str) -> Array:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune, per layer (traceable).

    Args:
        tensors: K arrays of one shape [L, ...] (one factor, or one full delta, per adapter).
        weights_KxL: each adapter's weight in each layer.
        keep_KxL: entries magnitude pruning keeps per module (``_keep_counts``).
        key: PRNG key of the DARE masks.
        density: kept fraction (``_traced_density``); None prunes nothing.
    """
    num_layers = tensors[0].shape[0]
    stacked_KxLxN = jnp.stack([t.astype(jnp.float32).reshape(num_layers, -1) for t in tensors])
    pruning = density is not None
    if pruning and rule in ("ties", "magnitude_prune"):
        stacked_KxLxN = jax.vmap(_magnitude_prune)(stacked_KxLxN, keep_KxL)
    elif pruning and rule.startswith("dare"):
        kept_KxLxN = jax.random.bernoulli(key, density, stacked_KxLxN.shape)
        stacked_KxLxN = jnp.where(kept_KxLxN, stacked_KxLxN / density, 0.0)  # rescaled to keep the mean
    weighted_KxLxN = stacked_KxLxN * weights_KxL.astype(jnp.float32)[:, :, None]
    if rule in ("ties", "dare_ties"):
        # Elect a sign per entry from the pruned, *unweighted* values; average the weighted agreeing ones.
        sign_KxLxN = jnp.sign(stacked_KxLxN)
        votes_LxN = stacked_KxLxN.sum(0) if sign_method == "total" else sign_KxLxN.sum(0)
        agree_KxLxN = sign_KxLxN == jnp.where(votes_LxN >= 0, 1.0, -1.0)
        merged_LxN = jnp.sum(weighted_KxLxN * agree_KxLxN, axis=0) / jnp.maximum(agree_KxLxN.sum(0), 1)
    else:
        merged_LxN = weighted_KxLxN.sum(0)
    return merged_LxN.reshape(tensors[0].shape)


_combine_jit = jax.jit(_combine, static_argnames=("rule", "sign_method"))


def _traced_density(density: float | None) -> Array | None:
    """The density as a traced value (one compilation for all densities); None when nothing is pruned."""
    return None if density is None or density >= 1.0 else jnp.float32(density)


def _merge_factors(adapters: Sequence[LoraAdapter], weights_K: np.ndarray, rule: str, density: float | None,
                   sign_method: str, key: Array | None) -> LoraAdapter:
    """The factor methods: A's and B's combined separately with sqrt-split weights (PEFT's linear family)."""
    a, b, scale = {}, {}, {}
    options = dict(rule=rule, sign_method=sign_method)
    traced_density = _traced_density(density)
    for proj in adapters[0].a:
        ranks = [ad.a[proj].shape[-1] for ad in adapters]
        if len(set(ranks)) != 1:
            raise ValueError(f"method {rule!r} combines factors entry by entry and needs equal ranks, but {proj} "
                             f"has ranks {ranks}; use 'cat', 'svd' or 'exact'")
        scaled_KxL = weights_K[:, None] * np.stack([np.asarray(ad.scale[proj], np.float64) for ad in adapters])
        root_KxL = np.sqrt(np.abs(scaled_KxL))
        signed_root_KxL = np.where(scaled_KxL >= 0, 1.0, -1.0) * root_KxL  # the sign goes on A only
        active_KxL = np.stack([_active_ranks(ad.a[proj], ad.b[proj]) for ad in adapters])
        d_in, d_out = adapters[0].a[proj].shape[1], adapters[0].b[proj].shape[2]
        key_a = key_b = None
        if rule.startswith("dare"):
            key_a, key_b = jax.random.split(jax.random.fold_in(key, PROJECTIONS.index(proj)))
        a[proj] = _combine_jit([ad.a[proj] for ad in adapters], signed_root_KxL.astype(np.float32),
                               _keep_counts(density, active_KxL * d_in), key_a, traced_density, **options)
        b[proj] = _combine_jit([ad.b[proj] for ad in adapters], root_KxL.astype(np.float32),
                               _keep_counts(density, active_KxL * d_out), key_b, traced_density, **options)
        scale[proj] = _adapted_scale(adapters, proj, np)
    return LoraAdapter(a, b, scale, adapters[0].dropout)


@functools.partial(jax.jit, static_argnames=("rule", "sign_method"))
def _combined_delta(a_K: Sequence[Array], b_K: Sequence[Array], scale_K: Sequence[Array], weights_KxL: Array,
                    keep_KxL: Array, key: Array | None, density: Array | None, *, rule: str,
                    sign_method: str) -> Array:
    """One projection's full deltas [L, out, in], combined by ``rule``."""
    # PEFT's get_delta_weight: (B @ A) * scaling, in PEFT's [out, in] orientation.
    deltas_LxFxD = [jnp.einsum("ldr,lrf->lfd", a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST)
                    * s[:, None, None] for a, b, s in zip(a_K, b_K, scale_K)]
    return _combine(deltas_LxFxD, weights_KxL, keep_KxL, key, density, rule=rule, sign_method=sign_method)


# Alone in its program, the SVD compiles once per shape, whatever the rule, rank or clamp around it.
_svd = jax.jit(functools.partial(jnp.linalg.svd, full_matrices=False))


@functools.partial(jax.jit, static_argnames=("rank", "clamp"))
def _truncate(u_LxFxM: Array, s_LxM: Array, vh_LxMxD: Array, *, rank: int,
              clamp: float | None) -> tuple[Array, Array]:
    """PEFT's B = U[:, :r] S[:r] and A = Vh[:r], clipped at the ``clamp`` quantile; as (A [L, in, r], B [L, r, out])."""
    kept = min(rank, s_LxM.shape[-1])
    us_LxFxr = u_LxFxM[:, :, :kept] * s_LxM[:, None, :kept]
    vh_LxrxD = vh_LxMxD[:, :kept, :]
    if clamp is not None:
        num_layers = s_LxM.shape[0]
        entries = jnp.concatenate([us_LxFxr.reshape(num_layers, -1), vh_LxrxD.reshape(num_layers, -1)], axis=1)
        high_Lx1x1 = jnp.quantile(entries, clamp, axis=1)[:, None, None]
        us_LxFxr = jnp.clip(us_LxFxr, -high_Lx1x1, high_Lx1x1)
        vh_LxrxD = jnp.clip(vh_LxrxD, -high_Lx1x1, high_Lx1x1)
    pad = rank - kept  # a rank above min(in, out) gets zero slots
    a_LxDxR = jnp.pad(vh_LxrxD.transpose(0, 2, 1), ((0, 0), (0, 0), (0, pad)))
    b_LxRxF = jnp.pad(us_LxFxr.transpose(0, 2, 1), ((0, 0), (0, pad), (0, 0)))
    return a_LxDxR, b_LxRxF


def _merge_svd(adapters: Sequence[LoraAdapter], weights_K: np.ndarray, rule: str, density: float | None,
               sign_method: str, key: Array | None, svd_rank: int | None, svd_clamp: float | None) -> LoraAdapter:
    """The SVD methods: combine full deltas [out, in] by ``rule``, keep the top ``new_rank`` singular triplets."""
    new_rank = svd_rank or max(ad.a[p].shape[-1] for ad in adapters for p in ad.a)
    a, b, scale = {}, {}, {}
    for proj in adapters[0].a:
        num_layers, d_in, _ = adapters[0].a[proj].shape
        d_out = adapters[0].b[proj].shape[2]
        weights_KxL = np.broadcast_to(weights_K[:, None], (len(adapters), num_layers)).astype(np.float32)
        keep_KxL = _keep_counts(density, np.full((len(adapters), num_layers), d_in * d_out))
        sub = jax.random.fold_in(key, PROJECTIONS.index(proj)) if rule.startswith("dare") else None
        delta_LxFxD = _combined_delta(
            [ad.a[proj] for ad in adapters], [ad.b[proj] for ad in adapters], [ad.scale[proj] for ad in adapters],
            weights_KxL, keep_KxL, sub, _traced_density(density), rule=rule, sign_method=sign_method)
        a[proj], b[proj] = _truncate(*_svd(delta_LxFxD), rank=new_rank, clamp=svd_clamp)
        scale[proj] = _adapted_scale(adapters, proj, np)
    return LoraAdapter(a, b, scale, adapters[0].dropout)
