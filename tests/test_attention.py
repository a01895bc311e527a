"""The GPU attention path (``fused_attention``: jax.nn.dot_product_attention, cuDNN on a GPU) against the
kernel the CPU runs, before a GPU ever runs it: the same call with ``implementation="xla"`` here, values and
gradients, for the masks the model builds (causal with left or right padding, packed segments, a sliding
window) and grouped-query heads. float32; tolerance 2e-5 relative to the largest value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_merge_jax.models import attention as attention_lib

B, T, H, K, HD = 2, 80, 6, 2, 16  # T > 64: the CPU kernel runs in causal query chunks
TOL = 2e-5


def _masks(rng, kind):
    causal = np.tril(np.ones((T, T), bool))
    valid = np.ones((B, T), bool)
    if kind == "right_padding":
        valid[0, 60:] = False
    elif kind == "left_padding":
        valid[1, :17] = False
    mask = causal[None] & valid[:, None, :]
    if kind == "segments":
        segments = np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0)
        segments[1, : T // 2] = 1
        mask &= segments[:, :, None] == segments[:, None, :]
    if kind == "window":
        distance = np.arange(T)[:, None] - np.arange(T)[None, :]
        mask &= (distance < 24)[None]
    return jnp.asarray(mask)


def _assert_matches_fused(q, k, v, d_out, mask):
    """``attention`` (the CPU kernel, causal) against ``fused_attention`` with XLA's implementation: outputs and
    the gradients of sum(out * d_out) within TOL of the largest value."""

    def loss(fn, q, k, v):
        out = fn(q, k, v, mask, True)
        # Rows with no key at all (left padding) differ by convention and feed no loss in the model.
        return jnp.sum(out * d_out * mask.any(-1)[..., None]), out

    ours = jax.value_and_grad(lambda *a: loss(attention_lib.attention, *a), argnums=(0, 1, 2), has_aux=True)
    fused = jax.value_and_grad(
        lambda *a: loss(lambda *b: attention_lib.fused_attention(*b, implementation="xla"), *a),
        argnums=(0, 1, 2), has_aux=True)
    (_, out_ours), grads_ours = jax.jit(ours)(q, k, v)
    (_, out_fused), grads_fused = jax.jit(fused)(q, k, v)
    live = np.asarray(mask.any(-1))[..., None]
    np.testing.assert_allclose(np.asarray(out_fused) * live, np.asarray(out_ours) * live,
                               atol=TOL * float(np.abs(out_ours).max()))
    for name, g_fused, g_ours in zip("qkv", grads_fused, grads_ours):
        np.testing.assert_allclose(g_fused, g_ours, atol=TOL * float(np.abs(g_ours).max()), err_msg=name)


@pytest.mark.parametrize("kind", ["plain", "right_padding", "left_padding", "segments", "window"])
def test_fused_path_matches_the_cpu_kernel(kind, rng):
    q, k, v, d_out = (jnp.asarray(rng.normal(size=s), jnp.float32)
                      for s in ((B, T, H, HD), (B, T, K, HD), (B, T, K, HD), (B, T, H * HD)))
    _assert_matches_fused(q, k, v, d_out, _masks(rng, kind))


def test_causal_queries_after_a_cached_prefix_match_the_fused_path(rng):
    # A prompt's rest after a shared prefix: T = 80 queries at the last of S = 112 slots, in causal chunks that
    # each end at their last query's slot; the prefix (and left padding in row 1) is seen by every query.
    prefix = 32
    q, k, v, d_out = (jnp.asarray(rng.normal(size=s), jnp.float32)
                      for s in ((B, T, H, HD), (B, prefix + T, K, HD), (B, prefix + T, K, HD), (B, T, H * HD)))
    slots_T, keys_S = prefix + np.arange(T), np.arange(prefix + T)
    valid = np.ones((B, prefix + T), bool)
    valid[1, prefix:prefix + 9] = False
    mask = jnp.asarray((keys_S[None, :] <= slots_T[:, None])[None] & valid[:, None, :])
    assert attention_lib._chunks(T, prefix + T, True)[0] == (0, 64, prefix + 64)
    assert bool(mask.any(-1).all())  # every query sees the prefix: all rows are compared
    _assert_matches_fused(q, k, v, d_out, mask)


def test_cpu_and_float32_never_take_the_fused_kernel():
    assert not attention_lib.uses_fused_kernel(jnp.float32)
    if jax.default_backend() != "gpu":
        assert not attention_lib.uses_fused_kernel(jnp.bfloat16)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs an NVIDIA GPU")
def test_cudnn_kernel_matches_xla_in_bfloat16(rng):
    """On a GPU: the model's bfloat16 attention (cuDNN) against the XLA implementation of the same call,
    values and gradients within bfloat16 rounding (2e-2 of the largest value)."""
    q, k, v, d_out = (jnp.asarray(rng.normal(size=s), jnp.bfloat16)
                      for s in ((B, T, H, HD), (B, T, K, HD), (B, T, K, HD), (B, T, H * HD)))
    mask = _masks(rng, "right_padding")
    assert attention_lib.uses_fused_kernel(jnp.bfloat16)

    def run(impl):
        def loss(q, k, v):
            out = attention_lib.fused_attention(q, k, v, mask, True, implementation=impl)
            return jnp.sum((out * d_out).astype(jnp.float32)), out
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    for got, want in zip(run("cudnn"), run("xla")):
        np.testing.assert_allclose(got, want, atol=2e-2 * float(np.abs(want).max()))
