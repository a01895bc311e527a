"""The Llama-family decoder as pure functions over a weights pytree.

Design: the frozen base weights are a registered dataclass of arrays with every layer stacked along a
leading [L] axis, and the transformer is one ``jax.lax.scan`` over that axis, so compile time does not grow
with depth. Adapters are *not* inside the weights: ``apply_model`` takes them as a separate pytree of
per-projection deltas (``adapters/deltas.py``) scanned alongside the layers, which is what lets training
differentiate the adapter tree alone. Each weight is described once (shape + logical axes) in
``describe``; abstract shapes, shardings, loading and random init are all derived from that description.

Shapes use suffixes: B batch, T query length, S key length, D hidden, H heads, K kv heads, G = H/K,
Hd head dim, F ffw, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from lora_merge_jax import sharding
from lora_merge_jax.adapters.deltas import Delta, tokens_first
from lora_merge_jax.model_config import PROJECTIONS, ModelConfig

Array = jax.Array


@struct.dataclass
class LayerWeights:
    """One transformer block's weights, stacked over layers: every leaf has a leading [L] axis."""

    attn_norm_LxD: Array
    mlp_norm_LxD: Array
    proj: dict[str, Array]  # projection name -> [L, in, out] (transformers stores [out, in])
    bias: dict[str, Array]  # projection name -> [L, out], only for biased projections


@struct.dataclass
class Weights:
    """The frozen base model."""

    embed_VxD: Array
    layers: LayerWeights
    final_norm_D: Array
    lm_head_DxV: Array | None  # None when the embeddings are tied


@struct.dataclass
class KVCache:
    """Key/value cache for generation, slot-indexed: slot s of row b holds the token at column s."""

    k_LxBxSxKxHd: Array
    v_LxBxSxKxHd: Array


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Description of one weight: its shape and the logical axis of each dimension."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


PROJ_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "ffw"),
    "up_proj": ("embed", "ffw"),
    "down_proj": ("ffw", "embed"),
}


def describe(cfg: ModelConfig) -> Weights:
    """The single description of every base weight, as a Weights tree of ParamSpec."""
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    layers = LayerWeights(
        attn_norm_LxD=ParamSpec((L, D), ("layers", None)),
        mlp_norm_LxD=ParamSpec((L, D), ("layers", None)),
        proj={p: ParamSpec((L, *cfg.projection_shape(p)), ("layers", *PROJ_AXES[p])) for p in PROJECTIONS},
        bias={
            p: ParamSpec((L, cfg.projection_shape(p)[1]), ("layers", PROJ_AXES[p][1]))
            for p in cfg.biased_projections
        },
    )
    return Weights(
        embed_VxD=ParamSpec((V, D), ("vocab", "embed")),
        layers=layers,
        final_norm_D=ParamSpec((D,), (None,)),
        lm_head_DxV=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab")),
    )


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract(cfg: ModelConfig, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> Weights:
    """ShapeDtypeStructs of the weights (with shardings when a mesh is given); nothing is allocated."""

    def one(spec: ParamSpec) -> jax.ShapeDtypeStruct:
        shard = sharding.named_sharding(mesh, spec.axes) if mesh is not None else None
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=shard)

    return jax.tree.map(one, describe(cfg), is_leaf=_is_spec)


def shardings(cfg: ModelConfig, mesh: Mesh) -> Weights:
    """The NamedSharding of every weight on ``mesh``; checks the mesh divides every dimension."""

    def one(path: Any, spec: ParamSpec) -> jax.sharding.NamedSharding:
        sharding.check_divisible(mesh, jax.tree_util.keystr(path), spec.shape, spec.axes)
        return sharding.named_sharding(mesh, spec.axes)

    return jax.tree_util.tree_map_with_path(one, describe(cfg), is_leaf=_is_spec)


def init_random(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                std: float = 0.02) -> Weights:
    """Random weights (normal(0, std), norms at 1), built directly in their shardings.

    Used for tiny test models and pretraining from scratch; real models come from ``load_pretrained``.
    """
    specs = describe(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

    def build(key: Array) -> Weights:
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, spec in zip(keys, leaves):
            if spec.axes[-1] is None:  # norm scales start at one
                out.append(jnp.ones(spec.shape, dtype))
            else:
                out.append((std * jax.random.normal(k, spec.shape)).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    out_shardings = shardings(cfg, mesh) if mesh is not None else None
    return jax.jit(build, out_shardings=out_shardings)(key)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Pins an activation to its logical ``axes`` when a mesh is set (``jax.set_mesh``); else a no-op.

    Without it XLA's partitioner is free to meet a batch-sharded activation and an fsdp-sharded weight by
    gathering the activations of the whole global batch onto every device (it does so at the LM head: the
    float32 logits of every sequence on every device) instead of gathering the weight.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return x
    axes = tuple(a if a is None or d % sharding.mesh_axis_size(mesh, a) == 0 else None for d, a in zip(x.shape, axes))
    return jax.lax.with_sharding_constraint(x, sharding.logical_to_spec(axes))


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


def _attention(q_BxTxHxHd: Array, k_BxSxKxHd: Array, v_BxSxKxHd: Array, mask_BxTxS: Array,
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
        attn_BxTxHHd = _attention(q, k, v, mask_BxTxS, causal_square=cache_kv is None)
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


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> KVCache:
    """An empty cache of ``length`` slots."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
