"""The adaptive merge and its pruning: merged deltas, masks and schedule, training, checkpoints, export, sharding.

Every numerical test draws random task LoRAs (non-zero B) and batches from its seed (conftest's ``rng``;
``module_seed`` for the module's runs), and states its tolerance. One tiny 3-layer model is shared by the
module; the jitted train steps are few (each compile costs seconds on CPU): one pruned run of ``TOTAL`` steps
(parameter granularity, module scope, sensitivity) serves the mask, schedule, optimizer, update, checkpoint
and 8-device tests; one component-granularity run serves the layer-range and per-layer tests; one
frozen-factors run the ablation. Scopes the runs do not cover are checked on ``pruning.new_masks`` directly.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_merge_jax as lmj
from lora_merge_jax import tiny
from lora_merge_jax.merge import adaptive, pruning
from lora_merge_jax.merge import compress as export
from lora_merge_jax.merge.adaptive import MergedLoraAdapter
from lora_merge_jax.sharding import MeshConfig, make_mesh
from lora_merge_jax.training.checkpoint import Checkpointer, abstract_like
from lora_merge_jax.training.optim import OptimConfig, make_optimizer
from lora_merge_jax.training.step import init_state, jit_train_step, make_train_step
from tests.train_helpers import random_batch

TARGETS = ("q_proj", "v_proj", "down_proj")  # three different [in, out] shapes
RANKS = (2, 3, 4)  # the K = 3 task LoRAs' ranks: R = 9 merged components per projection
LAYERS = 3
BATCH = 4
TOTAL = 25  # steps of the main pruned run: pruning at 5, 10, 15 (end), then 10 more steps
PRUNE = pruning.PruneConfig(criterion="sensitivity", granularity="parameter", scope="module",
                            final_sparsity=0.5, every=5, end_step=15)
KEEP_AT = (4, 5, 10, 15, 25)  # steps whose state the main run keeps
RESUME_AT = 10
LOGIT_TOL = 1e-5  # float32 logits of two algebraically equal forwards
DELTA_TOL = 1e-5  # float32 delta-W of two algebraically equal constructions


# ----------------------------------------------------------------------------------------------------------
# Builders


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5, hidden=32, ffw=64, layers=LAYERS)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return lmj.load_pretrained(tiny_dir, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))


def _task_loras(cfg, rng, ranks=RANKS, targets=TARGETS):
    """Task LoRAs with random A (PEFT's init), random non-zero B and random alphas."""
    loras = []
    for r in ranks:
        lora = lmj.init_lora(cfg, jax.random.key(int(rng.integers(2**31))), rank=r,
                             alpha=float(rng.uniform(1.0, 16.0)), target_modules=list(targets))
        b = {n: jnp.asarray(rng.normal(0.0, 0.2, v.shape), jnp.float32) for n, v in lora.b.items()}
        loras.append(lora.replace(b=b))
    return loras


def _device_copy(tree):
    """Fresh device arrays (the train step donates its state; the host copy stays usable)."""
    return jax.tree.map(jnp.asarray, tree)


def _trainer(model, adapter, prune_cfg=PRUNE, trainable_fields=None, steps=TOTAL):
    tx = make_optimizer(OptimConfig(learning_rate=1e-2, decay="constant"), steps)
    extra = pruning.init_statistics(prune_cfg, adapter) if prune_cfg is not None else None
    hook = pruning.make_post_update(prune_cfg, steps, LAYERS) if prune_cfg is not None else None
    state = init_state(adapter, tx, seed=0, trainable_fields=trainable_fields, extra=extra)
    step_fn = make_train_step(model.config, tx, post_update=hook)
    step = jit_train_step(step_fn, state, model.weights, model.config, model.mesh, BATCH)
    # Committed to its shardings, as every later state is: an uncommitted first state compiles the step twice.
    return jax.device_put(state, step.state_shardings), step, step_fn


def _run(step, state, batches, keep_at=(), on_step=None):
    """Runs ``batches``; returns the final state and host copies of the states after steps ``keep_at``."""
    kept = {0: jax.device_get(state)} if 0 in keep_at else {}
    for i, batch in enumerate(batches, 1):
        state, _ = step(state, batch)
        if i in keep_at:
            kept[i] = jax.device_get(state)
        if on_step is not None:
            on_step(i, state)
    return state, kept


def _moments(opt_state):
    """The MergedLoraAdapter-shaped nodes of the optimizer state whose factors are arrays (Adam mu and nu)."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MergedLoraAdapter))
    found = [n for n in nodes if isinstance(n, MergedLoraAdapter) and isinstance(n.a, dict)
             and all(hasattr(v, "shape") for v in n.a.values())]
    assert len(found) == 2, "expected Adam's mu and nu for the factors"
    return found


def _pruned_per_group(state):
    """{projection: [L]} number of pruned entries (A and B together) per layer."""
    return {n: np.sum(1 - state.frozen.mask_a[n], axis=(1, 2)) + np.sum(1 - state.frozen.mask_b[n], axis=(1, 2))
            for n in TARGETS}


def _group_size(adapter, name):
    return adapter.a[name][0].size + adapter.b[name][0].size


@pytest.fixture(scope="module")
def pruned_run(model, tmp_path_factory, module_seed):
    """The main run: TOTAL steps with PRUNE, states kept at KEEP_AT, a checkpoint written at RESUME_AT."""
    rng = np.random.default_rng([module_seed, 0])  # its own stream: the same inputs whichever run is built first
    init = jax.device_get(adaptive.merge_for_training(_task_loras(model.config, rng), "task_layer"))
    batches = [random_batch(rng, batch=BATCH, length=16) for _ in range(TOTAL)]
    state, step, _ = _trainer(model, _device_copy(init))
    abstract = abstract_like(state, step.state_shardings)
    ckpt = Checkpointer(tmp_path_factory.mktemp("ckpt"), keep=2, async_save=False)

    def save(i, s):
        if i == RESUME_AT:
            ckpt.save(i, s, {"index": i})

    _, kept = _run(step, state, batches, keep_at=(0,) + KEEP_AT, on_step=save)
    ckpt.wait()
    yield SimpleNamespace(init=init, batches=batches, kept=kept, step=step, ckpt=ckpt, abstract=abstract)
    ckpt.close()


# ----------------------------------------------------------------------------------------------------------
# 1. The merged delta


def test_merged_delta_is_sum_of_scaled_task_deltas(model, rng):
    """fold(merged) - W == sum_k c_k (fold(lora_k) - W) per projection and layer, to DELTA_TOL, for every
    coefficient granularity with random coefficients (one test: ``fold`` compiles for every new adapter)."""
    loras = _task_loras(model.config, rng)
    base = {n: np.asarray(model.weights.layers.proj[n]) for n in TARGETS}
    task_deltas = [{n: np.asarray(lmj.fold(model, lora).layers.proj[n]) - base[n] for n in TARGETS}
                   for lora in loras]
    for granularity in ("task", "task_layer", "task_module"):
        merged = adaptive.merge_for_training(loras, granularity)
        coefficients = jax.tree.map(lambda c: jnp.asarray(rng.normal(0.0, 1.0, c.shape), jnp.float32),
                                    merged.coefficients)
        folded = lmj.fold(model, merged.replace(coefficients=coefficients)).layers.proj
        for name in TARGETS:
            c = np.asarray(coefficients[name] if granularity == "task_module" else coefficients)
            c_LxK = np.broadcast_to(c, (LAYERS, len(loras)))
            expected = sum(c_LxK[:, k, None, None] * task_deltas[k][name] for k in range(len(loras)))
            assert np.abs(expected).max() > 1e-2  # the deltas are not trivially zero
            np.testing.assert_allclose(np.asarray(folded[name]) - base[name], expected, rtol=0, atol=DELTA_TOL,
                                       err_msg=f"{granularity}: {name}")


def test_one_task_with_coefficient_one_is_the_lora(model, rng):
    (lora,) = _task_loras(model.config, rng, ranks=(3,))
    merged = adaptive.merge_for_training([lora], "task", init_coefficients=1.0)
    ids = rng.integers(4, 100, (2, 12))
    want = np.asarray(lmj.forward(model, ids, adapter=lora))
    np.testing.assert_allclose(np.asarray(lmj.forward(model, ids, adapter=merged)), want, rtol=0, atol=LOGIT_TOL)


# ----------------------------------------------------------------------------------------------------------
# 2. Masks and the schedule (main run: parameter granularity, module scope)


def test_pruned_entries_are_exactly_zero_and_stay_zero(pruned_run):
    end, last = pruned_run.kept[PRUNE.end_step], pruned_run.kept[TOTAL]
    for name in TARGETS:
        for field, mask in (("a", "mask_a"), ("b", "mask_b")):
            for state in (end, last):
                m = getattr(state.frozen, mask)[name]
                assert np.all(getattr(state.trainable, field)[name][m == 0] == 0.0)
            # No pruning after end_step: the masks of the last step are those of end_step.
            np.testing.assert_array_equal(getattr(last.frozen, mask)[name], getattr(end.frozen, mask)[name])


def test_schedule_fraction_is_the_cubic_ramp():
    for step in (0, 3, 5, 10, 15, 20):
        progress = min(step / PRUNE.end_step, 1.0)
        got = float(pruning.schedule_fraction(PRUNE, jnp.asarray(step), TOTAL))
        assert got == pytest.approx(1.0 - (1.0 - progress) ** 3, abs=1e-6)
    # The default end is 3/4 of the run.
    later = pruning.PruneConfig(start_step=10)
    assert float(pruning.schedule_fraction(later, jnp.asarray(10), 100)) == 0.0
    assert float(pruning.schedule_fraction(later, jnp.asarray(75), 100)) == 1.0


def test_sparsity_per_module_and_layer_follows_the_schedule(pruned_run):
    """At each prune step every (projection, layer) group of n entries has exactly floor(t * n) pruned."""
    assert np.all(pruned_run.kept[4].frozen.mask_a["q_proj"] == 1.0)  # nothing before the first prune step
    for step in (5, 10, PRUNE.end_step, TOTAL):
        fraction = np.float32(pruning.schedule_fraction(PRUNE, jnp.asarray(step, jnp.int32), TOTAL))
        target = np.float32(PRUNE.final_sparsity) * fraction  # float32, as in the step
        state = pruned_run.kept[step]
        pruned = _pruned_per_group(state)
        for name in TARGETS:
            n = _group_size(pruned_run.init, name)
            want = math.floor(np.float32(target) * np.float32(n))
            np.testing.assert_array_equal(pruned[name], np.full(LAYERS, want), err_msg=f"{name} at step {step}")
        reported = lmj.combine(state.trainable, state.frozen).sparsity()  # what the trainer logs
        for name in TARGETS:
            np.testing.assert_allclose(np.asarray(reported[name]), pruned[name] / _group_size(pruned_run.init, name),
                                       rtol=1e-6)
    assert float(pruned_run.kept[TOTAL].extra["target_sparsity"]) == pytest.approx(PRUNE.final_sparsity)


def test_masks_only_shrink(pruned_run):
    steps = sorted(pruned_run.kept)
    for before, after in zip(steps, steps[1:]):
        for mask in ("mask_a", "mask_b"):
            for name in TARGETS:
                old = getattr(pruned_run.kept[before].frozen, mask)[name]
                new = getattr(pruned_run.kept[after].frozen, mask)[name]
                assert np.all(new <= old), f"{mask}[{name}] grew between steps {before} and {after}"


def test_adam_moments_are_zero_at_pruned_entries(pruned_run):
    for step in (5, 10, TOTAL):
        state = pruned_run.kept[step]
        for moment in _moments(state.opt_state):
            for name in TARGETS:
                assert np.all(moment.a[name][state.frozen.mask_a[name] == 0] == 0.0)
                assert np.all(moment.b[name][state.frozen.mask_b[name] == 0] == 0.0)
    # ... and not zero everywhere: kept entries still carry moments.
    assert np.abs(_moments(pruned_run.kept[TOTAL].opt_state)[0].a["q_proj"]).max() > 0


@pytest.fixture(scope="module")
def component_run(model, module_seed):
    """Component granularity, layer scope, magnitude, layers 1-2 with per-layer targets; 8 steps."""
    cfg = pruning.PruneConfig(criterion="magnitude", granularity="component", scope="layer", layers=(1, 2),
                              layer_sparsity=(0.5, 0.25, 0.75), every=2, end_step=6)
    rng = np.random.default_rng([module_seed, 1])
    init = jax.device_get(adaptive.merge_for_training(_task_loras(model.config, rng), "task_module"))
    state, step, _ = _trainer(model, _device_copy(init), cfg, steps=8)
    _, kept = _run(step, state, [random_batch(rng, batch=BATCH, length=16) for _ in range(8)], keep_at=(2, 4, 6, 8))
    return SimpleNamespace(cfg=cfg, init=init, kept=kept)


def test_component_pruning_removes_columns_of_a_with_rows_of_b(component_run):
    for state in component_run.kept.values():
        for name in TARGETS:
            mask_a, mask_b = state.frozen.mask_a[name], state.frozen.mask_b[name]  # [L, D, R], [L, R, F]
            alive_LxR = mask_a[:, 0, :]
            assert np.all(mask_a == alive_LxR[:, None, :]), "a component's column of A is pruned as a whole"
            assert np.all(mask_b == alive_LxR[:, :, None]), "with the matching row of B"
            dead = alive_LxR == 0
            assert np.all(state.trainable.a[name].transpose(0, 2, 1)[dead] == 0.0)
            assert np.all(state.trainable.b[name][dead] == 0.0)


def test_layer_range_and_per_layer_sparsity(component_run):
    """Layer 0 is outside layers=(1, 2): unpruned despite its 0.5; layers 1, 2 reach floor(t * R) components."""
    components = len(TARGETS) * sum(RANKS)  # layer scope: every projection's components ranked together
    final = component_run.kept[8]
    dead_L = sum(np.sum(final.frozen.mask_a[n][:, 0, :] == 0, axis=-1) for n in TARGETS)
    want = [0] + [math.floor(np.float32(t) * components) for t in component_run.cfg.layer_sparsity[1:]]
    np.testing.assert_array_equal(dead_L, want)
    steps = sorted(component_run.kept)
    for before, after in zip(steps, steps[1:]):
        for n in TARGETS:
            assert np.all(component_run.kept[after].frozen.mask_a[n] <= component_run.kept[before].frozen.mask_a[n])


def _random_merged(cfg, rng, pruned_fraction=0.0):
    merged = adaptive.merge_for_training(_task_loras(cfg, rng), "task_module")
    if pruned_fraction:
        keep = lambda x: jnp.asarray(rng.random(x.shape) >= pruned_fraction, jnp.float32)  # noqa: E731
        merged = merged.replace(mask_a=jax.tree.map(keep, merged.mask_a), mask_b=jax.tree.map(keep, merged.mask_b))
    return merged


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_new_masks_global_and_layer_scope_rank_the_right_entries(model, scope, rng):
    """Magnitude pruning of layers 1-2 only: the pruned entries are the smallest |theta| of their group."""
    merged = _random_merged(model.config, rng, pruned_fraction=0.1)
    cfg = pruning.PruneConfig(criterion="magnitude", scope=scope, layers=(1, 2), final_sparsity=0.4)
    target_L = jnp.asarray(pruning.layer_targets(cfg, LAYERS))
    mask_a, mask_b = pruning.new_masks(cfg, merged, {}, target_L)

    def flat(tree_a, tree_b, layers):
        return np.concatenate([np.asarray(t[n])[layers].ravel() for n in TARGETS for t in (tree_a, tree_b)])

    np.testing.assert_array_equal(flat(mask_a, mask_b, [0]), flat(merged.mask_a, merged.mask_b, [0]))
    groups = [[1, 2]] if scope == "global" else [[1], [2]]
    for layers in groups:
        new = flat(mask_a, mask_b, layers)
        old = flat(merged.mask_a, merged.mask_b, layers)
        magnitude = np.abs(flat(merged.a, merged.b, layers))
        assert np.all(new <= old)
        assert np.sum(new == 0) == math.floor(np.float32(0.4) * new.size)  # the earlier-pruned count as pruned
        newly = (new == 0) & (old == 1)
        assert newly.any()
        assert magnitude[newly].max() <= magnitude[new == 1].min()


# ----------------------------------------------------------------------------------------------------------
# 3. What trains


def test_coefficients_and_factors_both_train(pruned_run):
    init, state = pruned_run.init, pruned_run.kept[4]  # before any pruning
    assert np.abs(state.trainable.coefficients - init.coefficients).max() > 1e-4
    for name in TARGETS:
        assert np.abs(state.trainable.a[name] - init.a[name]).max() > 1e-4
        assert np.abs(state.trainable.b[name] - init.b[name]).max() > 1e-4


def test_frozen_factors_ablation_trains_coefficients_only(model, rng):
    """trainable_fields=('coefficients',) with magnitude pruning: a and b bitwise unchanged, masks shrink."""
    init = jax.device_get(adaptive.merge_for_training(_task_loras(model.config, rng), "task"))
    cfg = pruning.PruneConfig(criterion="magnitude", final_sparsity=0.5, every=2, end_step=4)
    state, step, _ = _trainer(model, _device_copy(init), cfg, trainable_fields=("coefficients",), steps=5)
    assert state.trainable.a is None and state.frozen.coefficients is None
    state, _ = _run(step, state, [random_batch(rng, batch=BATCH, length=16) for _ in range(5)])
    final = jax.device_get(state)
    sparsity = lmj.combine(final.trainable, final.frozen).sparsity()
    for name in TARGETS:
        np.testing.assert_array_equal(final.frozen.a[name], init.a[name])
        np.testing.assert_array_equal(final.frozen.b[name], init.b[name])
        n = _group_size(init, name)  # pruned through the masks alone
        np.testing.assert_allclose(np.asarray(sparsity[name]), math.floor(0.5 * n) / n, rtol=1e-6)
    assert np.abs(final.trainable.coefficients - init.coefficients).max() > 1e-4
    # Sensitivity scores need the factors' gradients: refused at trace time, naming the fix.
    sensitivity = pruning.PruneConfig(criterion="sensitivity")
    state, _, step_fn = _trainer(model, _device_copy(init), sensitivity, trainable_fields=("coefficients",), steps=5)
    with pytest.raises(ValueError, match="magnitude"):
        jax.eval_shape(step_fn, state, model.weights, random_batch(rng, batch=BATCH, length=16))


# ----------------------------------------------------------------------------------------------------------
# 4. Checkpoints


def test_checkpoint_holds_coefficients_masks_and_statistics(pruned_run):
    restored, position, step = pruned_run.ckpt.restore(pruned_run.abstract, RESUME_AT)
    assert step == RESUME_AT and position == {"index": RESUME_AT}
    assert restored.extra["sensitivity"].a["q_proj"].shape == pruned_run.init.a["q_proj"].shape
    assert np.any(np.asarray(restored.frozen.mask_a["q_proj"]) == 0)
    want = pruned_run.kept[RESUME_AT]
    assert jax.tree.structure(restored) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_resume_equals_uninterrupted_run(pruned_run):
    restored, _, _ = pruned_run.ckpt.restore(pruned_run.abstract, RESUME_AT)
    state, _ = _run(pruned_run.step, restored, pruned_run.batches[RESUME_AT:])
    got = jax.device_get((state.trainable, state.frozen, state.extra, state.opt_state))
    want = pruned_run.kept[TOTAL]
    want = (want.trainable, want.frozen, want.extra, want.opt_state)
    exact = jax.default_backend() == "cpu"
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# 5. Export


def test_compact_drops_dead_components_and_keeps_the_forward(model, rng):
    merged = _random_merged(model.config, rng, pruned_fraction=0.3)
    merged = merged.replace(coefficients=jax.tree.map(
        lambda c: jnp.asarray(rng.normal(0.0, 1.0, c.shape), jnp.float32), merged.coefficients))
    # Kill some components in every layer: dead through A's mask (q_proj), B's mask (v_proj), or both.
    dead = {n: rng.choice(sum(RANKS), size=3, replace=False) for n in TARGETS}
    mask_a = {n: m.at[:, :, dead[n]].set(0.0) if n != "v_proj" else m for n, m in merged.mask_a.items()}
    mask_b = {n: m.at[:, dead[n], :].set(0.0) if n != "q_proj" else m for n, m in merged.mask_b.items()}
    merged = merged.replace(mask_a=mask_a, mask_b=mask_b)
    small = export.compact(merged)
    for name in TARGETS:
        assert small.a[name].shape[-1] == sum(RANKS) - 3
        np.testing.assert_allclose(np.asarray(small.deltas(None)[name].weight()),
                                   np.asarray(merged.deltas(None)[name].weight()), rtol=0, atol=DELTA_TOL)
    ids = rng.integers(4, 100, (2, 12))
    np.testing.assert_allclose(np.asarray(lmj.forward(model, ids, adapter=small)),
                               np.asarray(lmj.forward(model, ids, adapter=merged)), rtol=0, atol=LOGIT_TOL)


def test_compress_error_is_zero_at_the_true_rank_and_positive_below(model, rng):
    merged = _random_merged(model.config, rng)  # rank sum(RANKS) = 9 per layer, below every feature size
    for rank in (sum(RANKS), sum(RANKS) + 3):
        small, errors = export.compress(merged, rank)
        assert set(errors) == set(TARGETS)
        assert max(errors.values()) < 1e-5, errors
        for name in TARGETS:
            np.testing.assert_allclose(np.asarray(small.deltas(None)[name].weight()),
                                       np.asarray(merged.deltas(None)[name].weight()), rtol=0, atol=DELTA_TOL)
    _, errors = export.compress(merged, 4)
    assert min(errors.values()) > 1e-3, errors
    with pytest.raises(ValueError, match="rank"):
        export.compress(merged, 0)


# ----------------------------------------------------------------------------------------------------------
# 6. Configuration errors


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
def test_prune_config_rejects_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"final_sparsity: pruning sparsity must be in \[0, 1\)"):
        pruning.PruneConfig(final_sparsity=sparsity)
    with pytest.raises(ValueError, match=r"layer_sparsity\[1\]: pruning sparsity must be in \[0, 1\)"):
        pruning.PruneConfig(layer_sparsity=(0.2, sparsity))


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "global", "layer_sparsity": (0.1, 0.2)}, "layer_sparsity needs scope"),
    ({"layers": (2, 1)}, "first <= last"),
    ({"criterion": "random"}, "criterion"),
    ({"start_step": 10, "end_step": 5}, "end_step"),
])
def test_prune_config_rejects_inconsistent_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruning.PruneConfig(**kwargs)


def test_prune_layers_outside_the_model_are_refused():
    with pytest.raises(ValueError, match="outside the model's 3 layers"):
        pruning.layer_targets(pruning.PruneConfig(layers=(1, 3)), LAYERS)
    with pytest.raises(ValueError, match="2 values for 3 layers"):
        pruning.layer_targets(pruning.PruneConfig(layer_sparsity=(0.1, 0.2)), LAYERS)


def test_merge_needs_task_loras_with_the_same_targets(model, rng):
    with pytest.raises(ValueError, match="at least one task LoRA"):
        adaptive.merge_for_training([])
    (qv,) = _task_loras(model.config, rng, ranks=(2,), targets=("q_proj", "v_proj"))
    (qo,) = _task_loras(model.config, rng, ranks=(2,), targets=("q_proj", "o_proj"))
    with pytest.raises(ValueError, match=r"differ on \['o_proj', 'v_proj'\]"):
        adaptive.merge_for_training([qv, qo])
    with pytest.raises(ValueError, match="granularity"):
        adaptive.merge_for_training([qv], "per_token")


# ----------------------------------------------------------------------------------------------------------
# Sharding


def test_pruning_on_eight_devices_matches_one_device(tiny_dir, pruned_run):
    """data=2, fsdp=2, tensor=2 against the 1-device run: masks equal, factors within 1e-5.

    The 8-device run starts from the 1-device state after step 4 and takes both prune steps (5 and 10) with
    its sharded statistics. (From step 0 the two runs can drift apart by up to ~1e-4 in rare entries: the
    first Adam steps, whose second moments are still tiny, magnify the ~1e-7 differences of float32
    reductions taken in another order. From a trained state they stay near 1e-7.)
    """
    model8 = lmj.load_pretrained(tiny_dir, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    fresh, step, _ = _trainer(model8, _device_copy(pruned_run.init))
    # The sensitivity statistics are sharded like the factors they score.
    stats_sharding = fresh.extra["sensitivity"].a["q_proj"].sharding
    assert stats_sharding.spec == fresh.trainable.a["q_proj"].sharding.spec
    assert "fsdp" in str(stats_sharding.spec)
    state = jax.device_put(pruned_run.kept[4], step.state_shardings)
    _, kept = _run(step, state, pruned_run.batches[4:10], keep_at=(1, 6))
    for got, want in ((kept[1], pruned_run.kept[5]), (kept[6], pruned_run.kept[10])):
        assert int(got.step) == int(want.step)
        for name in TARGETS:
            for mask in ("mask_a", "mask_b"):
                np.testing.assert_array_equal(getattr(got.frozen, mask)[name], getattr(want.frozen, mask)[name])
            for field in ("a", "b"):
                np.testing.assert_allclose(getattr(got.trainable, field)[name], getattr(want.trainable, field)[name],
                                           rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.trainable.coefficients, want.trainable.coefficients, rtol=0, atol=1e-5)
