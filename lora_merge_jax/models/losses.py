"""The language-modelling loss on target tokens only.

A batch is a dict of int32 arrays [B, T]: ``input_ids``, ``attention_mask`` (1 = real token) and
``target_mask`` (1 = a token of the target: the summary and its EOS). Position t's logits predict token
t+1, so the loss weights are ``target_mask[:, 1:]``: prompt tokens and padding carry no loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def token_nll(logits_BxTxV: Array, input_ids_BxT: Array, target_mask_BxT: Array) -> tuple[Array, Array]:
    """(sum of negative log-likelihoods of target tokens, number of target tokens), both float32 scalars."""
    return weighted_nll(logits_BxTxV[:, :-1], input_ids_BxT[:, 1:], target_mask_BxT[:, 1:])


def weighted_nll(logits_BxMxV: Array, labels_BxM: Array, weights_BxM: Array) -> tuple[Array, Array]:
    """(sum of weighted NLLs of ``labels`` under ``logits``, sum of weights), both float32 scalars."""
    logits = logits_BxMxV.astype(jnp.float32)
    weights = weights_BxM.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels_BxM[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights), jnp.sum(weights)


def most_targets(target_mask_xT: np.ndarray) -> int:
    """The most target tokens in any row of a host ``target_mask`` [..., T] (a bound for ``target_positions``)."""
    return int(np.asarray(target_mask_xT)[..., 1:].sum(axis=-1).max(initial=0))


def target_positions(target_mask_BxT: Array, num: int) -> tuple[Array, Array]:
    """The first ``num`` positions of each row whose logits predict a target token, for a loss that needs
    the LM head only there (summaries are short next to their documents, and the LM head is wide).

    Returns:
        (positions_BxM: every t with ``target_mask[t + 1] = 1`` in order, then other positions to fill
        ``num``; weights_BxM: 1 on the target positions, 0 on the fill). Target positions past the first
        ``num`` of a row are left out, so ``num`` must bound every row's count.
    """
    weights_BxT1 = target_mask_BxT[:, 1:].astype(jnp.int32)
    # A stable sort on "is not a target" puts a row's target positions first, in their order.
    positions_BxM = jnp.argsort(weights_BxT1 == 0, axis=1, stable=True)[:, :num]
    return positions_BxM, jnp.take_along_axis(weights_BxT1, positions_BxM, axis=1)


def target_token_nll(hidden_BxTxD: Array, input_ids_BxT: Array, target_mask_BxT: Array, max_targets: int,
                     logits_fn: Callable[[Array], Array]) -> tuple[Array, Array]:
    """``token_nll`` with ``logits_fn`` (the LM head, [B, M, D] -> [B, M, V]) applied to the positions that
    predict target tokens only; ``max_targets`` must bound every row's count (``target_positions``)."""
    num = min(max_targets, input_ids_BxT.shape[1] - 1)
    positions_BxM, weights_BxM = target_positions(target_mask_BxT, num)
    hidden_BxMxD = jnp.take_along_axis(hidden_BxTxD, positions_BxM[..., None], axis=1)
    labels_BxM = jnp.take_along_axis(input_ids_BxT[:, 1:], positions_BxM, axis=1)
    return weighted_nll(logits_fn(hidden_BxMxD), labels_BxM, weights_BxM)


def mean_token_nll(logits_BxTxV: Array, input_ids_BxT: Array, target_mask_BxT: Array) -> Array:
    """Mean NLL per target token (0 when the batch has none)."""
    total, count = token_nll(logits_BxTxV, input_ids_BxT, target_mask_BxT)
    return total / jnp.maximum(count, 1.0)
