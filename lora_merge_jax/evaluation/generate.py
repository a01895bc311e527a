"""Batched text generation with a KV cache: greedy, sampling (temperature / top-k / top-p) and beam search.

Design. The host does only bookkeeping: it left-pads the prompts to a *bucketed* length (so prompts of
lengths 5 and 9 share one compiled program) and pads the batch to a power of two. Everything else runs in
ONE jitted call per (bucket, settings): a prefill that writes the whole prompt into a slot-indexed
``KVCache`` (rotary positions ``cumsum(mask) - 1``, as transformers' ``generate`` does for left padding; the
prompts' common leading tokens, such as a chat template's system turn, sit at the first slots of every row
and are run once for the batch),
then a ``jax.lax.while_loop`` that decodes one token per iteration and stops as soon as every row has
produced an end-of-sequence token, or after ``max_new_tokens``. There is no host round trip per token.

The adapter (anything with ``.deltas(cfg)``) is an argument of the jitted function, so a new adapter of the
same structure does not recompile. What fixes shapes or code (method, ``max_new_tokens``, ``top_k``,
``num_beams``, the number of EOS ids) is static (``DecodeSettings``); the rest (EOS ids, temperature, top-p,
length penalty, early stopping, the seed) is traced (``DecodeParams``), so sweeping it does not recompile.

Beam search follows transformers' vectorised ``_beam_search`` (v4.50+) step for step: the top
``max(2, 1 + #eos) * num_beams`` continuations, finished hypotheses scored ``sum log p / len ** length_penalty``
(``len`` counts generated tokens, EOS included), only the top ``num_beams`` candidates may finish, and the
same ``early_stopping`` heuristic (default ``False``). The cache rows are reordered by a gather each step.

Returned token lists hold the new tokens only and stop *before* the first EOS (EOS excluded).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from lora_merge_jax import sharding
from lora_merge_jax.data.batching import bucket_length
from lora_merge_jax.models import decoder, dot_library, products
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import ModelConfig

Array = jax.Array
NEG = -1.0e9  # transformers' finite "impossible" beam score; finite so sums and comparisons stay exact
METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """What shapes the compiled program; hashable, so it is part of the jit cache key."""

    method: str  # greedy | sample | beam
    max_new_tokens: int  # N: new tokens at most
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = all)
    use_top_p: bool = False  # sampling: nucleus filtering on
    num_beams: int = 4  # beam search width
    output_logits: bool = False  # also return each step's raw logits [B, N, V] (greedy/sample)
    shared_prefix: int = 0  # every prompt starts with the same this many tokens, at slots [0, shared_prefix)


@struct.dataclass
class DecodeParams:
    """What may change between calls without recompiling: traced scalars and the EOS set."""

    eos_E: Array  # int32 [max(1, #eos)]; -1 pads (never matches a token)
    pad_token_id: Array  # fills finished rows
    temperature: Array  # sampling: logits / temperature
    top_p: Array  # sampling: keep the smallest set with probability >= top_p
    length_penalty: Array  # beam score = sum log p / length ** length_penalty
    stop_when_full: Array  # transformers' early_stopping=True
    never_stop_early: Array  # transformers' early_stopping="never"


@dataclasses.dataclass
class Generation:
    """Output of ``generate_detailed``.

    Attributes:
        tokens: per prompt, the new tokens, stopping before the first EOS.
        logits: per prompt, float32 raw logits [steps, V] of every decoding step (one more row than
            ``tokens`` when the row ended with EOS); None unless ``output_logits``.
    """

    tokens: list[list[int]]
    logits: list[np.ndarray] | None = None


@struct.dataclass
class _Beams:
    """Beam-search state: B prompts x NB beams, token buffers of N slots."""

    run_tokens_BxNBxN: Array
    run_scores_BxNB: Array  # summed log-probs of the live beams
    fin_tokens_BxNBxN: Array
    fin_scores_BxNB: Array  # length-normalised scores of finished hypotheses (NEG = empty slot)
    fin_len_BxNB: Array
    fin_flag_BxNB: Array
    improvable_B: Array  # transformers' is_early_stop_heuristic_unsatisfied


def filter_logits(logits_BxV: Array, temperature: float | Array = 1.0, top_k: int = 0,
                  top_p: float | Array = 1.0) -> Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, in transformers' order; removed -> -inf.

    ``temperature`` and ``top_p`` may be traced scalars (a traced ``top_p`` always filters); ``top_k`` is static.

    Example:
        >>> filter_logits(jnp.array([[3.0, 2.0, 1.0]]), top_k=2)
        Array([[ 3.,  2., -inf]], dtype=float32)
    """
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if isinstance(top_p, jax.Array) or top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept_B = jnp.sum(mass_before_BxV < top_p, axis=-1)  # >= 1: the first token has mass 0 before it
        threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def _forbid_early_eos(scores_BxV: Array, step: Array, s: DecodeSettings, d: DecodeParams) -> Array:
    if not s.min_new_tokens:
        return scores_BxV
    eos_V = _is_eos(jnp.arange(scores_BxV.shape[-1]), d)
    return jnp.where(eos_V & (step < s.min_new_tokens), -jnp.inf, scores_BxV)


