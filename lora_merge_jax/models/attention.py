"""Grouped-query attention with a memory-lean gradient, and causal query chunking.

Shapes: B batch, T query length, S key length, H heads, K kv heads, G = H/K, Hd head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _masked_logits(q_BxTxKxGxHd: Array, k_BxSxKxHd: Array, mask_BxTxS: Array) -> Array:
    logits = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxHd, k_BxSxKxHd, preferred_element_type=jnp.float32)
    logits = logits * (q_BxTxKxGxHd.shape[-1] ** -0.5)
    # A large finite negative rather than -inf: a fully masked row (left padding) stays finite.
    return jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _grouped_attention(q_BxTxKxGxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array) -> Array:
    probs = jax.nn.softmax(_masked_logits(q_BxTxKxGxHd, k_BxSxKxHd, mask_BxTxS), axis=-1).astype(v_BxSxKxHd.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxHd)


def _grouped_attention_fwd(q, k, v, mask_BxTxS):
    # The softmax as jax.nn.softmax computes it, keeping its [T]-sized statistics as the residuals instead of
    # the [T, S] probabilities: for every layer of a long sequence those would be the step's largest buffers,
    # and recomputing them costs one q.k product.
    logits = _masked_logits(q, k, mask_BxTxS)
    max_BxKxGxT = jnp.max(logits, axis=-1)
    unnormalized = jnp.exp(logits - max_BxKxGxT[..., None])
    sum_BxKxGxT = jnp.sum(unnormalized, axis=-1)
    probs = (unnormalized / sum_BxKxGxT[..., None]).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out, (q, k, v, mask_BxTxS, max_BxKxGxT, sum_BxKxGxT)


def _grouped_attention_bwd(residuals, d_out):
    q, k, v, mask_BxTxS, max_BxKxGxT, sum_BxKxGxT = residuals
    logits = _masked_logits(q, k, mask_BxTxS)
    probs = jnp.exp(logits - max_BxKxGxT[..., None]) / sum_BxKxGxT[..., None]
    d_probs = jnp.einsum("btkgh,bskh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    # The softmax's vector-Jacobian product in the order autodiff of jax.nn.softmax computes it, so that the
    # two round alike.
    weighted = probs * d_probs
    d_logits = (weighted - probs * jnp.sum(weighted, axis=-1, keepdims=True)) * q.shape[-1] ** -0.5
    # Masked entries get no gradient (as through jnp.where), which matters for fully masked rows.
    d_logits = jnp.where(mask_BxTxS[:, None, None], d_logits, 0.0).astype(q.dtype)
    d_q = jnp.einsum("bkgts,bskh->btkgh", d_logits, k)
    d_k = jnp.einsum("bkgts,btkgh->bskh", d_logits, q)
    d_v = jnp.einsum("bkgts,btkgh->bskh", probs.astype(v.dtype), d_out)
    return d_q, d_k, d_v, None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def attention(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
               causal_square: bool) -> Array:
    """Grouped-query attention (with the memory-lean gradient above).

    ``causal_square``: query t never sees a key after slot t (S == T, no cache). Then the queries go in
    chunks, each against the keys up to its last query only, which skips most of the masked upper triangle:
    (C + 1) / 2C of the [T, S] work for C chunks; up to 8 chunks of at least 64 queries.
    """
    b, t, h, hd = q_BxTxHxHd.shape
    kv = k_BxSxKxHd.shape[2]
    q_BxTxKxGxHd = q_BxTxHxHd.reshape(b, t, kv, h // kv, hd)
    chunk = max(64, -(-t // 8))
    if not causal_square or t <= chunk:
        out = _grouped_attention(q_BxTxKxGxHd, k_BxSxKxHd, v_BxSxKxHd, mask_BxTxS)
    else:
        out = jnp.concatenate([
            _grouped_attention(q_BxTxKxGxHd[:, lo:lo + chunk], k_BxSxKxHd[:, :lo + chunk],
                               v_BxSxKxHd[:, :lo + chunk], mask_BxTxS[:, lo:lo + chunk, :lo + chunk])
            for lo in range(0, t, chunk)], axis=1)
    return out.reshape(b, t, h * hd)


