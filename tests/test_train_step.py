"""The train step: its first loss against transformers, learning, frozen base, sharding, accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import lora_merge_jax as lmj
from lora_merge_jax import tiny
from lora_merge_jax.sharding import MeshConfig, make_mesh
from lora_merge_jax.training.optim import OptimConfig, make_optimizer
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step
from tests.train_helpers import leaves, random_batch

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


def _trainer(model, lr=1e-2, steps=50, batch_size=8, **lora):
    adapter = lmj.init_lora(model.config, jax.random.key(0), rank=4, target_modules=TARGETS, **lora)
    tx = make_optimizer(OptimConfig(learning_rate=lr, decay="constant"), steps)
    state = init_state(adapter, tx, seed=0)
    step = jit_train_step(make_train_step(model.config, tx), state, model.weights, model.config, model.mesh, batch_size)
    return state, step


def _sgd_trainer(model, batch_size=8, remat=False, max_target_tokens=None):
    """A step whose update is linear in the gradient, for comparing two ways of computing it: Adam divides by
    sqrt(v), which scales float32 rounding in a near-zero gradient up to the learning rate."""
    adapter = lmj.init_lora(model.config, jax.random.key(0), rank=4, target_modules=TARGETS)
    adapter = adapter.replace(b={n: 0.1 * jax.random.normal(jax.random.key(i), b.shape)
                                 for i, (n, b) in enumerate(adapter.b.items())})
    tx = optax.sgd(0.5)
    state = init_state(adapter, tx, seed=0)
    step_fn = make_train_step(model.config, tx, remat=remat, max_target_tokens=max_target_tokens)
    return state, jit_train_step(step_fn, state, model.weights, model.config, model.mesh, batch_size)


def test_first_loss_equals_transformers_target_loss(tiny_dir, rng):
    """B = 0 at init, so the first step's loss is the base model's target-token loss, which torch computes."""
    model = lmj.load_pretrained(tiny_dir)
    state, step = _trainer(model)
    batch = random_batch(rng)
    _, metrics = step(state, batch)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor(batch["input_ids"][0], dtype=torch.long)
    labels = torch.where(torch.tensor(batch["target_mask"][0]) == 1, ids, torch.tensor(-100))
    with torch.no_grad():
        ref = ref_model(ids, labels=labels).loss.item()  # mean over target tokens, shifted as ours
    assert abs(float(metrics["loss"]) - ref) < 1e-4


def test_loss_falls_on_a_learnable_task(tiny_dir, rng):
    model = lmj.load_pretrained(tiny_dir)
    state, step = _trainer(model, lr=2e-2)
    batch = random_batch(rng, vocab=12)  # a fixed batch: memorisable
    first = None
    for _ in range(40):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.6 * first


def test_no_gradient_buffer_for_base_weights(tmp_path, rng):
    """Weights dominate this model, so a base-weight gradient would double the memory; ours stays small.

    The step's temporaries hold one layer's weight slices (the scan's dynamic slices), about 1/L of them.
    """
    path = tiny.make_tiny_model(tmp_path / "wide", hidden=128, ffw=512, layers=8)
    model = lmj.load_pretrained(path)
    state, step = _trainer(model, batch_size=8)
    batch = random_batch(rng, batch=8, length=8)
    compiled = step.jitted.lower(state, model.weights, batch).compile()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.weights))
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * weight_bytes  # a gradient of the base weights alone would be 100%
    # The control: differentiating the base weights too needs a buffer at least the size of the largest weight.
    from lora_merge_jax.models import decoder, losses

    def base_loss(weights, ids):
        logits, _ = decoder.apply_model(model.config, weights, ids)
        return losses.mean_token_nll(logits, ids, jnp.ones_like(ids))

    full = jax.jit(jax.grad(base_loss)).lower(model.weights, batch["input_ids"][0]).compile()
    assert full.memory_analysis().temp_size_in_bytes + full.memory_analysis().output_size_in_bytes >= weight_bytes


def test_eight_devices_match_one(tiny_dir, rng):
    batch = random_batch(rng)
    results = []
    for mesh_cfg, devices in ((MeshConfig(), jax.devices()[:1]), (MeshConfig(data=2, fsdp=2, tensor=2), None)):
        model = lmj.load_pretrained(tiny_dir, mesh=make_mesh(mesh_cfg, devices))
        state, step = _trainer(model)
        for _ in range(10):
            state, _ = step(state, batch)
        results.append(leaves(state.trainable))
    for one, many in zip(*results):
        np.testing.assert_allclose(one, many, atol=2e-5, rtol=1e-4)


def test_gradient_accumulation_equals_one_big_batch(tiny_dir, rng):
    model = lmj.load_pretrained(tiny_dir)
    big = random_batch(rng, batch=16)
    micro = {k: v.reshape(2, 8, -1) for k, v in big.items()}
    outs = []
    for batch in (big, micro):
        state, step = _sgd_trainer(model, batch_size=batch["input_ids"].shape[1])
        for _ in range(3):
            state, metrics = step(state, batch)
        outs.append((leaves(state.trainable), float(metrics["loss"])))
    assert abs(outs[0][1] - outs[1][1]) < 1e-5
    for a, b in zip(outs[0][0], outs[1][0]):  # float32 sums in another order: ~1e-7 relative per step
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped_and_counted(tiny_dir, rng):
    model = lmj.load_pretrained(tiny_dir)
    state, step = _trainer(model)
    batch = random_batch(rng)
    state, _ = step(state, batch)
    before = leaves((state.trainable, state.opt_state))
    poisoned = jax.tree.map(lambda w: w.at[(0,) * w.ndim].set(jnp.nan), model.weights)
    state, metrics = step.jitted(state, poisoned, batch)
    assert not bool(metrics["finite"])
    assert int(state.skipped) == 1 and int(state.skipped_in_a_row) == 1
    for a, b in zip(before, leaves((state.trainable, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(state.skipped_in_a_row) == 0


def test_adapter_and_optimizer_stay_float32_with_bfloat16_base(tiny_dir, rng):
    model = lmj.load_pretrained(tiny_dir, dtype="bfloat16")
    state, step = _trainer(model)
    state, metrics = step(state, random_batch(rng))
    assert np.isfinite(float(metrics["loss"]))
    assert {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state)) if x.ndim > 0} == {jnp.dtype("float32")}
    

def test_remat_changes_memory_not_results(tiny_dir, rng):
    model = lmj.load_pretrained(tiny_dir)
    batch = random_batch(rng)
    outs = []
    for remat in (False, True):
        state, step = _sgd_trainer(model, remat=remat)
        for _ in range(2):
            state, metrics = step(state, batch)
        outs.append((leaves(state.trainable), float(metrics["loss"])))
    assert abs(outs[0][1] - outs[1][1]) < 1e-6
    # Recomputed activations may be partitioned and fused differently: float32 rounding, ~1e-7 relative.
    for a, b in zip(outs[0][0], outs[1][0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fsdp_step_keeps_logits_sharded_by_batch():
    """On an fsdp mesh the step gathers the LM head weight, never the logits of the whole global batch.

    Compiled ahead of time from abstract inputs; XLA's buffer assignment is the reference. Each device's
    share of the float32 logits is 1/8 of the global [B, T, V]; a partitioner left free gathered them all.
    """
    from lora_merge_jax.models import weights as weights_lib
    from lora_merge_jax.models.config import from_hf_config

    cfg = from_hf_config(tiny.tiny_hf_config(vocab_size=8192, layers=1))
    mesh = make_mesh(MeshConfig(fsdp=8))
    weights = weights_lib.abstract(cfg, jnp.float32, mesh)
    adapter = jax.eval_shape(lambda: lmj.init_lora(cfg, jax.random.key(0), rank=4, target_modules=TARGETS))
    tx = make_optimizer(OptimConfig(learning_rate=1e-3), 10)
    state = jax.eval_shape(lambda a: init_state(a, tx, seed=0), adapter)
    step = jit_train_step(make_train_step(cfg, tx), state, weights, cfg, mesh, 8)
    ids = jax.ShapeDtypeStruct((1, 8, 64), jnp.int32)
    compiled = step.jitted.lower(state, weights, {"input_ids": ids, "attention_mask": ids, "target_mask": ids})
    temp_bytes = compiled.compile().memory_analysis().temp_size_in_bytes
    global_logits_bytes = 8 * 64 * cfg.vocab_size * 4
    assert temp_bytes < global_logits_bytes / 2, (temp_bytes, global_logits_bytes)


def _ragged_batch(rng: np.random.Generator, micro: int = 2, batch: int = 8, length: int = 24) -> dict:
    """Right-padded rows of random lengths, prompt lengths and target lengths."""
    ids = rng.integers(4, 100, (micro, batch, length)).astype(np.int32)
    attention, target = np.zeros_like(ids), np.zeros_like(ids)
    for m in range(micro):
        for b in range(batch):
            n = rng.integers(12, length + 1)
            attention[m, b, :n] = 1
            target[m, b, rng.integers(2, n - 1):n] = 1
    return {"input_ids": ids, "attention_mask": attention, "target_mask": target}


def test_lm_head_on_target_positions_only_gives_the_same_step(tiny_dir, rng):
    """With max_target_tokens the LM head runs on the target positions only: the same loss and gradients."""
    model = lmj.load_pretrained(tiny_dir)
    batch = _ragged_batch(rng)
    bound = int(batch["target_mask"][..., 1:].sum(-1).max())
    grads, losses_ = [], []
    for max_target_tokens in (None, bound):
        state, step = _sgd_trainer(model, max_target_tokens=max_target_tokens)
        before = leaves(state.trainable)
        state, metrics = step(state, batch)
        grads.append([b - a for b, a in zip(before, leaves(state.trainable))])
        losses_.append((float(metrics["loss"]), float(metrics["target_tokens"])))
    assert losses_[0][1] == losses_[1][1] == batch["target_mask"][..., 1:].sum()
    # float32 sums over [B, T - 1] or [B, M] positions: rounding of order 1e-7 relative.
    assert abs(losses_[0][0] - losses_[1][0]) < 1e-5 * abs(losses_[0][0])
    for full, selective in zip(*grads):
        np.testing.assert_allclose(selective, full, rtol=1e-4, atol=1e-6 * np.abs(full).max())
    state, step = _sgd_trainer(model, max_target_tokens=bound - 1)
    with pytest.raises(ValueError, match=f"{bound} target tokens, over the max_target_tokens={bound - 1}"):
        step(state, batch)