def _is_eos(tokens: Array, d: DecodeParams) -> Array:
    return jnp.any(tokens[..., None] == d.eos_E, axis=-1)


def _prefill(cfg: ModelConfig, weights: weights_lib.Weights, deltas: Any, ids_BxP: Array, mask_BxP: Array,
             cache_len: int, compute_dtype: Any, cache_sharding: NamedSharding,
             shared_prefix: int = 0) -> tuple[Array, Any, Array, Array]:
    """Runs the prompt through the model; returns last-position logits, the cache, slot mask, next positions.

    ``shared_prefix``: slots [0, shared_prefix) hold the same tokens in every row; they go through the model
    once (row 0) and their keys and values are copied to every row, then the rest of the prompts runs
    against them (a chat template's system turn and an instruction are often a sixth of a prompt)."""
    b, p = ids_BxP.shape
    dtype = compute_dtype or weights.embed_VxD.dtype
    positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    # The prompt attends over its own P slots only: a cache of P slots, padded to ``cache_len`` afterwards (one
    # copy), rather than P queries against all P + N slots, N of them empty, in every layer.
    cache = weights_lib.init_cache(cfg, b, p, dtype)
    if shared_prefix:
        head = slice(0, shared_prefix)
        _, prefix = decoder.apply_model(
            cfg, weights, ids_BxP[:1, head], deltas=deltas, attention_mask_BxS=mask_BxP[:1, head],
            positions_BxT=positions_BxP[:1, head], cache=weights_lib.init_cache(cfg, 1, shared_prefix, dtype),
            cache_index=0, compute_dtype=compute_dtype, return_hidden=True)
        every_row = lambda x: jnp.broadcast_to(x, (x.shape[0], b, *x.shape[2:]))  # noqa: E731
        cache = jax.tree.map(lambda c, x: c.at[:, :, head].set(every_row(x)), cache, prefix)
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    hidden_BxTxD, cache = decoder.apply_model(
        cfg, weights, ids_BxP[:, shared_prefix:], deltas=deltas, attention_mask_BxS=mask_BxP,
        positions_BxT=positions_BxP[:, shared_prefix:], cache=cache, cache_index=shared_prefix,
        compute_dtype=compute_dtype, return_hidden=True)
    slots = ((0, 0), (0, 0), (0, cache_len - p), (0, 0), (0, 0))
    cache = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: jnp.pad(x, slots), cache), cache_sharding)
    mask_BxS = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(mask_BxP)
    logits_BxV = decoder.lm_logits(weights, hidden_BxTxD[:, -1:])[:, 0]  # never [B, P, V]
    return logits_BxV, cache, mask_BxS, jnp.sum(mask_BxP, axis=1)


