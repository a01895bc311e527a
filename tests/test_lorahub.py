"""LoraHub: the coefficient search on synthetic losses, and on the tiny Llama 3 with data one adapter made."""

import numpy as np
import pytest

import lora_merge_jax as lmj
from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.merge import lorahub
from lora_merge_jax.merge.lorahub import (
    compose,
    lorahub_merge,
    lorahub_search,
    merged_loss_fn,
)
from lora_merge_jax.merge.static import merge_adapters
from lora_merge_jax.models import decoder, losses


def _quadratic(optimum):
    return lambda c: float(np.sum((c - optimum) ** 2))


def test_search_finds_quadratic_optimum(rng):
    optimum = rng.uniform(-1.0, 1.0, 3)
    weights, history = lorahub_search(_quadratic(optimum), 3, budget=100, l1_weight=0.0)
    assert len(history) == 100
    assert np.abs(weights - optimum).max() < 0.05
    assert np.abs(history[0].weights).max() == 0.0  # starts at init = 0


def test_l1_term_is_weight_times_mean_abs_and_pulls_to_zero():
    optimum = np.full(2, 0.5)
    _, history = lorahub_search(_quadratic(optimum), 2, budget=15, l1_weight=0.05)
    for step in history:
        assert step.objective == pytest.approx(step.loss + 0.05 * np.mean(np.abs(step.weights)), abs=1e-12)
    # sum (c - 0.5)^2 + 2 * mean|c| = sum (c - 0.5)^2 + |c| per coordinate: minimal at c = 0, not 0.5.
    free, _ = lorahub_search(_quadratic(optimum), 2, budget=60, l1_weight=0.0)
    pulled, _ = lorahub_search(_quadratic(optimum), 2, budget=60, l1_weight=2.0)
    assert np.abs(free - 0.5).max() < 0.05
    assert np.abs(pulled).max() < 0.05


def test_same_seed_same_search(rng):
    optimum, seed = rng.uniform(-1.0, 1.0, 4), int(rng.integers(1000))
    first, history_1 = lorahub_search(_quadratic(optimum), 4, budget=25, seed=seed)
    second, history_2 = lorahub_search(_quadratic(optimum), 4, budget=25, seed=seed)
    np.testing.assert_array_equal(first, second)
    assert [s.objective for s in history_1] == [s.objective for s in history_2]


def test_weights_stay_in_bounds():
    _, history = lorahub_search(_quadratic(np.full(2, 5.0)), 2, budget=30, bounds=(-0.5, 0.5))
    assert all(np.abs(s.weights).max() <= 0.5 + 1e-9 for s in history)


# --- on the tiny model ---------------------------------------------------------------------------------------------

PROMPT, LENGTH = 4, 12


@pytest.fixture(scope="module")
def task(llama_checkpoint, module_rng):
    """The tiny model, two strong random LoRAs, and batches of greedy continuations made with the first."""
    model = lmj.load_pretrained(llama_checkpoint)
    cfg, rng = model.config, module_rng

    def random_lora(rank=4, alpha=8.0):
        a, b, scale = {}, {}, {}
        for proj in ("q_proj", "v_proj", "down_proj"):
            d_in, d_out = cfg.projection_shape(proj)
            a[proj] = rng.normal(0.0, 1.0, (cfg.num_hidden_layers, d_in, rank)).astype(np.float32)
            b[proj] = rng.normal(0.0, 1.0, (cfg.num_hidden_layers, rank, d_out)).astype(np.float32)
            scale[proj] = np.full(cfg.num_hidden_layers, alpha / rank, np.float32)
        return LoraAdapter(a, b, scale)

    adapters = [random_lora(), random_lora()]
    ids = rng.integers(0, cfg.vocab_size, (3, LENGTH))
    for t in range(PROMPT, LENGTH):  # causal: the tokens after t do not change the logits at t - 1
        ids[:, t] = np.asarray(lmj.forward(model, ids, adapter=adapters[0]))[:, t - 1].argmax(-1)
    target = np.zeros_like(ids)
    target[:, PROMPT:] = 1
    # Two batches of different shapes: the second is one row cut to 10 tokens (stacking pads it).
    batches = [dict(input_ids=ids[:2], attention_mask=np.ones_like(ids[:2]), target_mask=target[:2]),
               dict(input_ids=ids[2:, :10], attention_mask=np.ones((1, 10), int), target_mask=target[2:, :10])]
    return model, adapters, batches, ids, target


