"""LoraHub (Huang et al. 2023): a gradient-free search for one merge coefficient per task LoRA.

Given a few examples of a new task, LoraHub looks for coefficients ``c`` that minimise the examples' loss of
the merged LoRA plus an L1 penalty, with nevergrad's ``NGOpt`` in the box ``[-1.5, 1.5]^K``, starting from
zero, for 40 evaluations: the settings and the objective of the original code, whose
``default_l1_regularization`` is ``0.05 * sum|c| / K``.

The search (``lorahub_search``) only sees a function of the coefficients, so it works with any loss. On a
model (``merged_loss_fn``, ``lorahub_merge``) that function is a single jitted program of the coefficient
vector: the merged adapter is built inside it, so every candidate reuses one compilation and the adapters
and base weights stay on device. The batches are padded to one shape and scanned, and the loss is the
mean NLL over all target tokens of all batches.

Two compositions are offered. ``"exact"`` (default) merges as ``merge_adapters(..., "exact")``, so the
candidate's delta-W is exactly ``sum_k c_k s_k B_k A_k``. ``"lorahub"`` is the original code's: the A's and
the B's are averaged separately, ``(sum_k c_k B_k)(sum_k c_k A_k)`` with the first LoRA's scale, which needs
equal ranks and targets and is quadratic in ``c``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import nevergrad as ng
import numpy as np

from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.merge import static
from lora_merge_jax.models import decoder, losses
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import ModelConfig

Array = jax.Array
BATCH_KEYS = ("input_ids", "attention_mask", "target_mask")
COMPOSITIONS = ("exact", "lorahub")


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One evaluation of the search: the candidate coefficients, their loss, and loss + L1 penalty."""

    weights: np.ndarray
    loss: float
    objective: float


def l1_penalty(weights: np.ndarray, l1_weight: float = 0.05) -> float:
    """LoraHub's regulariser: ``l1_weight * mean(|c|)``."""
    return float(l1_weight * np.mean(np.abs(weights)))


def lorahub_search(
    loss_fn: Callable[[np.ndarray], float],
    num_adapters: int,
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1_weight: float = 0.05,
    seed: int = 0,
    init: float = 0.0,
) -> tuple[np.ndarray, list[SearchStep]]:
    """Minimises ``loss_fn(c) + l1_weight * mean|c|`` over ``c`` in a box with nevergrad's NGOpt.

    Args:
        loss_fn: coefficients [num_adapters] -> loss (a NaN counts as +inf).
        num_adapters: number of coefficients.
        budget: number of evaluations of ``loss_fn``.
        bounds: (lower, upper) bound of every coefficient.
        l1_weight: weight of the L1 penalty (0 turns it off).
        seed: seeds the parametrization's random state, so a search is reproducible.
        init: starting value of every coefficient.

    Returns:
        (NGOpt's recommended coefficients, every evaluation in order).

    Example:
        >>> weights, history = lorahub_search(lambda c: float(np.sum((c - 0.5) ** 2)), num_adapters=3)
    """
    lower, upper = bounds
    if num_adapters < 1:
        raise ValueError(f"lorahub_search needs at least one coefficient, got num_adapters={num_adapters}")
    if budget < 1:
        raise ValueError(f"budget must be at least 1 evaluation, got {budget}")
    if not lower < upper:
        raise ValueError(f"bounds must be (lower, upper) with lower < upper, got {bounds}")
    if not lower <= init <= upper:
        raise ValueError(f"init={init} lies outside bounds {bounds}")
    parametrization = ng.p.Array(init=np.full(num_adapters, float(init)), lower=lower, upper=upper)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    history = []
    with warnings.catch_warnings():
        # NGOpt's small-budget choice runs scipy's COBYLA, which warns about its own default tolerances.
        warnings.filterwarnings("ignore", message="COBYLA")
        for _ in range(budget):
            candidate = optimizer.ask()
            weights = np.asarray(candidate.value, np.float64)
            loss = float(loss_fn(weights))
            objective = loss + l1_penalty(weights, l1_weight)
            optimizer.tell(candidate, objective if not math.isnan(objective) else math.inf)
            history.append(SearchStep(weights, loss, objective))
        best = np.asarray(optimizer.provide_recommendation().value, np.float64)
    return best, history


def compose(adapters: Sequence[LoraAdapter], coefficients: Array | Sequence[float],
            method: str = "exact") -> LoraAdapter:
    """The merged adapter of one candidate; traceable in ``coefficients``.

    Args:
        adapters: task LoRAs.
        coefficients: one per adapter.
        method: ``"exact"`` (sum of scaled deltas) or ``"lorahub"`` (the original code's sums of factors).

    Example:
        >>> merged = compose([lora_a, lora_b], jnp.array([0.7, 0.2]))
    """
    if method not in COMPOSITIONS:
        raise ValueError(f"unknown LoraHub composition {method!r}; choose among {', '.join(COMPOSITIONS)}")
    if method == "exact":
        return static.merge_adapters(adapters, coefficients, "exact")
    coefficients_K = jnp.asarray(coefficients, jnp.float32)
    first = adapters[0]
    a = {p: sum(c * ad.a[p].astype(jnp.float32) for c, ad in zip(coefficients_K, adapters)) for p in first.a}
    b = {p: sum(c * ad.b[p].astype(jnp.float32) for c, ad in zip(coefficients_K, adapters)) for p in first.b}
    return LoraAdapter(a, b, dict(first.scale), first.dropout)