def _for_decoding(weights: weights_lib.Weights, deltas: Any, cache: weights_lib.KVCache,
                  compute_dtype: Any) -> tuple[Any, Any]:
    """The layers and cache in the form the decode loop reads them: on CPU, every layer's weights (adapter
    folded in for 32-bit compute) and cache as separate arrays, copied once here
    (``decoder.unstack_layers``), at the price of a second copy of the weights while generating; elsewhere
    the stacked ones and ``deltas``."""
    if jax.default_backend() != "cpu":
        return deltas, cache
    fold = jnp.dtype(compute_dtype or weights.embed_VxD.dtype).itemsize >= 4
    mesh = jax.sharding.get_abstract_mesh()  # ``generate`` traces under the model's mesh
    # Join q/k/v and gate/up only where their output axes are whole (sharded, the joined columns would cross
    # the shards' boundaries in every step).
    join = (mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names)
            or all(sharding.mesh_axis_size(mesh, axis) == 1 for axis in ("heads", "kv_heads", "ffw")))
    return decoder.unstack_layers(weights, deltas, fold, join), decoder.unstack_cache(cache)


def _take_rows(cache: Any, rows_R: Array) -> Any:
    """The cache's batch rows ``rows_R`` (beam reordering), stacked [L, B, ...] or per layer [B, ...]."""
    axis = 1 if isinstance(cache, weights_lib.KVCache) else 0
    return jax.tree.map(lambda x: jnp.take(x, rows_R, axis=axis), cache)


def _decode_one(cfg: ModelConfig, weights: weights_lib.Weights, layers: Any, tokens_R: Array, cache: Any,
                mask_RxS: Array, slot: Array, positions_R: Array, compute_dtype: Any) -> tuple[Array, Any, Array]:
    """Feeds one token per row at cache ``slot``; returns its logits [R, V], the cache and the slot mask.
    ``layers`` and ``cache`` come from ``_for_decoding``."""
    mask_RxS = jax.lax.dynamic_update_slice_in_dim(mask_RxS, jnp.ones((mask_RxS.shape[0], 1), jnp.int32), slot, 1)
    if isinstance(layers, decoder.UnstackedLayers):
        hidden_Rx1xD, cache = decoder.decode_unstacked(cfg, weights, layers, tokens_R[:, None], cache, slot,
                                                       mask_RxS, positions_R[:, None], compute_dtype)
    else:
        hidden_Rx1xD, cache = decoder.apply_model(
            cfg, weights, tokens_R[:, None], deltas=layers, attention_mask_BxS=mask_RxS,
            positions_BxT=positions_R[:, None], cache=cache, cache_index=slot, compute_dtype=compute_dtype,
            return_hidden=True)
    return _step_logits(weights, hidden_Rx1xD[:, 0]), cache, mask_RxS


def _step_logits(weights: weights_lib.Weights, x_RxD: Array) -> Array:
    """``decoder.lm_logits`` of one position per row, computed vocabulary-major.

    With tied embeddings a decode step's LM head is the [V, D] embedding times a few vectors. XLA:CPU runs
    ``vd,rd->vr`` (then a transpose of the small [V, R] result) about twice as fast as ``rd,vd->rv`` for
    R = 4..16 (measured on SmolLM2's 49,152 x 576 embedding); the numbers are the same dot products.
    """
    if weights.lm_head_DxV is not None:  # an untied [D, V] head: the plain order
        return products.einsum_float32("rd,dv->rv", x_RxD, weights.lm_head_DxV, x_RxD.dtype)
    return products.einsum_float32("vd,rd->vr", weights.embed_VxD, x_RxD, x_RxD.dtype).T


