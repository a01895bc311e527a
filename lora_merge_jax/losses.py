"""The language-modelling loss on target tokens only.

A batch is a dict of int32 arrays [B, T]: ``input_ids``, ``attention_mask`` (1 = real token) and
``target_mask`` (1 = a token of the target: the summary and its EOS). Position t's logits predict token
t+1, so the loss weights are ``target_mask[:, 1:]``: prompt tokens and padding carry no loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_nll(logits_BxTxV: Array, input_ids_BxT: Array, target_mask_BxT: Array) -> tuple[Array, Array]:
    """(sum of negative log-likelihoods of target tokens, number of target tokens), both float32 scalars."""
    logits = logits_BxTxV[:, :-1].astype(jnp.float32)
    labels_BxT1 = input_ids_BxT[:, 1:]
    weights_BxT1 = target_mask_BxT[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels_BxT1[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights_BxT1), jnp.sum(weights_BxT1)


def mean_token_nll(logits_BxTxV: Array, input_ids_BxT: Array, target_mask_BxT: Array) -> Array:
    """Mean NLL per target token (0 when the batch has none)."""
    total, count = token_nll(logits_BxTxV, input_ids_BxT, target_mask_BxT)
    return total / jnp.maximum(count, 1.0)