def test_merged_loss_is_mean_target_nll_and_compiles_once(task, monkeypatch):
    model, adapters, batches, ids, target = task
    traces = []
    real_apply = decoder.apply_model
    monkeypatch.setattr(decoder, "apply_model", lambda *a, **k: traces.append(1) or real_apply(*a, **k))
    loss_of = merged_loss_fn(model, adapters, batches)
    got = loss_of(np.array([1.0, 0.0]))
    traces.clear()
    for coefficients in ([0.3, -0.2], [1.2, 0.7]):
        loss_of(np.array(coefficients))
    assert traces == []  # new coefficients, no new trace
    # Reference: the first adapter alone, on the full rows, with row 2's targets cut at 10 tokens.
    target = target.copy()
    target[2, 10:] = 0
    logits = lmj.forward(model, ids, adapter=adapters[0])
    nll, count = losses.token_nll(logits, ids, target)
    assert got == pytest.approx(float(nll / count), abs=1e-5)


def test_lorahub_prefers_the_adapter_that_made_the_data(task):
    model, adapters, batches, _, _ = task
    merged, weights = lorahub_merge(model, adapters, batches, budget=20)
    loss_of = merged_loss_fn(model, adapters, batches)
    assert weights[0] > 0.3 and weights[0] > abs(weights[1]) + 0.2, weights
    assert loss_of(weights) < min(loss_of(np.array([0.0, 1.0])), loss_of(np.array([0.0, 0.0])))
    exact = merge_adapters(adapters, weights, "exact")
    np.testing.assert_allclose(np.asarray(merged.a["q_proj"]), np.asarray(exact.a["q_proj"]), rtol=1e-6)


def test_original_lorahub_composition_sums_factors(rng):
    shape_a, shape_b = (2, 8, 3), (2, 3, 5)
    adapters = [LoraAdapter({"q_proj": rng.normal(size=shape_a)}, {"q_proj": rng.normal(size=shape_b)},
                            {"q_proj": np.full(2, s, np.float32)}) for s in (2.0, 4.0)]
    c = rng.uniform(-1.0, 1.0, 2)
    merged = compose(adapters, c, "lorahub")
    a = c[0] * adapters[0].a["q_proj"] + c[1] * adapters[1].a["q_proj"]
    b = c[0] * adapters[0].b["q_proj"] + c[1] * adapters[1].b["q_proj"]
    want = 2.0 * np.einsum("ldr,lrf->ldf", a, b)  # the first adapter's scale
    got = np.einsum("ldr,l,lrf->ldf", merged.a["q_proj"], merged.scale["q_proj"], merged.b["q_proj"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bounds=(1.0, -1.0)), "lower < upper"),
    (dict(budget=0), "budget must be at least 1"),
    (dict(init=2.0), "init=2.0 lies outside bounds"),
    (dict(num_adapters=0), "at least one coefficient"),
])
def test_search_errors(kwargs, message):
    kwargs = dict(num_adapters=2) | kwargs
    with pytest.raises(ValueError, match=message):
        lorahub_search(_quadratic(0.0), **kwargs)


def test_model_errors(task):
    model, adapters, batches, _, _ = task
    with pytest.raises(ValueError, match="batch 0 lacks target_mask"):
        merged_loss_fn(model, adapters, [dict(input_ids=np.zeros((1, 4), int), attention_mask=np.ones((1, 4)))])
    with pytest.raises(ValueError, match="unknown LoraHub composition 'mean'"):
        merged_loss_fn(model, adapters, batches, method="mean")
    with pytest.raises(ValueError, match="at least one batch"):
        merged_loss_fn(model, adapters, [])
    with pytest.raises(ValueError, match=r"expected 2 coefficients, got shape \(3,\)"):
        merged_loss_fn(model, adapters, batches)(np.zeros(3))
    small = LoraAdapter({p: x[..., :2] for p, x in adapters[1].a.items()},
                        {p: x[:, :2] for p, x in adapters[1].b.items()}, adapters[1].scale)
    with pytest.raises(ValueError, match=r"'lorahub' sums factors and needs equal ranks"):
        lorahub.merged_loss_fn(model, [adapters[0], small], batches, method="lorahub")