def _sample_loop(cfg, s, d, compute_dtype, cache_shardings, weights, adapter, ids_BxP, mask_BxP, active_B, key):
    deltas = None if adapter is None else adapter.deltas(cfg)
    b, p = ids_BxP.shape
    n = s.max_new_tokens
    logits_BxV, cache, mask_BxS, next_pos_B = _prefill(cfg, weights, deltas, ids_BxP, mask_BxP, p + n,
                                                       compute_dtype, cache_shardings[0], s.shared_prefix)
    layers, cache = _for_decoding(weights, deltas, cache, compute_dtype)

    def select(carry, logits_BxV, step):
        tokens_BxN, scores_BxNxV, done_B, key = carry
        key, sub = jax.random.split(key)
        scores_BxV = _forbid_early_eos(logits_BxV, step, s, d)
        if s.method == "greedy":
            token_B = jnp.argmax(scores_BxV, axis=-1).astype(jnp.int32)
        else:
            top_p = d.top_p if s.use_top_p else 1.0
            filtered_BxV = filter_logits(scores_BxV, d.temperature, s.top_k, top_p)
            token_B = jax.random.categorical(sub, filtered_BxV, axis=-1).astype(jnp.int32)
        token_B = jnp.where(done_B, d.pad_token_id, token_B)
        tokens_BxN = jax.lax.dynamic_update_slice_in_dim(tokens_BxN, token_B[:, None], step, 1)
        if scores_BxNxV is not None:
            scores_BxNxV = jax.lax.dynamic_update_slice_in_dim(scores_BxNxV, logits_BxV[:, None], step, 1)
        return tokens_BxN, scores_BxNxV, done_B | _is_eos(token_B, d), key

    tokens_BxN = jnp.full((b, n), d.pad_token_id, jnp.int32)
    scores_BxNxV = jnp.zeros((b, n, logits_BxV.shape[-1]), jnp.float32) if s.output_logits else None
    carry = select((tokens_BxN, scores_BxNxV, ~active_B, key), logits_BxV, 0)

    def cond(state):
        step, _, _, carry = state
        return (step < n) & ~jnp.all(carry[2])

    def body(state):
        step, cache, mask_BxS, carry = state
        last_B = jax.lax.dynamic_index_in_dim(carry[0], step - 1, 1, keepdims=False)
        logits_BxV, cache, mask_BxS = _decode_one(cfg, weights, layers, last_B, cache, mask_BxS, p + step - 1,
                                                  next_pos_B + step - 1, compute_dtype)
        return step + 1, cache, mask_BxS, select(carry, logits_BxV, step)

    _, _, _, (tokens_BxN, scores_BxNxV, _, _) = jax.lax.while_loop(cond, body, (1, cache, mask_BxS, carry))
    return tokens_BxN, jnp.full((b,), n, jnp.int32), scores_BxNxV


def _gather_beams(x_BxKx: Array, index_BxJ: Array) -> Array:
    index = index_BxJ.reshape(index_BxJ.shape + (1,) * (x_BxKx.ndim - 2))
    return jnp.take_along_axis(x_BxKx, index, axis=1)


