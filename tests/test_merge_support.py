"""Task adapters whose factors hold structural zeros: what the adaptive merge fine-tunes and prunes.

A MELoRA source reaches the merge through PEFT as a block-diagonal LoRA; a PEFT adapter with
``rank_pattern`` or ``layers_to_transform`` is zero-padded. Only the task adapters' parameters may be
fine-tuned and counted by the pruning schedule. The references are PEFT's own files (the tensors it stores
for each module) and the MELoRA's block geometry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import lora_merge_jax as lmj
from lora_merge_jax.merge import adaptive, pruning
from lora_merge_jax.training.optim import OptimConfig, make_optimizer
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step
from tests import hf_models
from tests.train_helpers import random_batch

TARGETS = ("q_proj", "down_proj")
BLOCKS, BLOCK_RANK = 4, 2  # the MELoRA source: rank 4 * 2 = 8 as a PEFT LoRA
STEPS = 6
PRUNE = lmj.PruneConfig(criterion="sensitivity", granularity="parameter", scope="module", final_sparsity=0.5,
                        every=2, end_step=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3")
    hf_models.save_tiny("llama3", path)
    return lmj.load_pretrained(path, load_tokenizer=False)


def _random_b(adapter, rng):
    return adapter.replace(b={n: jnp.asarray(rng.normal(0.0, 0.2, v.shape), jnp.float32)
                              for n, v in adapter.b.items()})


@pytest.fixture(scope="module")
def sources(model, tmp_path_factory):
    """A trained-looking MELoRA saved through PEFT, and a padded PEFT LoRA written by PEFT itself."""
    rng = np.random.default_rng()
    root = tmp_path_factory.mktemp("sources")
    melora = _random_b(lmj.init_melora(model.config, jax.random.key(int(rng.integers(2**31))), num_blocks=BLOCKS,
                                       rank=BLOCK_RANK, alpha=4.0, target_modules=list(TARGETS)), rng)
    lmj.save_peft_adapter(melora, root / "melora", model)

    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), layers_to_transform=[1],
                           rank_pattern={"down_proj": 2})
    peft_model = peft.get_peft_model(hf_models.build("llama3"), conf)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_B." in name:  # PEFT starts B at 0; a trained source has none left
                torch.nn.init.normal_(p, std=0.1, generator=gen)
    peft_model.save_pretrained(root / "padded")
    return melora, root / "melora", root / "padded"


def _peft_parameters(directory, layer, proj):
    """Entries PEFT stores for one module (its lora_A and lora_B), read from its own safetensors file."""
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    return sum(v.size for k, v in tensors.items() if f"layers.{layer}." in k and f".{proj}." in k)


def test_factor_support_separates_padding_structure_and_an_untrained_b():
    a = np.zeros((1, 4, 3), np.float32)
    b = np.zeros((1, 3, 5), np.float32)
    a[0, :, 0] = [1, 2, 3, 4]  # slot 0: a LoRA whose B was never trained (all zero): all of it is trainable
    # slot 1: all zero in A and B: padding
    a[0, :2, 2] = [5, 6]  # slot 2: a block of a block-diagonal factor pair
    b[0, 2, 3:] = [7, 8]
    support_a, support_b = (np.asarray(s) for s in adaptive.factor_support(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_array_equal(support_a[0], [[1, 0, 1], [1, 0, 1], [1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(support_b[0], [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1]])


def test_support_counts_exactly_the_parameters_of_each_source(model, sources):
    melora, melora_dir, padded_dir = sources
    tasks = [lmj.load_peft_adapter(melora_dir, model), lmj.load_peft_adapter(padded_dir, model)]
    merged = lmj.merge_for_training(tasks)
    melora_rank = BLOCKS * BLOCK_RANK
    for name in TARGETS:
        for layer in range(model.config.num_hidden_layers):
            per_task = [int(np.sum(s[name][layer, ..., :melora_rank]) if axis == "a"
                            else np.sum(s[name][layer, :melora_rank])) for axis, s in
                        (("a", merged.support_a), ("b", merged.support_b))]
            melora_params = melora.a[name][layer].size + melora.b[name][layer].size
            assert sum(per_task) == melora_params, (name, layer)
            live = int(np.sum(merged.support_a[name][layer]) + np.sum(merged.support_b[name][layer]))
            assert live - melora_params == _peft_parameters(padded_dir, layer, name), (name, layer)
        np.testing.assert_array_equal(np.asarray(merged.mask_a[name]), np.asarray(merged.support_a[name]))
    for s in jax.tree.leaves(merged.sparsity()):
        np.testing.assert_array_equal(np.asarray(s), 0.0)


def test_pruned_merge_keeps_the_melora_blocks_and_prunes_half_of_the_real_parameters(model, sources):
    _, melora_dir, padded_dir = sources
    rng = np.random.default_rng()
    tasks = [lmj.load_peft_adapter(melora_dir, model), lmj.load_peft_adapter(padded_dir, model)]
    merged = lmj.merge_for_training(tasks, "task_layer")
    support_a, support_b = jax.device_get((merged.support_a, merged.support_b))
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, decay="constant"), STEPS)
    state = init_state(merged, tx, seed=0, extra=pruning.init_statistics(PRUNE, merged))
    step_fn = make_train_step(model.config, tx, post_update=pruning.make_post_update(
        PRUNE, STEPS, model.config.num_hidden_layers))
    step = jit_train_step(step_fn, state, model.weights, model.config, model.mesh, 4)
    state = jax.device_put(state, step.state_shardings)
    for _ in range(STEPS):
        state, _ = step(state, random_batch(rng, batch=4, length=16, vocab=model.config.vocab_size))
    state = jax.device_get(state)
    sparsity = state.adapter.sparsity()
    for name in TARGETS:
        a, b = state.trainable.a[name], state.trainable.b[name]
        assert np.all(a[support_a[name] == 0] == 0.0) and np.all(b[support_b[name] == 0] == 0.0), \
            f"{name}: fine-tuning grew entries that no source has"
        assert np.all(state.frozen.mask_a[name] <= support_a[name])
        live_L = np.sum(support_a[name], axis=(1, 2)) + np.sum(support_b[name], axis=(1, 2))
        kept_L = np.sum(state.frozen.mask_a[name], axis=(1, 2)) + np.sum(state.frozen.mask_b[name], axis=(1, 2))
        np.testing.assert_array_equal(live_L - kept_L, np.floor(0.5 * live_L), err_msg=name)
        np.testing.assert_allclose(np.asarray(sparsity[name]), np.floor(0.5 * live_L) / np.maximum(live_L, 1),
                                   rtol=1e-6)  # float32 division


@pytest.mark.parametrize("scope", ["module", "layer", "global"])
def test_every_scope_prunes_its_share_of_the_real_parameters_only(model, sources, scope):
    """One masking round at 50% from fresh masks: each scope's group loses floor(0.5 * its parameters)."""
    _, melora_dir, padded_dir = sources
    tasks = [lmj.load_peft_adapter(melora_dir, model), lmj.load_peft_adapter(padded_dir, model)]
    merged = lmj.merge_for_training(tasks)
    cfg = lmj.PruneConfig(criterion="magnitude", scope=scope, final_sparsity=0.5)
    target_L = jnp.full((model.config.num_hidden_layers,), 0.5)
    mask_a, mask_b = jax.device_get(pruning.new_masks(cfg, merged, {}, target_L))
    support_a, support_b = jax.device_get((merged.support_a, merged.support_b))
    for name in TARGETS:
        assert np.all(mask_a[name] <= support_a[name]) and np.all(mask_b[name] <= support_b[name])

    def per_layer(tree):  # {projection: [L]} entries per layer
        return {n: np.sum(v, axis=(1, 2)) for n, v in tree.items()}

    live = {n: per_layer(support_a)[n] + per_layer(support_b)[n] for n in TARGETS}
    kept = {n: per_layer(mask_a)[n] + per_layer(mask_b)[n] for n in TARGETS}
    if scope == "module":
        groups = [(live[n], kept[n]) for n in TARGETS]
    elif scope == "layer":
        groups = [(sum(live.values()), sum(kept.values()))]
    else:
        groups = [(sum(v.sum() for v in live.values()), sum(v.sum() for v in kept.values()))]
    for live_G, kept_G in groups:
        np.testing.assert_array_equal(live_G - kept_G, np.floor(0.5 * live_G), err_msg=scope)