def _check_composable(adapters: Sequence[LoraAdapter], method: str) -> None:
    if len(adapters) == 0:
        raise ValueError("LoraHub needs at least one adapter")
    if method not in COMPOSITIONS:
        raise ValueError(f"unknown LoraHub composition {method!r}; choose among {', '.join(COMPOSITIONS)}")
    if method == "lorahub":
        static._check_shapes(adapters)
        static._check_same_targets(adapters, method)
        for proj in adapters[0].a:
            ranks = [ad.a[proj].shape[-1] for ad in adapters]
            if len(set(ranks)) != 1:
                raise ValueError(f"composition 'lorahub' sums factors and needs equal ranks, but {proj} has ranks "
                                 f"{ranks}; use method='exact'")


def stack_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Batches of any sizes as one [N, B, T] int32 array per key, zero-padded on the right.

    Right padding has attention and target mask 0, so under causal attention it changes no real token's
    logits and adds no loss; padded rows are fully masked.
    """
    if len(batches) == 0:
        raise ValueError("LoraHub needs at least one batch of examples")
    for i, batch in enumerate(batches):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch {i} lacks {', '.join(missing)}; a batch needs {', '.join(BATCH_KEYS)}")
    shapes = [np.shape(batch["input_ids"]) for batch in batches]
    rows, length = max(s[0] for s in shapes), max(s[1] for s in shapes)
    out = {k: np.zeros((len(batches), rows, length), np.int32) for k in BATCH_KEYS}
    for i, batch in enumerate(batches):
        for k in BATCH_KEYS:
            value = np.asarray(batch[k])
            out[k][i, : value.shape[0], : value.shape[1]] = value
    return out


def merged_loss_fn(model: Any, adapters: Sequence[LoraAdapter], batches: Sequence[Mapping[str, Any]],
                   method: str = "exact") -> Callable[[np.ndarray], float]:
    """coefficients -> mean target-token NLL of the merged adapter over ``batches``, compiled once.

    Args:
        model: a loaded ``Model`` (``load_pretrained``).
        adapters: task LoRAs.
        batches: dicts of int arrays [B, T]: input_ids, attention_mask, target_mask.
        method: composition, see ``compose``.

    Example:
        >>> loss_of = merged_loss_fn(model, [lora_a, lora_b], batches)
        >>> loss_of(np.array([1.0, 0.0]))
    """
    _check_composable(adapters, method)
    host = stack_batches(batches)
    stacked = {k: jnp.asarray(v) for k, v in host.items()}
    adapters = list(adapters)
    static_args = dict(cfg=model.config, compute_dtype=model.compute_dtype, method=method,
                       max_targets=losses.most_targets(host["target_mask"]))

    def loss_fn(coefficients: np.ndarray) -> float:
        if np.shape(coefficients) != (len(adapters),):
            raise ValueError(f"expected {len(adapters)} coefficients, got shape {np.shape(coefficients)}")
        coefficients_K = jnp.asarray(coefficients, jnp.float32)
        return float(_mean_nll(coefficients_K, adapters, model.weights, stacked, **static_args))

    return loss_fn


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "method", "max_targets"))
def _mean_nll(coefficients_K: Array, adapters: list[LoraAdapter], weights: weights_lib.Weights,
              stacked: dict[str, Array], *, cfg: ModelConfig, compute_dtype: Any, method: str,
              max_targets: int) -> Array:
    """Mean target-token NLL over batches stacked [N, B, T] of the adapters merged with ``coefficients_K``
    (``max_targets``: the most target tokens of a row, where the LM head runs)."""
    deltas = compose(adapters, coefficients_K, method).deltas(cfg)

    def one_batch(totals, batch):
        hidden, _ = decoder.apply_model(cfg, weights, batch["input_ids"], deltas=deltas,
                                          attention_mask_BxS=batch["attention_mask"], compute_dtype=compute_dtype,
                                          return_hidden=True)
        nll, count = losses.target_token_nll(hidden, batch["input_ids"], batch["target_mask"], max_targets,
                                             functools.partial(decoder.lm_logits, weights))
        return (totals[0] + nll, totals[1] + count), None

    (nll, count), _ = jax.lax.scan(one_batch, (jnp.float32(0.0), jnp.float32(0.0)), stacked)
    return nll / jnp.maximum(count, 1.0)


def lorahub_merge(
    model: Any,
    adapters: Sequence[LoraAdapter],
    batches: Sequence[Mapping[str, Any]],
    *,
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    l1_weight: float = 0.05,
    seed: int = 0,
    init: float = 0.0,
    method: str = "exact",
) -> tuple[LoraAdapter, np.ndarray]:
    """LoraHub on a model: search the coefficients on ``batches``, return the merged adapter and them.

    Args:
        model: a loaded ``Model``.
        adapters: task LoRAs for ``model``.
        batches: a few examples of the new task (dicts of input_ids, attention_mask, target_mask [B, T]).
        budget, bounds, l1_weight, seed, init: as in ``lorahub_search`` (defaults: the paper's).
        method: composition, ``"exact"`` or the original ``"lorahub"`` (see ``compose``).

    Returns:
        (the merged LoraAdapter at the recommended coefficients, those coefficients [K]).

    Example:
        >>> merged, weights = lorahub_merge(model, task_loras, few_shot_batches, budget=40)
        >>> logits = forward(model, ids, adapter=merged)
    """
    loss_fn = merged_loss_fn(model, adapters, batches, method)
    weights, _ = lorahub_search(loss_fn, len(adapters), budget=budget, bounds=bounds, l1_weight=l1_weight,
                                seed=seed, init=init)
    return compose(adapters, weights, method), weights