def _beam_select(beams: _Beams, logits_RxV: Array, step: Array, s: DecodeSettings,
                 d: DecodeParams) -> tuple[_Beams, Array]:
    """One beam-search step (transformers' steps b-g); returns the new state and each beam's source row."""
    b, nb, n = beams.run_tokens_BxNBxN.shape
    v = logits_RxV.shape[-1]
    keep = max(2, 1 + d.eos_E.shape[0]) * nb  # an empty EOS set is padded to one entry: same K either way
    logp_BxNBxV = _forbid_early_eos(jax.nn.log_softmax(logits_RxV, axis=-1), step, s, d).reshape(b, nb, v)
    total_BxW = (logp_BxNBxV + beams.run_scores_BxNB[:, :, None]).reshape(b, nb * v)
    top_BxK, flat_BxK = jax.lax.top_k(total_BxW, keep)
    src_BxK, token_BxK = flat_BxK // v, (flat_BxK % v).astype(jnp.int32)
    at_step_N = jnp.arange(n) == step
    cand_BxKxN = jnp.where(at_step_N, token_BxK[:, :, None], _gather_beams(beams.run_tokens_BxNBxN, src_BxK))
    hits_BxK = _is_eos(token_BxK, d) | (step + 1 >= n)

    # Live beams: the best continuations that did not just stop.
    run_scores_BxNB, pick_BxNB = jax.lax.top_k(top_BxK + hits_BxK * NEG, nb)
    run_tokens = _gather_beams(cand_BxKxN, pick_BxNB)
    src_BxNB = _gather_beams(src_BxK, pick_BxNB)

    # Finished hypotheses: merge those just ended (among the top nb only) with the kept ones.
    fin_cand_BxK = top_BxK / ((step + 1.0) ** d.length_penalty)
    fin_cand_BxK += (jnp.all(beams.fin_flag_BxNB, axis=-1, keepdims=True) & d.stop_when_full) * NEG
    fin_cand_BxK += ~beams.improvable_B[:, None] * NEG
    just_BxK = hits_BxK & (jnp.arange(keep) < nb)
    fin_cand_BxK += ~just_BxK * NEG
    merged_scores = jnp.concatenate([beams.fin_scores_BxNB, fin_cand_BxK], axis=1)
    fin_scores_BxNB, take_BxNB = jax.lax.top_k(merged_scores, nb)
    merge = lambda old, new: _gather_beams(jnp.concatenate([old, new], axis=1), take_BxNB)  # noqa: E731
    fin_tokens = merge(beams.fin_tokens_BxNBxN, cand_BxKxN)
    fin_len = merge(beams.fin_len_BxNB, jnp.full((b, keep), step + 1, jnp.int32))
    fin_flag = merge(beams.fin_flag_BxNB, just_BxK)

    # Can a live beam still beat the worst finished one? (transformers' _check_early_stop_heuristic)
    best_len = jnp.where(d.never_stop_early & (d.length_penalty > 0), float(n), step + 1.0)
    best_possible_Bx1 = run_scores_BxNB[:, :1] / (best_len ** d.length_penalty)
    worst_BxNB = jnp.where(fin_flag, jnp.min(fin_scores_BxNB, axis=1, keepdims=True), NEG)
    improvable_B = beams.improvable_B & jnp.any(best_possible_Bx1 > worst_BxNB, axis=-1)
    new = _Beams(run_tokens, run_scores_BxNB, fin_tokens, fin_scores_BxNB, fin_len, fin_flag, improvable_B)
    return new, (jnp.arange(b)[:, None] * nb + src_BxNB).reshape(-1)


def _beam_loop(cfg, s, d, compute_dtype, cache_shardings, weights, adapter, ids_BxP, mask_BxP, active_B, key):
    del key
    deltas = None if adapter is None else adapter.deltas(cfg)
    b, p = ids_BxP.shape
    n, nb = s.max_new_tokens, s.num_beams
    logits_BxV, cache, mask_BxS, next_pos_B = _prefill(cfg, weights, deltas, ids_BxP, mask_BxP, p + n,
                                                       compute_dtype, cache_shardings[0], s.shared_prefix)
    # Every beam of a prompt starts from the same prefix; rows are prompt-major: row = prompt * nb + beam.
    cache = jax.lax.with_sharding_constraint(jax.tree.map(lambda x: jnp.repeat(x, nb, axis=1), cache),
                                             cache_shardings[1])
    layers, cache = _for_decoding(weights, deltas, cache, compute_dtype)
    mask_RxS, next_pos_R = jnp.repeat(mask_BxS, nb, axis=0), jnp.repeat(next_pos_B, nb, axis=0)
    tokens_BxNBxN = jnp.full((b, nb, n), d.pad_token_id, jnp.int32)
    beams = _Beams(
        run_tokens_BxNBxN=tokens_BxNBxN,
        run_scores_BxNB=jnp.zeros((b, nb), jnp.float32).at[:, 1:].set(NEG),  # only beam 0 is live at first
        fin_tokens_BxNBxN=tokens_BxNBxN,
        fin_scores_BxNB=jnp.full((b, nb), NEG, jnp.float32),
        fin_len_BxNB=jnp.zeros((b, nb), jnp.int32),
        fin_flag_BxNB=jnp.zeros((b, nb), bool),
        improvable_B=active_B,
    )
    beams, src_R = _beam_select(beams, jnp.repeat(logits_BxV, nb, axis=0), 0, s, d)

    def cond(state):
        step, _, _, beams, _ = state
        all_full = jnp.all(beams.fin_flag_BxNB | ~active_B[:, None])
        return (step < n) & jnp.any(beams.improvable_B) & ~(all_full & d.stop_when_full)

    def body(state):
        step, cache, mask_RxS, beams, src_R = state
        cache = _take_rows(cache, src_R)
        last_R = jax.lax.dynamic_index_in_dim(beams.run_tokens_BxNBxN, step - 1, 2, keepdims=False).reshape(-1)
        logits_RxV, cache, mask_RxS = _decode_one(cfg, weights, layers, last_R, cache, mask_RxS, p + step - 1,
                                                  next_pos_R + step - 1, compute_dtype)
        beams, src_R = _beam_select(beams, logits_RxV, step, s, d)
        return step + 1, cache, mask_RxS, beams, src_R

    _, _, _, beams, _ = jax.lax.while_loop(cond, body, (1, cache, mask_RxS, beams, src_R))
    return beams.fin_tokens_BxNBxN[:, 0], beams.fin_len_BxNB[:, 0], None


