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

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from lora_merge_jax import sharding
from lora_merge_jax.models import bits, products
from lora_merge_jax.models.attention import (
    attention,
    attention_backward,
    attention_forward,
    attention_head_major,
    uses_fused_kernel,
)
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig
from lora_merge_jax.models.deltas import Delta, _dropout, tokens_first
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


def _rope_tables(positions_BxT: Array, inv_freq: np.ndarray, dtype: Any) -> tuple[Array, Array]:
    """cos and sin [B, T, 1, Hd] of the rotary positions, in ``dtype`` (the same for every layer)."""
    freqs_BxTxHd2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs_BxTxHd2, freqs_BxTxHd2], axis=-1)
    return jnp.cos(emb)[:, :, None, :].astype(dtype), jnp.sin(emb)[:, :, None, :].astype(dtype)


def _rope(x_BxTxNxHd: Array, cos: Array, sin: Array) -> Array:
    # In float32, rounded once: XLA's CPU backend rounds every bfloat16 operation back to bfloat16, each a
    # pass of its own (and so does its transpose in the backward).
    x32 = x_BxTxNxHd.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos.astype(jnp.float32) + rotated * sin.astype(jnp.float32)).astype(x_BxTxNxHd.dtype)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _gated(act: str, gate: Array, up: Array) -> Array:
    """act(gate) * up, in float32 and rounded once (as ``_rope``)."""
    return (_ACTIVATIONS[act](gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _adapter_input(name: str, x_BxTxD: Array, dropout: float, rng: Array | None) -> Array:
    """What projection ``name``'s adapter sees: its input after dropout (a mask drawn from the layer's key
    folded with the projection's index, so that the backward draws it again)."""
    sub = None if rng is None else jax.random.fold_in(rng, PROJECTIONS.index(name))
    return _dropout(x_BxTxD, dropout, sub)


def _joined_name(names: tuple[str, ...]) -> str:
    """The key under which ``unstack_layers`` keeps a group of projections' weights side by side."""
    return "+".join(names)


def _joined_widths(spec: _LayerSpec, names: tuple[str, ...], joined_DxF: Array) -> tuple[int, ...]:
    """The projections' widths in a weight ``unstack_layers`` joined: q, k, v by heads, or gate and up halves."""
    if names == _QKV:
        widths = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.kv_heads * spec.head_dim)
    else:
        widths = (joined_DxF.shape[-1] // 2,) * 2
    assert sum(widths) == joined_DxF.shape[-1], (names, widths, joined_DxF.shape)
    return widths


def _group_weight(names: tuple[str, ...], w: LayerWeights, deltas: dict[str, Delta], fold: bool, down: bool,
                  dtype: Any, widths: tuple[int, ...] | None = None) -> tuple[Array, list[int]]:
    """The projections' weights side by side [D, sum F] in ``dtype`` (and the widths), for one product
    with their shared input. ``fold``: each adapter's delta-W is added to its weight (the input's gradient
    then needs no separate product through the adapter). ``down``: each adapter's ``down`` matrix is
    appended as more columns (its rank activations come out of the same product; in the backward, the
    input's gradient through the adapter joins the same product). ``widths``: ``w`` holds the group
    already joined (``unstack_layers``), with these widths."""
    if widths is not None:  # joined once by ``unstack_layers`` (its adapters folded in or left in ``deltas``)
        assert not down, "a joined group's product has no room for the adapters' down columns"
        return w.proj[_joined_name(names)].astype(dtype), list(widths)
    blocks = []
    for name in names:
        weight = w.proj[name]
        if fold and name in deltas:
            weight = weight + deltas[name].weight().astype(weight.dtype)
        blocks.append(weight.astype(dtype))
    widths = [blk.shape[1] for blk in blocks]
    if down:
        blocks += [deltas[name].down_weight().astype(dtype) for name in names if name in deltas]
    return (blocks[0] if len(blocks) == 1 else bits.concatenate(blocks, 1)), widths


def _project_group(names: tuple[str, ...], x_BxTxD: Array, w: LayerWeights, deltas: dict[str, Delta],
                   dropout: float, rng: Array | None, fold: bool, append: bool, keep_ranks: bool = True,
                   joined_widths: tuple[int, ...] | None = None) -> tuple[list[Array], dict[str, Array]]:
    """x @ W (+ bias) (+ the adapter's delta) of several projections of one input, as one product when there
    are several: ([B, T, F] per projection, the adapters' float32 rank activations by name). ``append``
    (no dropout: the adapters read the projections' own input): their ``down`` matrices join that product.
    ``keep_ranks=False`` (nothing differentiates): a folded adapter's rank activations are not computed.
    ``joined_widths``: ``w`` holds the group's weights already joined (``unstack_layers``), these widths."""
    b, t, _ = x_BxTxD.shape
    dtype = x_BxTxD.dtype
    adapted = [name for name in names if name in deltas]
    with_down = append and bool(adapted) and (keep_ranks or not fold)
    weight, widths = _group_weight(names, w, deltas, fold, with_down, dtype, joined_widths)
    # With rank columns the product stays float32 (the rank activations' precision); the projections'
    # columns are rounded to ``dtype`` as ``products.einsum`` would.
    if with_down:
        y_NxF = products.einsum_float32("nd,df->nf", tokens_first(x_BxTxD), weight, dtype)
    else:
        y_NxF = products.einsum("nd,df->nf", tokens_first(x_BxTxD), weight)
    ranks, start = {}, sum(widths)
    for name in adapted if with_down else ():
        size = int(np.prod(deltas[name].rank_shape))
        ranks[name] = y_NxF[:, start:start + size].reshape(-1, *deltas[name].rank_shape)
        start += size
    outs, start = [], 0
    for name, width in zip(names, widths):
        y = y_NxF[:, start:start + width].astype(dtype)
        start += width
        if name in w.bias:
            y = y + w.bias[name].astype(y.dtype)
        if name in deltas and not fold:
            if name not in ranks:
                ranks[name] = deltas[name].down(tokens_first(_adapter_input(name, x_BxTxD, dropout, rng)))
            y = y + deltas[name].up(ranks[name], dtype).astype(y.dtype)
        outs.append(y.reshape(b, t, width))
    return outs, ranks


def _project_group_backward(names: tuple[str, ...], x_BxTxD: Array, dys: list[Array], ranks: dict[str, Array],
                            w: LayerWeights, deltas: dict[str, Delta], need_deltas: dict[str, Any],
                            need_weights: bool, dropout: float, rng: Array | None, fold: bool, append: bool,
                            grads: dict[str, Any]) -> Array:
    """The VJP of ``_project_group`` at x: returns dx [B, T, D]; the adapters' (and, when ``need_weights``, the
    weights' and biases') gradients go into ``grads``. Unfolded adapters that read x itself (``append``) add
    their share of dx in the weights' product: their ``down`` cotangents as more columns of dy."""
    x_NxD = tokens_first(x_BxTxD)
    dtype = dys[0].dtype
    dy_NxFs = [tokens_first(dy) for dy in dys]
    fused = append and not fold
    d_ranks, dx_adapters = [], []
    for name, dy in zip(names, dy_NxFs):
        if name not in deltas:
            continue
        adapter_x, dropout_vjp = jax.vjp(lambda x: _adapter_input(name, x, dropout, rng), x_BxTxD)
        dh, grads["deltas"][name] = deltas[name].backward(tokens_first(adapter_x), ranks[name], dy, need_deltas[name])
        if fused:
            d_ranks.append(dh.reshape(dh.shape[0], -1).astype(dtype))
        elif not fold:
            d_adapter_x = deltas[name].input_grad(dh, dtype)
            if dropout > 0 and rng is not None:
                d_adapter_x = tokens_first(dropout_vjp(d_adapter_x.reshape(x_BxTxD.shape))[0])
            dx_adapters.append(d_adapter_x)
    weight, _ = _group_weight(names, w, deltas, fold, bool(d_ranks), dtype)
    columns = dy_NxFs + d_ranks
    dy_NxF = columns[0] if len(columns) == 1 else bits.concatenate(columns, 1)
    dx_NxD = products.einsum("nf,df->nd", dy_NxF, weight)
    for d_adapter_x in dx_adapters:
        dx_NxD = dx_NxD + d_adapter_x
    if need_weights:
        for name, dy in zip(names, dy_NxFs):
            grads["proj"][name] = products.einsum("nd,nf->df", x_NxD, dy).astype(w.proj[name].dtype)
            if name in w.bias:
                grads["bias"][name] = jnp.sum(dy, axis=0).astype(w.bias[name].dtype)
    return dx_NxD.reshape(x_BxTxD.shape)


_QKV, _O, _GATE_UP, _DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


class _LayerSpec(NamedTuple):
    """The static part of a decoder layer."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    act: str
    dropout: float
    fold: bool  # fold each adapter into its projection's weight (no dropout, 32-bit activations)
    append: bool  # no dropout: each adapter's down matrix joins its projections' product


def _layer_forward(spec: _LayerSpec, x_BxTxD: Array, w: LayerWeights, deltas: dict[str, Delta], rng: Array | None,
                   window: Array, base_mask_BxTxS: Array, distance_TxS: Array, cos: Array, sin: Array):
    """One decoder layer without a cache: (output, what its backward keeps). ``w`` may hold bfloat16 as bits."""
    w = bits.tree_from_storage(w)
    b, t, _ = x_BxTxD.shape
    h, kv, hd = spec.heads, spec.kv_heads, spec.head_dim
    mask_BxTxS = base_mask_BxTxS & ((window == 0) | (distance_TxS < window))[None]
    group = functools.partial(_project_group, w=w, deltas=deltas, dropout=spec.dropout, rng=rng, fold=spec.fold,
                              append=spec.append)
    y = _rms_norm(x_BxTxD, w.attn_norm_LxD, spec.eps)
    (q, k, v), ranks = group(_QKV, y)
    q, k = _rope(q.reshape(b, t, h, hd), cos, sin), _rope(k.reshape(b, t, kv, hd), cos, sin)
    v = v.reshape(b, t, kv, hd)
    attn_BxTxHHd, stats = attention_forward(q, k, v, mask_BxTxS, causal=True)
    (o,), more = group(_O, attn_BxTxHHd)
    ranks.update(more)
    mid_BxTxD = x_BxTxD + o
    y = _rms_norm(mid_BxTxD, w.mlp_norm_LxD, spec.eps)
    (gate, up), more = group(_GATE_UP, y)
    ranks.update(more)
    (down,), more = group(_DOWN, _gated(spec.act, gate, up))
    ranks.update(more)
    out_BxTxD = mid_BxTxD + down
    # Kept for the backward: the inputs of the norms, attention's inputs, output and softmax statistics, the
    # MLP's pre-activations and every adapter's rank activations. Norms, rotary embeddings and the
    # activation are recomputed from them; nothing [T, S]-sized is kept.
    saved = (x_BxTxD, q, k, v, attn_BxTxHHd, stats, mid_BxTxD, gate, up, ranks)
    return out_BxTxD, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer(spec: _LayerSpec, x_BxTxD: Array, w: LayerWeights, deltas: dict[str, Delta], rng: Array | None,
           window: Array, base_mask_BxTxS: Array, distance_TxS: Array, cos: Array, sin: Array) -> Array:
    """One decoder layer without a cache, with a hand-written backward (``_layer_bwd``)."""
    return _layer_forward(spec, x_BxTxD, w, deltas, rng, window, base_mask_BxTxS, distance_TxS, cos, sin)[0]


def _layer_fwd(spec, x_BxTxD, w, deltas, rng, window, base_mask_BxTxS, distance_TxS, cos, sin):
    # symbolic_zeros: every leaf comes as CustomVJPPrimal, which tells whether it is differentiated, so that
    # the backward computes only the gradients asked for (the adapter's, and the weights' when pretraining).
    perturbed = lambda tree: jax.tree.map(lambda p: p.perturbed, tree)  # noqa: E731
    value = lambda tree: jax.tree.map(lambda p: p.value, tree)  # noqa: E731
    need_weights = any(jax.tree.leaves(perturbed(w)))
    inputs = tuple(value(a) for a in (x_BxTxD, w, deltas, rng, window, base_mask_BxTxS, distance_TxS, cos, sin))
    out, saved = _layer_forward(spec, *inputs)
    return out, (bits.tree_to_storage(saved), inputs[1:], perturbed(deltas), need_weights)


def _layer_bwd(spec, residuals, d_out_BxTxD):
    saved, inputs, need_deltas, need_weights = residuals
    x_BxTxD, q, k, v, attn_BxTxHHd, stats, mid_BxTxD, gate, up, ranks = bits.tree_from_storage(saved)
    w, deltas, rng, window, base_mask_BxTxS, distance_TxS, cos, sin = inputs
    w = bits.tree_from_storage(w)
    if isinstance(d_out_BxTxD, SymbolicZero):
        d_out_BxTxD = jnp.zeros(d_out_BxTxD.shape, d_out_BxTxD.dtype)
    b, t, _ = x_BxTxD.shape
    mask_BxTxS = base_mask_BxTxS & ((window == 0) | (distance_TxS < window))[None]
    grads: dict[str, Any] = {"deltas": {}, "proj": {}, "bias": {}}

    def group_backward(names, x, dys):
        return _project_group_backward(names, x, dys, ranks, w, deltas, need_deltas, need_weights, spec.dropout,
                                       rng, spec.fold, spec.append, grads)

    def norm_vjp(x, scale):
        if need_weights:
            y, vjp = jax.vjp(lambda x, s: _rms_norm(x, s, spec.eps), x, scale)
            return y, vjp
        y, vjp = jax.vjp(lambda x: _rms_norm(x, scale, spec.eps), x)
        return y, lambda dy: (*vjp(dy), None)

    # MLP: out = mid + down(act(gate) * up)
    hidden, act_vjp = jax.vjp(functools.partial(_gated, spec.act), gate, up)
    d_gate, d_up = act_vjp(group_backward(_DOWN, hidden, [d_out_BxTxD]))
    y, mlp_norm_vjp = norm_vjp(mid_BxTxD, w.mlp_norm_LxD)
    d_mid, d_mlp_norm = mlp_norm_vjp(group_backward(_GATE_UP, y, [d_gate, d_up]))
    d_mid = d_out_BxTxD + d_mid
    # Attention: mid = x + o(attention(rope(q(y)), rope(k(y)), v(y))), y = norm(x)
    d_attn = group_backward(_O, attn_BxTxHHd, [d_mid])
    d_q, d_k, d_v = attention_backward(q, k, v, mask_BxTxS, attn_BxTxHHd, stats, d_attn, causal=True)
    rope_t = lambda d: jax.linear_transpose(lambda z: _rope(z, cos, sin), d)(d)[0]  # noqa: E731
    d_q, d_k = rope_t(d_q).reshape(b, t, -1), rope_t(d_k).reshape(b, t, -1)
    y, attn_norm_vjp = norm_vjp(x_BxTxD, w.attn_norm_LxD)
    d_x, d_attn_norm = attn_norm_vjp(group_backward(_QKV, y, [d_q, d_k, d_v.reshape(b, t, -1)]))
    d_x = _constrain(d_mid + d_x, ("batch", None, None))

    d_w = None
    if need_weights:
        d_w = LayerWeights(attn_norm_LxD=d_attn_norm, mlp_norm_LxD=d_mlp_norm, proj=grads["proj"],
                           bias=grads["bias"])
    return d_x, d_w, grads["deltas"], None, None, None, None, None, None


_layer.defvjp(_layer_fwd, _layer_bwd, symbolic_zeros=True)


def _cached_layer(spec: _LayerSpec, x_BxTxD: Array, w: LayerWeights, deltas: dict[str, Delta], rng: Array | None,
                  window: Array | int, base_mask_BxTxS: Array, distance_TxS: Array, cos: Array, sin: Array,
                  cache_kv: tuple[Array, Array] | None, cache_index: Array | int, layer_index: Array | None
                  ) -> tuple[Array, tuple[Array, Array] | None]:
    """One decoder layer that nothing differentiates through a hand-written backward: with a cache, or on
    cuDNN's fused attention. The new keys/values go into ``cache_kv`` at slots [cache_index, cache_index + T):
    the whole stacked [L, B, S, K, Hd] cache at ``layer_index``, or this layer's own head-major cache (keys
    [B, K, Hd, S], values [B, K, S, Hd]) when ``layer_index`` is None (``decode_unstacked``).

    A prompt's prefill (T queries filling a cache's last T slots, from a static ``cache_index``; slot 0 or
    after a shared prefix) is causal like training's forward: queries in causal chunks, and q/k/v and
    gate/up as one product each. A decode step (T = 1) groups them only where ``unstack_layers`` joined the
    weights once (joining them in every step would cost more than it saves); else one product each."""
    b, t, _ = x_BxTxD.shape
    h, kv, hd = spec.heads, spec.kv_heads, spec.head_dim
    slots = None if cache_kv is None else cache_kv[1].shape[2]  # S of the values' [L, B, S, K, Hd] or [B, K, S, Hd]
    causal = slots is None or (isinstance(cache_index, int) and cache_index + t == slots)
    fresh = slots is None or (causal and cache_index == 0)  # the new keys are all there is: attend to them
    mask_BxTxS = base_mask_BxTxS & ((window == 0) | (distance_TxS < window))[None]
    group = functools.partial(_project_group, w=w, deltas=deltas, dropout=spec.dropout, rng=rng,
                              fold=spec.fold and t > 1, append=spec.append and t > 1, keep_ranks=False)

    def projections(names: tuple[str, ...], x: Array) -> list[Array]:
        if t > 1:
            return group(names, x)[0]
        joined = w.proj.get(_joined_name(names)) if len(names) > 1 else None
        if joined is None:
            return [group((name,), x)[0][0] for name in names]
        return group(names, x, joined_widths=_joined_widths(spec, names, joined))[0]

    y = _rms_norm(x_BxTxD, w.attn_norm_LxD, spec.eps)
    q, k, v = projections(_QKV, y)
    q, k = _rope(q.reshape(b, t, h, hd), cos, sin), _rope(k.reshape(b, t, kv, hd), cos, sin)
    v = v.reshape(b, t, kv, hd)
    if cache_kv is not None:
        k_cache, v_cache = cache_kv
        if layer_index is None:  # this layer's head-major cache (``unstack_cache``)
            k_cache = jax.lax.dynamic_update_slice(k_cache, bits.to_storage(k.transpose(0, 2, 3, 1), k_cache.dtype),
                                                   (0, 0, 0, cache_index))
            v_cache = jax.lax.dynamic_update_slice(v_cache, bits.to_storage(v.transpose(0, 2, 1, 3), v_cache.dtype),
                                                   (0, 0, cache_index, 0))
            if not fresh:  # a decode step (the per-layer caches serve nothing else), in the caches' dtype
                attn_BxTxHHd = attention_head_major(q.astype(k_cache.dtype), k_cache, v_cache,
                                                    mask_BxTxS).astype(x_BxTxD.dtype)
        else:
            # The whole [L, B, S, K, Hd] cache is the scan's carry, written in place at this layer's
            # slots; passing per-layer slices as xs/ys instead copies the full cache several times a step.
            start = (layer_index, 0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, bits.to_storage(k, k_cache.dtype)[None], start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, bits.to_storage(v, v_cache.dtype)[None], start)
            if not fresh:
                k = bits.from_storage(jax.lax.dynamic_index_in_dim(k_cache, layer_index, 0, keepdims=False),
                                      x_BxTxD.dtype)
                v = bits.from_storage(jax.lax.dynamic_index_in_dim(v_cache, layer_index, 0, keepdims=False),
                                      x_BxTxD.dtype)
                attn_BxTxHHd = attention(q, k, v, mask_BxTxS, causal=causal)
        cache_kv = (k_cache, v_cache)
    if fresh:
        attn_BxTxHHd = attention(q, k, v, mask_BxTxS, causal=True)
    (o,) = projections(_O, attn_BxTxHHd)
    x_BxTxD = x_BxTxD + o
    y = _rms_norm(x_BxTxD, w.mlp_norm_LxD, spec.eps)
    gate, up = projections(_GATE_UP, y)
    (down,) = projections(_DOWN, _gated(spec.act, gate, up))
    return x_BxTxD + down, cache_kv


def _prepare(cfg: ModelConfig, weights: Weights, input_ids_BxT: Array, s: int, cached: bool,
             cache_index: Array | int, attention_mask_BxS: Array | None, positions_BxT: Array | None,
             segment_ids_BxT: Array | None, compute_dtype: Any, dropout: float
             ) -> tuple[Array, _LayerSpec, tuple[Array, Array, Array, Array]]:
    """What every layer shares: the embedded tokens [B, T, D], the layer spec, and (base mask [B, T, S], query
    - key slot distances [T, S], rotary cos, sin). ``s``: the key length (the cache's slots, or T)."""
    b, t = input_ids_BxT.shape
    dtype = compute_dtype or weights.embed_VxD.dtype
    slots_T = cache_index + jnp.arange(t)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(slots_T, (b, t))
    key_slots_S = jnp.arange(s) if cached else slots_T
    valid_BxS = jnp.ones((b, s), bool) if attention_mask_BxS is None else attention_mask_BxS.astype(bool)
    causal_TxS = key_slots_S[None, :] <= slots_T[:, None]
    base_mask_BxTxS = causal_TxS[None] & valid_BxS[:, None, :]
    if segment_ids_BxT is not None:  # packed examples never see each other
        base_mask_BxTxS &= segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    x_BxTxD = weights.embed_VxD.astype(dtype)[input_ids_BxT]
    cos, sin = _rope_tables(positions_BxT, cfg.inv_freq(), dtype)
    distance_TxS = slots_T[:, None] - key_slots_S[None, :]
    # Folding an adapter into its weight rounds its delta-W to the weight's precision: exact enough in 32 bits
    # (the products' own rounding), not in 16.
    fold = dropout == 0.0 and jnp.dtype(dtype).itemsize >= 4
    spec = _LayerSpec(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                      cfg.hidden_act, dropout, fold, dropout == 0.0)
    return x_BxTxD, spec, (base_mask_BxTxS, distance_TxS, cos, sin)


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
    segment_ids_BxT: Array | None = None,
    cache: KVCache | None = None,
    cache_index: Array | int = 0,
    compute_dtype: Any = None,
    remat: bool = False,
    return_hidden: bool = False,
    reference_backward: bool = False,
    frozen_weights: bool = False,
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
        positions_BxT: rotary positions (default: slot index). Left-padded generation passes cumsum(mask)-1;
            packed rows pass positions restarting in each example.
        segment_ids_BxT: packed rows (no cache): token t attends to key s only if both carry the same id.
        cache: key/value cache; the new keys/values are written at slots [cache_index, cache_index + T).
        cache_index: first slot the current tokens occupy.
        compute_dtype: dtype of activations (default: the weights' dtype). Logits are float32.
        remat: recompute each layer's activations in the backward pass instead of storing them.
        return_hidden: return the final normed hidden states [B, T, D] instead of logits.
        reference_backward: differentiate the layers by autodiff of their plain forward instead of through
            ``_layer``'s hand-written backward (the reference that one is checked against).
        frozen_weights: nothing differentiates ``weights`` (an adapter's training), so bfloat16 ones may go
            through the layer scan as bits (below); their gradients would come out as zeros.
    """
    deltas = deltas or {}
    s = input_ids_BxT.shape[1] if cache is None else cache.k_LxBxSxKxHd.shape[2]
    layer_dropout = dropout if dropout_rng is not None else 0.0
    x_BxTxD, spec, masks = _prepare(cfg, weights, input_ids_BxT, s, cache is not None, cache_index,
                                    attention_mask_BxS, positions_BxT, segment_ids_BxT, compute_dtype, layer_dropout)
    base_mask_BxTxS, distance_TxS, cos, sin = masks
    dtype = x_BxTxD.dtype
    windows_L = jnp.asarray(cfg.sliding_windows or (0,) * cfg.num_hidden_layers, jnp.int32)
    layer_rngs = None if dropout_rng is None else jax.random.split(dropout_rng, cfg.num_hidden_layers)
    # Without a cache each layer is one function with a hand-written backward (``_layer``); with one (or on
    # cuDNN's fused attention), ``_cached_layer``, which nothing differentiates through a cache.
    whole_layer = cache is None and not uses_fused_kernel(dtype) and not reference_backward

    def block(carry, layer):
        x_BxTxD, cache_kv = carry
        w, layer_deltas, window, rng, layer_index = layer
        x_BxTxD = _constrain(x_BxTxD, ("batch", None, None))
        if whole_layer:  # ``w`` as it is: its backward keeps the scan's slice of the stack, not a copy
            x_BxTxD = _layer(spec, x_BxTxD, w, layer_deltas, rng, window, base_mask_BxTxS, distance_TxS, cos, sin)
            return (x_BxTxD, cache_kv), None
        x_BxTxD, cache_kv = _cached_layer(spec, x_BxTxD, bits.tree_from_storage(w), layer_deltas, rng, window,
                                          base_mask_BxTxS, distance_TxS, cos, sin, cache_kv, cache_index,
                                          layer_index)
        return (x_BxTxD, cache_kv), None

    if remat:
        block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    cache_kv = None if cache is None else (cache.k_LxBxSxKxHd, cache.v_LxBxSxKxHd)
    layer_ids_L = jnp.arange(cfg.num_hidden_layers)
    # With a cache (or ``frozen_weights``) nothing differentiates the weights, and bfloat16 ones go through
    # the scan as bits: sliced as bfloat16, XLA's CPU backend first converts each whole [L, ...] stack to
    # float32 (5-7% of a bf16 prefill, 3% of a train step). Weights that are differentiated stay as they are
    # (a bitcast has no derivative).
    layers = bits.tree_to_storage(weights.layers) if cache is not None or frozen_weights else weights.layers
    with jax.named_scope("layers"):
        (x_BxTxD, new_kv), _ = jax.lax.scan(block, (x_BxTxD, cache_kv),
                                            (layers, deltas, windows_L, layer_rngs, layer_ids_L))
    x_BxTxD = _constrain(_rms_norm(x_BxTxD, weights.final_norm_D, cfg.rms_norm_eps), ("batch", None, None))
    new_cache = None if cache is None else KVCache(*new_kv)
    if return_hidden:
        return x_BxTxD, new_cache
    return lm_logits(weights, x_BxTxD), new_cache


class UnstackedLayers(NamedTuple):
    """The layers as separate arrays, one entry per layer (no [L] axis): what ``decode_unstacked`` reads.
    Their ``proj`` may hold q/k/v and gate/up joined, under keys such as ``"gate_proj+up_proj"``."""

    layers: tuple[LayerWeights, ...]
    deltas: tuple[dict[str, Delta], ...]  # empty dicts when the adapter is folded into ``layers``


def unstack_layers(weights: Weights, deltas: dict[str, Delta] | None, fold: bool, join: bool = True
                   ) -> UnstackedLayers:
    """Copies of every layer's weights (and adapter deltas) as separate arrays, made once before a decode loop.

    ``decode_unstacked`` unrolls the layers so that each reads its own head-major cache in place; an unrolled
    loop that sliced the stacked weights would copy every layer's weights in every step (XLA:CPU materialises
    the slices), so the per-layer arrays are made here, once per ``generate`` call. Measured alone, against the
    scan's per-step dynamic slices, they are no faster; the gain is the caches'. ``fold`` adds each adapter's
    delta-W into its weight (for 32-bit compute, where the rounding is the products' own), so a step runs no
    adapter products. ``join``: q/k/v and gate/up side by side (one [D, sum F] weight under ``_joined_name``
    instead of the projections' own keys), so a decode step runs four products per layer instead of seven
    (SmolLM2, 16 rows: 30 layers' products alone 84 -> 72-80 ms; a whole decode step, alternated in one
    process, median 187 -> 183 ms, faster in 11 of 12 pairs). Not where the weights' output axis is sharded
    (``tensor`` > 1): the joined columns would cross the shards' boundaries and every step would move them.
    """
    layers, deltas = weights.layers, deltas or {}
    proj = dict(layers.proj)
    if fold and deltas:
        proj = {name: w + deltas[name].weight().astype(w.dtype) if name in deltas else w for name, w in proj.items()}
        deltas = {}
    for names in (_QKV, _GATE_UP) if join else ():
        proj[_joined_name(names)] = bits.concatenate([proj.pop(name) for name in names], axis=2)
    layers = layers.replace(proj=proj)
    count = layers.attn_norm_LxD.shape[0]
    return UnstackedLayers(tuple(jax.tree.map(lambda x: x[i], layers) for i in range(count)),
                           tuple(jax.tree.map(lambda x: x[i], deltas) for i in range(count)))


def unstack_cache(cache: KVCache) -> tuple[tuple[Array, Array], ...]:
    """A stacked [L, B, S, K, Hd] cache as one head-major pair per layer: keys [B, K, Hd, S], values
    [B, K, S, Hd] (what ``attention.attention_head_major`` reads).

    bfloat16 keys and values come out as float32: a decode step writes one slot of every layer's cache and
    reads the whole of it, and XLA's CPU backend can do both in place only in 32 bits (a bf16 buffer is
    rewritten through float32 whole, and uint16 bits need a copy to be read as bf16; 20 ms of a 74 ms bf16
    SmolLM2 step at 16 rows). Twice the cache's bytes, a fraction of the weights'."""
    def per_layer(x: Array) -> Array:
        return bits.from_storage(x, jnp.float32) if x.dtype == jnp.uint16 else x

    return tuple((per_layer(cache.k_LxBxSxKxHd[i]).transpose(0, 2, 3, 1),
                  per_layer(cache.v_LxBxSxKxHd[i]).transpose(0, 2, 1, 3))
                 for i in range(cache.k_LxBxSxKxHd.shape[0]))


def decode_unstacked(cfg: ModelConfig, weights: Weights, layers: UnstackedLayers, input_ids_BxT: Array,
                     caches: tuple[tuple[Array, Array], ...], cache_index: Array | int, attention_mask_BxS: Array,
                     positions_BxT: Array, compute_dtype: Any = None) -> tuple[Array, tuple[tuple[Array, Array], ...]]:
    """``apply_model(..., cache=..., return_hidden=True)`` over ``unstack_layers``' copies and
    ``unstack_cache``'s per-layer caches, the layers unrolled: final normed hidden states [B, T, D] and the
    caches with the new keys/values at slots [cache_index, cache_index + T). For decode steps (T = 1), where
    reading the weights is the work; prefill keeps the scan, whose slices are cheap next to its products."""
    if input_ids_BxT.shape[1] != 1:
        raise ValueError(f"decode_unstacked feeds one token per row, got {input_ids_BxT.shape[1]}")
    s = caches[0][1].shape[2]  # the values' [B, K, S, Hd]
    x_BxTxD, spec, (base_mask_BxTxS, distance_TxS, cos, sin) = _prepare(
        cfg, weights, input_ids_BxT, s, True, cache_index, attention_mask_BxS, positions_BxT, None,
        compute_dtype, 0.0)
    windows = cfg.sliding_windows or (0,) * len(layers.layers)
    new_caches = []
    for w, layer_deltas, window, cache_kv in zip(layers.layers, layers.deltas, windows, caches, strict=True):
        x_BxTxD = _constrain(x_BxTxD, ("batch", None, None))
        x_BxTxD, cache_kv = _cached_layer(spec, x_BxTxD, w, layer_deltas, None, window, base_mask_BxTxS,
                                          distance_TxS, cos, sin, cache_kv, cache_index, None)
        new_caches.append(cache_kv)
    x_BxTxD = _constrain(_rms_norm(x_BxTxD, weights.final_norm_D, cfg.rms_norm_eps), ("batch", None, None))
    return x_BxTxD, tuple(new_caches)


def lm_logits(weights: Weights, x_BxTxD: Array) -> Array:
    """Float32 logits from final hidden states, through the tied embeddings or the lm head."""
    if weights.lm_head_DxV is None:
        logits = _head_product("btd,vd->btv", x_BxTxD, weights.embed_VxD)
    else:
        logits = _head_product("btd,dv->btv", x_BxTxD, weights.lm_head_DxV)
    return _constrain(logits, ("batch", None, "vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_product(subscripts: str, x: Array, w: Array) -> Array:
    """The LM head's product in the activations' dtype, accumulated and returned in float32. Its backward
    takes the logits' cotangent in the activations' dtype too: left in float32, it made XLA:CPU run the
    bfloat16 model's largest backward product ([512, 49152] x [49152, 576] at 8 x 64 targets) at the float32
    rate (a bf16 SmolLM2 step of 8 x 256: 3.45 -> 3.19 s with the cotangent rounded)."""
    return products.einsum_float32(subscripts, x, w, x.dtype)


def _head_product_fwd(subscripts, x, w):
    return _head_product(subscripts, x, w), (x, w)


def _head_product_bwd(subscripts, residuals, d_logits):
    x, w = residuals
    inputs, out_axes = subscripts.split("->")
    x_axes, w_axes = inputs.split(",")
    g = d_logits.astype(x.dtype)
    d_x = products.einsum(f"{out_axes},{w_axes}->{x_axes}", g, w.astype(x.dtype))
    d_w = products.einsum(f"{out_axes},{x_axes}->{w_axes}", g, x).astype(w.dtype)
    return d_x, d_w


_head_product.defvjp(_head_product_fwd, _head_product_bwd)
