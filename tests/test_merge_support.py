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
def sources(model, tmp_path_factory, module_rng):
    """A trained-looking MELoRA saved through PEFT, and a padded PEFT LoRA written by PEFT itself."""
    rng = module_rng
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


def test_pruned_merge_keeps_the_melora_blocks_and_prunes_half_of_the_real_parameters(model, sources, rng):
    _, melora_dir, padded_dir = sources
    tasks = [lmj.load_peft_adapter(melora_dir, model), lmj.load_peft_adapter(padded_dir, model)]
    merged = lmj.merge_for_training(tasks, "task_layer")
    support_a, support_b = jax.device_get((merged.support_a, merged.support_b))
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, decay="constant"), STEPS)
    state = init_state(merged, tx, seed=0, extra=pruning.init_statistics(PRUNE, merged))
    step_fn = make_train_step(model.config, tx, post_update=pruning.make_post_update(
        PRUNE, STEPS, model.config.num_hidden_layers))
    step = jit_train_step(step_fn, state, model.weights, model.config, model.mesh, 8)
    state = jax.device_put(state, step.state_shardings)
    for _ in range(STEPS):
        state, _ = step(state, random_batch(rng, batch=8, length=16, vocab=model.config.vocab_size))
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


def _expected_components(merged, stats_a, stats_b, criterion, target):
    """numpy: per (projection, layer), the components kept when the lowest-scoring live ones are pruned to
    ``target`` of the live components, each scored over its supported entries only."""
    gains = {n: np.asarray(d.gain_R) for n, d in merged.deltas(None).items()}
    keep = {}
    for n in TARGETS:
        a, b = np.asarray(merged.a[n], np.float64), np.asarray(merged.b[n], np.float64)
        sa, sb = np.asarray(merged.support_a[n]), np.asarray(merged.support_b[n])
        ma, mb = np.asarray(merged.mask_a[n]), np.asarray(merged.mask_b[n])
        layers, _, rank = a.shape
        keep[n] = np.zeros((layers, rank), bool)
        for layer in range(layers):
            scores, alive, live = [], [], []
            for r in range(rank):
                col_a, row_b = sa[layer, :, r] > 0, sb[layer, r, :] > 0
                live.append(col_a.any() or row_b.any())
                alive.append(live[-1] and ((ma[layer, :, r] * sa[layer, :, r]).any()
                                           or (mb[layer, r, :] * sb[layer, r, :]).any()))
                if criterion == "magnitude":
                    scores.append(abs(gains[n][layer, r]) * np.linalg.norm(a[layer, col_a, r])
                                  * np.linalg.norm(b[layer, r, row_b]))
                else:
                    scores.append(stats_a[n][layer, col_a, r].sum() + stats_b[n][layer, r, row_b].sum())
            to_prune = int(np.floor(target * sum(live))) - (sum(live) - sum(alive))
            order = [r for r in np.argsort(scores, kind="stable") if alive[r]]
            for r in order[max(to_prune, 0):]:
                keep[n][layer, r] = True
    return keep


@pytest.mark.parametrize("criterion", ["magnitude", "sensitivity"])
@pytest.mark.parametrize("source", ["melora", "lora"])
def test_component_pruning_scores_each_component_over_its_own_parameters(model, sources, source, criterion, rng):
    """Component granularity against numpy: a MELoRA source's structural zeros are not part of a component
    (before the fix every MELoRA component scored -inf and was pruned in index order, whatever its values),
    and a component pruned earlier stays pruned and counts toward the target."""
    _, melora_dir, padded_dir = sources
    if source == "melora":
        tasks = [lmj.load_peft_adapter(melora_dir, model), lmj.load_peft_adapter(melora_dir, model)]
    else:
        dense = lmj.init_lora(model.config, jax.random.key(int(rng.integers(2**31))), rank=3,
                              target_modules=list(TARGETS))
        tasks = [lmj.load_peft_adapter(padded_dir, model), _random_b(dense, rng)]
    merged = jax.device_get(lmj.merge_for_training(tasks, "task_layer"))
    support_a, support_b = merged.support_a, merged.support_b
    # Distinct random values on every parameter (no ties), structural zeros kept at zero.
    a = {n: (rng.normal(size=v.shape) * support_a[n]).astype(np.float32) for n, v in merged.a.items()}
    b = {n: (rng.normal(size=v.shape) * support_b[n]).astype(np.float32) for n, v in merged.b.items()}
    mask_a, mask_b = {n: np.array(v) for n, v in support_a.items()}, {n: np.array(v) for n, v in support_b.items()}
    for n in TARGETS:  # prune one live component of every layer beforehand
        for layer in range(model.config.num_hidden_layers):
            live = np.flatnonzero(support_a[n][layer].any(axis=0) | support_b[n][layer].any(axis=1))
            if live.size:
                r = rng.choice(live)
                mask_a[n][layer, :, r] = 0
                mask_b[n][layer, r, :] = 0
                a[n][layer, :, r] = 0
                b[n][layer, r, :] = 0
    merged = merged.replace(a=a, b=b, mask_a=mask_a, mask_b=mask_b)
    # Sensitivities everywhere, structural entries included: they must not count.
    stats_a = {n: rng.uniform(0.1, 1.0, v.shape).astype(np.float32) for n, v in a.items()}
    stats_b = {n: rng.uniform(0.1, 1.0, v.shape).astype(np.float32) for n, v in b.items()}
    stats = {"sensitivity": pruning.FactorScores(a=stats_a, b=stats_b)}
    cfg = lmj.PruneConfig(criterion=criterion, granularity="component", scope="module", final_sparsity=0.5)
    target_L = jnp.full((model.config.num_hidden_layers,), 0.5)
    got_a, got_b = jax.device_get(pruning.new_masks(cfg, merged, stats, target_L))
    want = _expected_components(merged, stats_a, stats_b, criterion, 0.5)
    for n in TARGETS:
        kept = (got_a[n] * support_a[n]).any(axis=1) | (got_b[n] * support_b[n]).any(axis=2)
        np.testing.assert_array_equal(kept, want[n], err_msg=f"{source} {criterion} {n}")
        # A pruned component is pruned whole: its column of A and row of B.
        np.testing.assert_array_equal(got_a[n], mask_a[n] * kept[:, None, :])
        np.testing.assert_array_equal(got_b[n], mask_b[n] * kept[:, :, None])
