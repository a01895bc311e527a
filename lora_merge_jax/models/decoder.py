"""The Llama-family decoder as pure functions over a weights pytree.

Design: the frozen base weights (``weights.py``) stack every layer along a leading [L] axis, and the
transformer is one ``jax.lax.scan`` over that axis, so compile time does not grow with depth. Adapters are
*not* inside the weights: ``apply_model`` takes them as a separate pytree of per-projection deltas
(``deltas.py``) scanned alongside the layers, which is what lets training differentiate the adapter tree
alone.

Shapes use suffixes: B batch, T query length, S key length, D hidden, H heads, K kv heads, Hd head dim,
F ffw, V vocab, L layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_merge_jax import sharding
from lora_merge_jax.models.attention import attention
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig
from lora_merge_jax.models.deltas import Delta, tokens_first
from lora_merge_jax.models.weights import KVCache, LayerWeights, Weights

Array = jax.Array


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Pins an activation to its logical ``axes`` when a mesh is set (``jax.set_mesh``); else a no-op.

    Without it XLA's partitioner is free to meet a batch-sharded activation and an fsdp-sharded weight by
    gathering the activations of the whole global batch onto every device (it does so at the LM head: the
    float32 logits of every sequence on every device) instead of gathering the weight.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, sharding.logical_to_spec(sharding.fit_axes(mesh, x.shape, axes)))


def _rms_norm(x_BxTxD: Array, w_D: Array, eps: float) -> Array:
    # As transformers: normalise in float32, cast back, then scale by the weight.
    x32 = x_BxTxD.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x_BxTxD.dtype)
    return w_D.astype(x_BxTxD.dtype) * normed


def _rope(x_BxTxNxHd: Array, positions_BxT: Array, inv_freq: np.ndarray) -> Array:
    freqs_BxTxHd2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_BxTxHd2, freqs_BxTxHd2], axis=-1)
    cos, sin = jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]
    cos, sin = cos.astype(x_BxTxNxHd.dtype), sin.astype(x_BxTxNxHd.dtype)
    half = x_BxTxNxHd.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxHd[..., half:], x_BxTxNxHd[..., :half]], axis=-1)
    return x_BxTxNxHd * cos + rotated * sin


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _project(name: str, x_BxTxD: Array, w: LayerWeights, deltas: dict[str, Delta], dropout: float,
             rng: Array | None) -> Array:
    x_NxD = tokens_first(x_BxTxD)
    y = jnp.einsum("nd,df->nf", x_NxD, w.proj[name].astype(x_BxTxD.dtype)).reshape(*x_BxTxD.shape[:-1], -1)
    if name in w.bias:
        y = y + w.bias[name].astype(y.dtype)
    if name in deltas:
        sub = None if rng is None else jax.random.fold_in(rng, PROJECTIONS.index(name))
        y = y + deltas[name].apply(x_BxTxD, dropout, sub).astype(y.dtype)
    return y


def apply_model(
    cfg: ModelConfig,
    weights: Weights,
    input_ids_BxT: Array,
    *,
    deltas: dict[str, Delta] | None = None,
    dropout: float = 0.0,
    dropout_rng: Array | None = None,
    attention_mask_BxS: Array | None = None,
    positions_BxT: Array | None = None,
    cache: KVCache | None = None,
    cache_index: Array | int = 0,
    compute_dtype: Any = None,
    remat: bool = False,
    return_hidden: bool = False,
) -> tuple[Array, KVCache | None]:
    """The transformer: token ids -> float32 logits [B, T, V] (and the updated cache, when one is given).

    Args:
        cfg: architecture.
        weights: frozen base weights (any dtype; cast to ``compute_dtype``).
        input_ids_BxT: token ids.
        deltas: per-projection adapter updates with a leading [L] axis (``adapter.deltas(cfg)``), or None.
        dropout: adapter-input dropout rate, used only when ``dropout_rng`` is given.
        attention_mask_BxS: 1 for real tokens, 0 for padding. Without a cache S == T; with a cache S is the
            cache length and the mask covers every slot.
        positions_BxT: rotary positions (default: slot index). Left-padded generation passes cumsum(mask)-1.
        cache: key/value cache; the new keys/values are written at slots [cache_index, cache_index + T).
        cache_index: first slot the current tokens occupy.
        compute_dtype: dtype of activations (default: the weights' dtype). Logits are float32.
        remat: recompute each layer's activations in the backward pass instead of storing them.
        return_hidden: return the final normed hidden states [B, T, D] instead of logits.
    """
    b, t = input_ids_BxT.shape
    dtype = compute_dtype or weights.embed_VxD.dtype
    deltas = deltas or {}
    slots_T = cache_index + jnp.arange(t)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(slots_T, (b, t))
    if cache is None:
        s = t
        key_slots_S = slots_T
    else:
        s = cache.k_LxBxSxKxHd.shape[2]
        key_slots_S = jnp.arange(s)
    valid_BxS = jnp.ones((b, s), bool) if attention_mask_BxS is None else attention_mask_BxS.astype(bool)
    causal_TxS = key_slots_S[None, :] <= slots_T[:, None]
    base_mask_BxTxS = causal_TxS[None] & valid_BxS[:, None, :]
    windows_L = jnp.asarray(cfg.sliding_windows or (0,) * cfg.num_hidden_layers, jnp.int32)

    x_BxTxD = weights.embed_VxD.astype(dtype)[input_ids_BxT]
    inv_freq = cfg.inv_freq()
    act = _ACTIVATIONS[cfg.hidden_act]
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)

    def block(carry, layer):
        x_BxTxD, cache_kv = carry
        w, layer_deltas, window, rng, layer_index = layer
        x_BxTxD = _constrain(x_BxTxD, ("batch", None, None))
        distance_TxS = slots_T[:, None] - key_slots_S[None, :]
        in_window_TxS = (window == 0) | (distance_TxS < window)
        mask_BxTxS = base_mask_BxTxS & in_window_TxS[None]

        y = _rms_norm(x_BxTxD, w.attn_norm_LxD, cfg.rms_norm_eps)
        q = _project("q_proj", y, w, layer_deltas, dropout, rng).reshape(b, t, h, hd)
        k = _project("k_proj", y, w, layer_deltas, dropout, rng).reshape(b, t, kv, hd)
        v = _project("v_proj", y, w, layer_deltas, dropout, rng).reshape(b, t, kv, hd)
        q, k = _rope(q, positions_BxT, inv_freq), _rope(k, positions_BxT, inv_freq)
        if cache_kv is not None:
            # The whole [L, B, S, K, Hd] cache is the scan's carry, written in place at this layer's
            # slots; passing per-layer slices as xs/ys instead copies the full cache several times a step.
            k_cache, v_cache = cache_kv
            start = (layer_index, 0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], start)
            cache_kv = (k_cache, v_cache)
            k = jax.lax.dynamic_index_in_dim(k_cache, layer_index, 0, keepdims=False).astype(dtype)
            v = jax.lax.dynamic_index_in_dim(v_cache, layer_index, 0, keepdims=False).astype(dtype)
        attn_BxTxHHd = attention(q, k, v, mask_BxTxS, causal_square=cache_kv is None)
        x_BxTxD = x_BxTxD + _project("o_proj", attn_BxTxHHd, w, layer_deltas, dropout, rng)

        y = _rms_norm(x_BxTxD, w.mlp_norm_LxD, cfg.rms_norm_eps)
        gate = act(_project("gate_proj", y, w, layer_deltas, dropout, rng))
        up = _project("up_proj", y, w, layer_deltas, dropout, rng)
        x_BxTxD = x_BxTxD + _project("down_proj", gate * up, w, layer_deltas, dropout, rng)
        return (x_BxTxD, cache_kv), None

    if remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    cache_kv = None if cache is None else (cache.k_LxBxSxKxHd, cache.v_LxBxSxKxHd)
    layer_ids_L = jnp.arange(cfg.num_hidden_layers)
    with jax.named_scope("layers"):
        (x_BxTxD, new_kv), _ = jax.lax.scan(block, (x_BxTxD, cache_kv),
                                            (weights.layers, deltas, windows_L, layer_rngs, layer_ids_L))
    x_BxTxD = _constrain(_rms_norm(x_BxTxD, weights.final_norm_D, cfg.rms_norm_eps), ("batch", None, None))
    new_cache = None if cache is None else KVCache(*new_kv)
    if return_hidden:
        return x_BxTxD, new_cache
    return lm_logits(weights, x_BxTxD), new_cache


def lm_logits(weights: Weights, x_BxTxD: Array) -> Array:
    """Float32 logits from final hidden states, through the tied embeddings or the lm head."""
    if weights.lm_head_DxV is None:
        logits = jnp.einsum("btd,vd->btv", x_BxTxD, weights.embed_VxD.astype(x_BxTxD.dtype),
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("btd,dv->btv", x_BxTxD, weights.lm_head_DxV.astype(x_BxTxD.dtype),
                            preferred_element_type=jnp.float32)
    return _constrain(logits, ("batch", None, "vocab"))
