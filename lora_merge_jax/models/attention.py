"""Grouped-query attention: a fused kernel on GPUs, and on other backends a memory-lean gradient with causal
query chunking.

On a GPU with bfloat16/float16 activations, attention goes through ``jax.nn.dot_product_attention`` with
cuDNN's flash attention (``fused_attention``), which never forms the [T, S] probabilities. Elsewhere (the CPU,
float32 on a GPU, TPUs) it runs the kernel below: XLA's einsums with a custom VJP that keeps the softmax
statistics rather than the probabilities. Both take the same full boolean mask, so padding on either side,
sliding windows and packed segments mean the same thing on every backend.

Shapes: B batch, T query length, S key length, H heads, K kv heads, G = H/K, Hd head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lora_merge_jax.models import products

Array = jax.Array


def _head_major(x_BxTxKxGxHd: Array) -> Array:
    """[B, T, K, G, Hd] -> [B, K, T*G, Hd]: the G query heads that share a kv head, with their tokens, are the
    rows of one matrix, so that a causal chunk of queries is a contiguous block of rows."""
    b, t, kv, g, hd = x_BxTxKxGxHd.shape
    return x_BxTxKxGxHd.transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, hd)


def _token_major(x_BxKxMxHd: Array, g: int) -> Array:
    """[B, K, T*G, Hd] -> [B, T, K*G*Hd] (the inverse of ``_head_major``, flattened for the o projection)."""
    b, kv, m, hd = x_BxKxMxHd.shape
    return x_BxKxMxHd.reshape(b, kv, m // g, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, m // g, kv * g * hd)


def _chunks(t: int, s: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, end key) of each chunk. ``causal``: the T queries sit at the last T of the S
    key slots, and each sees no key after its own slot (S == T without a cache; a cache's earlier slots are
    a prefix all of them see). Then queries go in chunks of C, each against the keys up to its last query
    only, which skips most of the masked upper triangle: (C + 1) / 2C of the [T, T] work for C chunks; up to
    8 chunks of at least 64 queries. Else one chunk over every key."""
    chunk = max(64, -(-t // 8))
    if not causal or t <= chunk:
        return [(0, t, s)]
    return [(lo, min(lo + chunk, t), s - t + min(lo + chunk, t)) for lo in range(0, t, chunk)]


def _chunk_logits(q_BxKxMxHd: Array, k_BxKxSxHd: Array, mask_BxTxS: Array, g: int,
                  keys_last: bool = False) -> tuple[Array, Array]:
    """Scaled, masked float32 logits [B, K, M, S] of one chunk (M = its queries x G), and the mask broadcast to
    them [B, 1, M, S]. ``keys_last``: the keys come as [B, K, Hd, S]."""
    b, _, m, hd = q_BxKxMxHd.shape
    t, s = mask_BxTxS.shape[1:]
    logits = jnp.einsum("bkmh,bkhs->bkms" if keys_last else "bkmh,bksh->bkms", q_BxKxMxHd, k_BxKxSxHd,
                        preferred_element_type=jnp.float32)
    logits = logits * (hd ** -0.5)
    mask_Bx1xMxS = jnp.broadcast_to(mask_BxTxS[:, None, :, None, :], (b, 1, t, g, s)).reshape(b, 1, m, s)
    # A large finite negative rather than -inf: a fully masked row (left padding) stays finite.
    return jnp.where(mask_Bx1xMxS, logits, jnp.finfo(jnp.float32).min), mask_Bx1xMxS


def attention_forward(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
                      causal: bool) -> tuple[Array, tuple[Array, Array]]:
    """The CPU kernel's forward: (output [B, T, H*Hd], softmax statistics (row max, row sum) [B, K, T*G]).

    The softmax as ``jax.nn.softmax`` computes it; the statistics are what the backward keeps instead of the
    [T, S] probabilities (for every layer of a long sequence those would be the step's largest buffers, and
    recomputing them costs one q.k product).
    """
    b, t, h, hd = q_BxTxHxHd.shape
    s, kv = k_BxSxKxHd.shape[1:3]
    g = h // kv
    q_hm = _head_major(q_BxTxHxHd.reshape(b, t, kv, g, hd))
    k_hm, v_hm = k_BxSxKxHd.transpose(0, 2, 1, 3), v_BxSxKxHd.transpose(0, 2, 1, 3)
    outs, maxes, sums = [], [], []
    for lo, hi, s_hi in _chunks(t, s, causal):
        out, max_BxKxM, sum_BxKxM = _attend(q_hm[:, :, lo * g:hi * g], k_hm[:, :, :s_hi], v_hm[:, :, :s_hi],
                                            mask_BxTxS[:, lo:hi, :s_hi], g)
        outs.append(out)
        maxes.append(max_BxKxM)
        sums.append(sum_BxKxM)
    cat = (lambda xs: xs[0]) if len(outs) == 1 else (lambda xs: jnp.concatenate(xs, axis=2))  # noqa: E731
    return _token_major(cat(outs), g), (cat(maxes), cat(sums))


def _attend(q_BxKxMxHd: Array, k_BxKxSxHd: Array, v_BxKxSxHd: Array, mask_BxTxS: Array, g: int,
            keys_last: bool = False) -> tuple[Array, Array, Array]:
    """One chunk, head-major: (output [B, K, M, Hd], row max, row sum [B, K, M]). ``keys_last``: the keys come
    as [B, K, Hd, S]."""
    logits, _ = _chunk_logits(q_BxKxMxHd, k_BxKxSxHd, mask_BxTxS, g, keys_last)
    max_BxKxM = jnp.max(logits, axis=-1)
    unnormalized = jnp.exp(logits - max_BxKxM[..., None])
    sum_BxKxM = jnp.sum(unnormalized, axis=-1)
    probs = (unnormalized / sum_BxKxM[..., None]).astype(v_BxKxSxHd.dtype)
    return products.einsum("bkms,bksh->bkmh", probs, v_BxKxSxHd), max_BxKxM, sum_BxKxM


def attention_head_major(q_BxTxHxHd: Array, k_BxKxHdxS: Array, v_BxKxSxHd: Array, mask_BxTxS: Array) -> Array:
    """The CPU kernel's forward ([B, T, H*Hd]) for the decode loop's per-layer caches: keys [B, K, Hd, S] and
    values [B, K, S, Hd], read in place rather than transposed into a copy in every layer (a third of a
    SmolLM2 step's time at 288 slots). Keys with the slots last make the few-query logits product of a decode
    step 1.4x faster on XLA:CPU than [B, K, S, Hd] keys (30 layers of SmolLM2's cache, 16 rows)."""
    b, t, h, hd = q_BxTxHxHd.shape
    g = h // k_BxKxHdxS.shape[1]
    q_hm = _head_major(q_BxTxHxHd.reshape(b, t, h // g, g, hd))
    return _token_major(_attend(q_hm, k_BxKxHdxS, v_BxKxSxHd, mask_BxTxS, g, keys_last=True)[0], g)


def attention_backward(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
                       out_BxTxHHd: Array, stats: tuple[Array, Array], d_out_BxTxHHd: Array,
                       causal: bool) -> tuple[Array, Array, Array]:
    """The CPU kernel's vector-Jacobian product: (dq [B, T, H, Hd], dk, dv [B, S, K, Hd]), from the forward's
    inputs, output and statistics; the probabilities are recomputed chunk by chunk."""
    b, t, h, hd = q_BxTxHxHd.shape
    s, kv = k_BxSxKxHd.shape[1:3]
    g = h // kv
    max_BxKxM, sum_BxKxM = stats
    q_hm = _head_major(q_BxTxHxHd.reshape(b, t, kv, g, hd))
    k_hm, v_hm = k_BxSxKxHd.transpose(0, 2, 1, 3), v_BxSxKxHd.transpose(0, 2, 1, 3)
    d_out_hm = _head_major(d_out_BxTxHHd.reshape(b, t, kv, g, hd))
    # sum_s p_s dp_s of the softmax's VJP is sum_h d_out_h out_h (dp = d_out . v and out = p . v): a [T]
    # reduction of the [T, Hd] output instead of one over the [T, S] probabilities.
    d_out32 = d_out_BxTxHHd.astype(jnp.float32).reshape(b, t, kv, g, hd)
    out32 = out_BxTxHHd.astype(jnp.float32).reshape(b, t, kv, g, hd)
    dot_BxKxM = jnp.sum(d_out32 * out32, axis=-1).transpose(0, 2, 1, 3).reshape(b, kv, t * g)
    d_qs, d_ks, d_vs = [], [], []
    for lo, hi, s_hi in _chunks(t, s, causal):
        rows = slice(lo * g, hi * g)
        q_c, k_c, v_c, d_out_c = q_hm[:, :, rows], k_hm[:, :, :s_hi], v_hm[:, :, :s_hi], d_out_hm[:, :, rows]
        logits, mask_Bx1xMxS = _chunk_logits(q_c, k_c, mask_BxTxS[:, lo:hi, :s_hi], g)
        probs = jnp.exp(logits - max_BxKxM[:, :, rows, None]) / sum_BxKxM[:, :, rows, None]
        d_probs = jnp.einsum("bkmh,bksh->bkms", d_out_c, v_c, preferred_element_type=jnp.float32)
        d_logits = probs * (d_probs - dot_BxKxM[:, :, rows, None]) * hd ** -0.5
        # Masked entries get no gradient (as through jnp.where), which matters for fully masked rows.
        d_logits = jnp.where(mask_Bx1xMxS, d_logits, 0.0).astype(q_hm.dtype)
        # Each chunk's gradients stay float32 until the chunks are summed (cast once, at the end).
        d_qs.append(jnp.einsum("bkms,bksh->bkmh", d_logits, k_c, preferred_element_type=jnp.float32))
        pad = ((0, 0, 0), (0, 0, 0), (0, s - s_hi, 0), (0, 0, 0))
        d_ks.append(jax.lax.pad(jnp.einsum("bkms,bkmh->bksh", d_logits, q_c, preferred_element_type=jnp.float32),
                                0.0, pad))
        d_vs.append(jax.lax.pad(jnp.einsum("bkms,bkmh->bksh", probs.astype(v_hm.dtype), d_out_c,
                                           preferred_element_type=jnp.float32), 0.0, pad))
    d_q_hm = d_qs[0] if len(d_qs) == 1 else jnp.concatenate(d_qs, axis=2)
    d_q = _token_major(d_q_hm, g).reshape(b, t, h, hd).astype(q_BxTxHxHd.dtype)
    d_k = sum(d_ks[1:], d_ks[0]).transpose(0, 2, 1, 3).astype(k_BxSxKxHd.dtype)
    return d_q, d_k, sum(d_vs[1:], d_vs[0]).transpose(0, 2, 1, 3).astype(v_BxSxKxHd.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
                       causal: bool) -> Array:
    return attention_forward(q_BxTxHxHd, k_BxSxKxHd, v_BxSxKxHd, mask_BxTxS, causal)[0]


def _grouped_attention_fwd(q, k, v, mask_BxTxS, causal):
    out, stats = attention_forward(q, k, v, mask_BxTxS, causal)
    return out, (q, k, v, mask_BxTxS, out, stats)


def _grouped_attention_bwd(causal, residuals, d_out):
    q, k, v, mask_BxTxS, out, stats = residuals
    return (*attention_backward(q, k, v, mask_BxTxS, out, stats, d_out, causal), None)


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def fused_attention(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
                    causal: bool, implementation: str | None = "cudnn") -> Array:
    """Attention through ``jax.nn.dot_product_attention`` ([B, T, H*Hd]); ``implementation="cudnn"`` is the
    GPU path, ``"xla"`` the same call on any backend (which the tests compare with ``attention``).

    The mask goes in as given (cuDNN turns it into a bias); ``causal`` with S == T also tells the kernel the
    mask is causal, so that cuDNN skips the upper triangle.
    """
    b, t, h, hd = q_BxTxHxHd.shape
    out = jax.nn.dot_product_attention(q_BxTxHxHd, k_BxSxKxHd, v_BxSxKxHd, mask=mask_BxTxS[:, None],
                                       is_causal=causal and t == k_BxSxKxHd.shape[1],
                                       implementation=implementation)
    return out.reshape(b, t, h * hd)


def uses_fused_kernel(dtype) -> bool:
    """Whether ``attention`` takes cuDNN's fused kernel: on a GPU, for 16-bit activations (cuDNN's dtypes)."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def attention(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
              causal: bool) -> Array:
    """Grouped-query attention: cuDNN's fused kernel where ``uses_fused_kernel``, else the kernel above.

    ``causal``: the T queries sit at the last T of the S key slots and none sees a key after its own slot
    (S == T without a cache). Then the queries go in chunks, each against the keys up to its last query only,
    which skips most of the masked upper triangle (``_chunks``).
    """
    if uses_fused_kernel(q_BxTxHxHd.dtype):
        return fused_attention(q_BxTxHxHd, k_BxSxKxHd, v_BxSxKxHd, mask_BxTxS, causal)
    return _grouped_attention(q_BxTxHxHd, k_BxSxKxHd, v_BxSxKxHd, mask_BxTxS, causal)