def _generate(cfg, settings, params, compute_dtype, cache_shardings, weights, adapter, ids_BxP, mask_BxP,
              active_B, key):
    loop = _beam_loop if settings.method == "beam" else _sample_loop
    return loop(cfg, settings, params, compute_dtype, cache_shardings, weights, adapter, ids_BxP, mask_BxP,
                active_B, key)


@functools.cache
def _program(options: tuple[tuple[str, str], ...]) -> Any:
    """The jitted ``_generate`` compiled with XLA ``options`` (``dot_library``), one per set of options."""
    return jax.jit(_generate, static_argnames=("cfg", "settings", "compute_dtype", "cache_shardings"),
                   compiler_options=dict(options) or None)


def program_for(compute_dtype: Any) -> Any:
    """The jitted generation program for a model computing in ``compute_dtype``."""
    return _program(tuple(sorted((dot_library.decode_compiler_options(compute_dtype) or {}).items())))


def _cache_sharding(model: Any, rows: int) -> NamedSharding:
    """[L, rows, S, K, Hd]: rows over the batch axes and kv heads over ``tensor`` when they divide."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, rows, 1, cfg.num_key_value_heads, cfg.head_dim)
    axes = (None, "batch", None, "kv_heads", None)
    return sharding.named_sharding(model.mesh, sharding.fit_axes(model.mesh, shape, axes))


def default_eos_token_ids(model: Any) -> tuple[int, ...]:
    """EOS ids from config.json, generation_config.json (next to the checkpoint) and the tokenizer."""
    ids = list(model.config.eos_token_ids)
    gen_file = Path(model.path) / "generation_config.json" if getattr(model, "path", None) else None
    if gen_file is not None and gen_file.exists():
        value = json.loads(gen_file.read_text()).get("eos_token_id")
        ids += value if isinstance(value, list) else [] if value is None else [value]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def _default_pad(model: Any, eos: tuple[int, ...]) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    for candidate in (model.config.pad_token_id, tokenizer.pad_token_id if tokenizer is not None else None,
                      *eos[:1]):
        if candidate is not None:
            return int(candidate)
    return 0


PREFIX_QUANTUM = 16  # shared prefixes are cut to a multiple of this, so that near-equal ones share a compile


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens ``generate`` prefills once for all ``prompts``: their common prefix, cut to a
    multiple of ``PREFIX_QUANTUM`` and leaving every prompt at least one token of its own; 0 for fewer than
    two prompts or a prefix under ``PREFIX_QUANTUM``.

    Example:
        >>> shared_prefix_length([[1] * 40 + [2], [1] * 40 + [3, 4]])
        32
    """
    if len(prompts) < 2:
        return 0
    # commonprefix compares only the lexicographic min and max, so the prompts must be of one type (lists).
    common = min(len(os.path.commonprefix([list(p) for p in prompts])), min(map(len, prompts)) - 1)
    return common // PREFIX_QUANTUM * PREFIX_QUANTUM


def generate_detailed(model: Any, prompts: Sequence[Sequence[int]], adapter: Any = None, *,
                      max_new_tokens: int = 64, min_new_tokens: int = 0, method: str = "greedy",
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 4,
                      length_penalty: float = 1.0, early_stopping: bool | str = False,
                      eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
                      prompt_bucket: int = 64, bucket_batch: bool = True, share_prefix: bool = True,
                      output_logits: bool = False) -> Generation:
    """``generate`` (same arguments) that can also return each step's raw logits (greedy/sample only).

    Example:
        >>> out = generate_detailed(model, [[1, 5, 9]], max_new_tokens=8, output_logits=True)
        >>> out.logits[0].shape  # (8, vocab) unless EOS came first
    """
    if method not in METHODS:
        raise ValueError(f"method '{method}' is not one of {METHODS}")
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
                         f"got {max_new_tokens} and {min_new_tokens}")
    if method == "sample" and (temperature <= 0 or top_k < 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0, top_k >= 0, 0 < top_p <= 1; "
                         f"got {temperature}, {top_k}, {top_p}")
    if method == "beam" and (num_beams < 1 or output_logits):
        raise ValueError("beam search needs num_beams >= 1 and does not return logits")
    prompts = [list(map(int, p)) for p in prompts]
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    if not prompts:
        return Generation([], [] if output_logits else None)
    eos = default_eos_token_ids(model) if eos_token_ids is None else tuple(int(e) for e in eos_token_ids)
    pad = _default_pad(model, eos) if pad_token_id is None else int(pad_token_id)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    sampling = method == "sample"
    prefix = shared_prefix_length(prompts) if share_prefix else 0
    settings = DecodeSettings(method, max_new_tokens, min_new_tokens, int(top_k) if sampling else 0,
                              sampling and top_p < 1.0, int(num_beams) if method == "beam" else 0, output_logits,
                              prefix)
    params = DecodeParams(
        eos_E=jnp.asarray(eos or (-1,), jnp.int32), pad_token_id=jnp.int32(pad),
        temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), length_penalty=jnp.float32(length_penalty),
        stop_when_full=jnp.bool_(early_stopping is True), never_stop_early=jnp.bool_(early_stopping == "never"))

    # Row layout: the shared prefix at slots [0, prefix), then each prompt's rest left-padded to the bucket.
    length = prefix + bucket_length(max(map(len, prompts)) - prefix, minimum=prompt_bucket)
    batch = 1 << (len(prompts) - 1).bit_length() if bucket_batch else len(prompts)
    shards = sharding.batch_shards(model.mesh)
    batch = -(-batch // shards) * shards  # filler rows (inactive) so that the batch axes divide the batch
    ids_BxP = np.full((batch, length), pad, np.int32)
    mask_BxP = np.zeros((batch, length), np.int32)
    mask_BxP[len(prompts):, -1] = 1  # filler rows get one token so that no attention row is fully masked
    for i, prompt in enumerate(prompts):
        ids_BxP[i, :prefix], mask_BxP[i, :prefix] = prompt[:prefix], 1
        ids_BxP[i, length - len(prompt) + prefix:] = prompt[prefix:]
        mask_BxP[i, length - len(prompt) + prefix:] = 1
    active_B = np.arange(batch) < len(prompts)
    ids_BxP, mask_BxP, active_B = (jax.device_put(x, sharding.batch_sharding(model.mesh, batch, x.ndim))
                                   for x in (ids_BxP, mask_BxP, active_B))
    rows = batch * (num_beams if method == "beam" else 1)
    with jax.set_mesh(model.mesh):  # traced with the mesh set: the model pins activations to the batch axes
        program = program_for(model.activation_dtype)
        tokens_BxN, lengths_B, logits_BxNxV = program(
            model.config, settings, params, model.compute_dtype,
            (_cache_sharding(model, batch), _cache_sharding(model, rows)), model.weights, adapter,
            ids_BxP, mask_BxP, active_B, jax.random.key(seed))

    tokens_BxN, lengths_B = np.asarray(tokens_BxN), np.asarray(lengths_B)
    logits_BxNxV = None if logits_BxNxV is None else np.asarray(logits_BxNxV)
    out_tokens, out_logits = [], []
    for i in range(len(prompts)):
        row = tokens_BxN[i, : lengths_B[i]].tolist()
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        out_tokens.append(row if stop is None else row[:stop])
        if logits_BxNxV is not None:
            out_logits.append(logits_BxNxV[i, : len(row) if stop is None else stop + 1])
    return Generation(out_tokens, out_logits if output_logits else None)


def generate(model: Any, prompts: Sequence[Sequence[int]], adapter: Any = None, *, max_new_tokens: int = 64,
             min_new_tokens: int = 0, method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_beams: int = 4, length_penalty: float = 1.0,
             early_stopping: bool | str = False, eos_token_ids: Sequence[int] | None = None,
             pad_token_id: int | None = None, seed: int = 0, prompt_bucket: int = 64,
             bucket_batch: bool = True, share_prefix: bool = True) -> list[list[int]]:
    """New tokens for each prompt (token ids), by greedy decoding, sampling or beam search.

    Args:
        model: a ``models.model.Model`` (config, weights, mesh, compute_dtype; tokenizer/path for EOS defaults).
        prompts: token ids per prompt, of any lengths (left-padded internally).
        adapter: any adapter with ``.deltas(cfg)`` (LoRA, MELoRA, a merge), or None for the base model.
        max_new_tokens, min_new_tokens: bounds on the new tokens (EOS is masked out before the minimum).
        method: "greedy", "sample" (``temperature``, ``top_k`` 0 = off, ``top_p`` 1 = off, ``seed``) or
            "beam" (``num_beams``, ``length_penalty``, ``early_stopping`` False / True / "never", as transformers).
        eos_token_ids: stop tokens (default: config.json, generation_config.json and the tokenizer's EOS).
        pad_token_id: filler id (default: config, tokenizer, first EOS); invisible in the output.
        prompt_bucket: prompts pad to ``bucket_length(longest, minimum=prompt_bucket)`` (after the shared prefix,
            when there is one) so lengths share compiles.
        bucket_batch: pad the batch to a power of two, for the same reason.
        share_prefix: prefill the prompts' common leading tokens (``shared_prefix_length``) once for the batch.

    Returns:
        Per prompt, the new token ids, stopping before the first EOS (the EOS itself is not included).

    Example:
        >>> generate(model, [[1, 72, 101], [1, 5]], max_new_tokens=16)
        [[...], [...]]
        >>> generate(model, prompts, adapter, method="beam", num_beams=4, length_penalty=0.6)
    """
    return generate_detailed(
        model, prompts, adapter, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, method=method,
        temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, seed=seed,
        prompt_bucket=prompt_bucket, bucket_batch=bucket_batch, share_prefix=share_prefix).tokens


def generate_text(model: Any, texts: Sequence[str], adapter: Any = None, *, add_special_tokens: bool = True,
                  skip_special_tokens: bool = True, **kwargs: Any) -> list[str]:
    """Tokenizes ``texts`` with ``model.tokenizer``, generates, and decodes the new tokens.

    Example:
        >>> generate_text(model, ["Summarize: the cat sat on the mat.\\nTL;DR:"], max_new_tokens=32)
    """
    if model.tokenizer is None:
        raise ValueError("generate_text needs model.tokenizer; the checkpoint had no tokenizer files")
    prompts = [model.tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    new_tokens = generate(model, prompts, adapter, **kwargs)
    return model.tokenizer.batch_decode(new_tokens, skip_special_tokens=skip_special_tokens)
