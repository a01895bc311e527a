"""merge_adapters against PEFT's add_weighted_adapter on the tiny Llama 3, with seeded random LoRA factors.

PEFT adapters are made with random non-zero A and B, saved, reloaded with PeftModel.from_pretrained +
load_adapter and merged by PEFT; our LoraAdapter is built from the same tensors (a small loader below, so the
test does not depend on ``adapters/peft_io.py``). Deterministic methods must give the same delta-W per module.
"""

import itertools

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lora_merge_jax as lmj
from lora_merge_jax.adapters.lora import LoraAdapter
from lora_merge_jax.merge.static import merge_adapters
from lora_merge_jax.models.config import (
    ATTENTION_PROJECTIONS,
    PROJECTIONS,
    from_hf_config,
)
from tests import hf_models

TOL = 1e-4  # max absolute delta-W (and logit) difference against PEFT in float32
TARGETS = ["q_proj", "down_proj"]  # attention and MLP, two shapes (each shape compiles)
# name -> (rank, alpha, rank_pattern); task3/4 have rank 2 in layer 0's q_proj only, so our factors are padded.
_RANK_2_IN_LAYER_0 = {"model.layers.0.self_attn.q_proj": 2}
TASKS = {"task0": (4, 8.0, None), "task1": (4, 16.0, None), "task2": (8, 8.0, None),
         "task3": (4, 8.0, _RANK_2_IN_LAYER_0), "task4": (4, 12.0, _RANK_2_IN_LAYER_0)}
PLAIN = ["task0", "task1", "task2"]
_names = (f"merged{i}" for i in itertools.count())


def _module(peft_model, layer, proj):
    block = peft_model.base_model.model.model.layers[layer]
    return getattr(block.self_attn if proj in ATTENTION_PROJECTIONS else block.mlp, proj)


def _from_peft(peft_model, name):
    """Our LoraAdapter from one PEFT adapter's tensors: A^T, B^T stacked over layers, ranks zero-padded."""
    num_layers = len(peft_model.base_model.model.model.layers)
    a, b, scale = {}, {}, {}
    for proj in PROJECTIONS:
        mods = [_module(peft_model, i, proj) for i in range(num_layers)]
        hit = [hasattr(m, "lora_A") and name in m.lora_A for m in mods]
        if not any(hit):
            continue
        rank = max(m.lora_A[name].weight.shape[0] for m, h in zip(mods, hit) if h)
        d_in, d_out = mods[0].in_features, mods[0].out_features
        a_LxDxR = np.zeros((num_layers, d_in, rank), np.float32)
        b_LxRxF = np.zeros((num_layers, rank, d_out), np.float32)
        scale_L = np.zeros(num_layers, np.float32)
        for i, (m, h) in enumerate(zip(mods, hit)):
            if h:
                r = m.lora_A[name].weight.shape[0]
                a_LxDxR[i, :, :r] = m.lora_A[name].weight.detach().numpy().T
                b_LxRxF[i, :r] = m.lora_B[name].weight.detach().numpy().T
                scale_L[i] = m.scaling[name]
        a[proj], b[proj], scale[proj] = a_LxDxR, b_LxRxF, scale_L
    return LoraAdapter(a, b, scale)


def _delta_FxD(adapter, proj, layer):
    """delta-W of one module in PEFT's [out, in] orientation."""
    a, b, s = (np.asarray(x[proj], np.float64)[layer] for x in (adapter.a, adapter.b, adapter.scale))
    return (s * a @ b).T


@pytest.fixture(scope="module")
def peft_model(tmp_path_factory, module_rng):
    root = tmp_path_factory.mktemp("peft_adapters")
    for name, (rank, alpha, pattern) in TASKS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0,
                            rank_pattern=pattern or {})
        model = get_peft_model(hf_models.build("llama3"), config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.from_numpy(module_rng.normal(0.0, 0.3, p.shape).astype(np.float32)))
        model.save_pretrained(root / name)
    names = list(TASKS)
    model = PeftModel.from_pretrained(hf_models.build("llama3"), root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    return model.eval()


@pytest.fixture(scope="module")
def ours(peft_model):
    return {name: _from_peft(peft_model, name) for name in TASKS}


CASES = [
    (["task0", "task1"], "linear", {}),
    (["task0", "task1", "task2"], "cat", {}),
    (["task0", "task1", "task2"], "svd", {}),
    (["task0", "task2"], "svd", {"svd_rank": 3}),
    (["task0", "task1"], "ties", {"density": 0.5}),
    (["task0", "task1"], "ties", {"density": 0.4, "majority_sign_method": "frequency"}),
    (["task0", "task1"], "magnitude_prune", {"density": 0.3}),
    (["task0", "task1"], "dare_ties", {"density": 1.0}),  # no dropping at density 1: deterministic
    (["task0", "task1", "task2"], "ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
    (["task0", "task1", "task2"], "magnitude_prune_svd", {"density": 0.6, "svd_rank": 6}),
    (["task1", "task2"], "dare_linear_svd", {"density": 1.0}),
    (["task2"], "svd", {"svd_rank": 2}),  # PEFT merges a single adapter with `linear`: no truncation
    (["task3", "task4"], "ties", {"density": 0.3}),  # keeps int(0.3 * 2 * 64) entries of layer 0's q_proj A
    (["task3", "task4"], "magnitude_prune", {"density": 0.7}),
    (["task3", "task4", "task0"], "cat", {}),
]


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")  # PEFT's, at density 1
@pytest.mark.parametrize("names,method,options", CASES, ids=[f"{m}-{len(n)}-{i}" for i, (n, m, _) in enumerate(CASES)])
def test_delta_weights_match_peft(peft_model, ours, names, method, options, rng):
    weights = rng.uniform(-1.0, 1.5, len(names)).round(3).tolist()
    merged_name = next(_names)
    peft_model.add_weighted_adapter(names, weights, merged_name, combination_type=method, **options)
    merged = merge_adapters([ours[n] for n in names], weights, method, key=jax.random.key(0), **options)
    for proj in TARGETS:
        for layer in range(2):
            ref = _module(peft_model, layer, proj).get_delta_weight(merged_name).detach().numpy()
            np.testing.assert_allclose(_delta_FxD(merged, proj, layer), ref, rtol=0, atol=TOL,
                                       err_msg=f"{method} {proj} layer {layer}")


def _clamp_rule(us_FxR, vh_RxD, quantile):
    """PEFT's svd_clamp: clip both factors to +-(the quantile of all their entries)."""
    high = np.quantile(np.concatenate([us_FxR.ravel(), vh_RxD.ravel()]), quantile)
    return np.clip(us_FxR, -high, high), np.clip(vh_RxD, -high, high)


def test_svd_clamp_is_peft_rule_up_to_singular_vector_signs(peft_model, ours, rng):
    # The clamp threshold depends on the signs of the singular vectors, which LAPACK builds choose differently
    # (torch's and jax's differ), so PEFT's clamped merge is only defined up to them: we check the rule.
    names, quantile = PLAIN, 0.9
    weights = rng.uniform(-1.0, 1.5, 3).tolist()
    merged_name = next(_names)
    peft_model.add_weighted_adapter(names, weights, merged_name, combination_type="svd", svd_rank=5,
                                    svd_clamp=quantile)
    adapters = [ours[n] for n in names]
    plain = merge_adapters(adapters, weights, "svd", svd_rank=5)
    clamped = merge_adapters(adapters, weights, "svd", svd_rank=5, svd_clamp=quantile)
    for proj in TARGETS:
        for layer in range(2):
            us_FxR, vh_RxD = np.asarray(plain.b[proj])[layer].T, np.asarray(plain.a[proj])[layer].T
            want_us, want_vh = _clamp_rule(us_FxR, vh_RxD, quantile)
            np.testing.assert_allclose(np.asarray(clamped.b[proj])[layer].T, want_us, atol=1e-5)
            np.testing.assert_allclose(np.asarray(clamped.a[proj])[layer].T, want_vh, atol=1e-5)
            module = _module(peft_model, layer, proj)
            peft_us = module.lora_B[merged_name].weight.detach().numpy()
            peft_vh = module.lora_A[merged_name].weight.detach().numpy()
            flip_R = np.sign(np.sum(us_FxR * peft_us, axis=0))  # clipping keeps every entry's sign
            us_FxR, vh_RxD = _clamp_rule(us_FxR * flip_R, vh_RxD * flip_R[:, None], quantile)
            np.testing.assert_allclose(us_FxR @ vh_RxD, peft_us @ peft_vh, atol=TOL)


def test_cat_logits_match_peft(peft_model, ours, tiny_model, rng):
    weights = rng.uniform(-1.0, 1.0, 3).tolist()
    merged_name = next(_names)
    peft_model.add_weighted_adapter(PLAIN, weights, merged_name, combination_type="cat")
    peft_model.set_adapter(merged_name)
    ids = rng.integers(0, 128, (2, 11))
    with torch.no_grad():
        ref = peft_model(torch.tensor(ids)).logits.numpy()
    merged = merge_adapters([ours[n] for n in PLAIN], weights, "cat")
    got = np.asarray(lmj.forward(tiny_model, ids, adapter=merged))
    assert np.abs(got - ref).max() < TOL


def test_linear_is_not_the_weighted_sum_but_exact_is(ours):
    pair, weights = [ours["task0"], ours["task1"]], [0.6, 0.8]
    linear, exact = merge_adapters(pair, weights, "linear"), merge_adapters(pair, weights, "exact")
    want = sum(w * _delta_FxD(ad, "q_proj", 0) for w, ad in zip(weights, pair))
    np.testing.assert_allclose(_delta_FxD(exact, "q_proj", 0), want, atol=1e-5)
    assert np.abs(_delta_FxD(linear, "q_proj", 0) - want).max() > 0.1  # cross terms B_j A_k


def _q_only(adapter):
    """The adapter's q_proj factors alone (DARE tests: fewer shapes, fewer compilations)."""
    return LoraAdapter({"q_proj": adapter.a["q_proj"]}, {"q_proj": adapter.b["q_proj"]},
                       {"q_proj": adapter.scale["q_proj"]})


def _key(rng):
    return jax.random.key(rng.integers(2**31))


def test_dare_linear_keeps_density_fraction_rescaled(ours, rng):
    density, first, second = 0.3, _q_only(ours["task0"]), _q_only(ours["task1"])
    # Weight 0 on the second adapter leaves sqrt(s_0) * mask * A_0 / density (and the same for B).
    merged = merge_adapters([first, second], [1.0, 0.0], "dare_linear", density=density, key=_key(rng))
    root_L = np.sqrt(np.asarray(first.scale["q_proj"]))
    kept, total = 0, 0
    for field in ("a", "b"):
        got = np.asarray(getattr(merged, field)["q_proj"])
        full = root_L[:, None, None] * np.asarray(getattr(first, field)["q_proj"]) / density
        mask = got != 0
        np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5)
        kept, total = kept + mask.sum(), total + mask.size
    assert abs(kept / total - density) < 0.05  # 2048 entries: 4.5 standard deviations


def test_dare_ties_keeps_entries_either_copy_kept_and_follows_the_key(ours, rng):
    density, adapter = 0.4, _q_only(ours["task1"])
    key = _key(rng)
    merged = merge_adapters([adapter, adapter], [1.0, 1.0], "dare_ties", density=density, key=key)
    # Both copies agree in sign, so an entry is x * sqrt(s) / density when either copy kept it, else 0.
    got = np.asarray(merged.a["q_proj"])
    full = np.sqrt(np.asarray(adapter.scale["q_proj"]))[:, None, None] * np.asarray(adapter.a["q_proj"]) / density
    mask = got != 0
    np.testing.assert_allclose(got[mask], full[mask], rtol=1e-5)
    assert abs(mask.mean() - (1 - (1 - density) ** 2)) < 0.06
    again = merge_adapters([adapter, adapter], [1.0, 1.0], "dare_ties", density=density, key=key)
    other = merge_adapters([adapter, adapter], [1.0, 1.0], "dare_ties", density=density, key=_key(rng))
    np.testing.assert_array_equal(np.asarray(again.a["q_proj"]), got)
    assert not np.array_equal(np.asarray(other.a["q_proj"]), got)


def test_dare_linear_svd_full_rank_prunes_the_delta(ours, rng):
    density, adapter = 0.5, _q_only(ours["task0"])
    merged = merge_adapters([adapter, _q_only(ours["task1"])], [1.0, 0.0], "dare_linear_svd", density=density,
                            svd_rank=64, key=_key(rng))
    got, full = _delta_FxD(merged, "q_proj", 1), _delta_FxD(adapter, "q_proj", 1) / density
    mask = np.abs(got) > 1e-3 * np.abs(full).max()
    np.testing.assert_allclose(got[mask], full[mask], atol=1e-4)
    assert np.abs(got[~mask]).max() < 1e-3 * np.abs(full).max()
    assert abs(mask.mean() - density) < 0.05


# --- method="exact" ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(llama_checkpoint):
    return lmj.load_pretrained(llama_checkpoint)


def _random_lora(cfg, rng, rank, alpha, target_modules, layers=None):
    """A LoRA with random non-zero A and B, made in numpy (no compilation)."""
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    a, b, scale = {}, {}, {}
    for proj in target_modules:
        d_in, d_out = cfg.projection_shape(proj)
        a[proj] = rng.normal(0.0, 0.3, (cfg.num_hidden_layers, d_in, rank)).astype(np.float32)
        b[proj] = rng.normal(0.0, 0.3, (cfg.num_hidden_layers, rank, d_out)).astype(np.float32)
        scale[proj] = np.array([alpha / rank if i in layers else 0.0 for i in range(cfg.num_hidden_layers)],
                               np.float32)
    return LoraAdapter(a, b, scale)


def test_exact_is_sum_of_scaled_deltas_whatever_the_targets(cfg, rng):
    adapters = [_random_lora(cfg, rng, 4, 8.0, ["q_proj", "v_proj"]),
                _random_lora(cfg, rng, 2, 4.0, ["k_proj", "v_proj"], layers=[1]),
                _random_lora(cfg, rng, 6, 3.0, ["down_proj"])]
    weights = rng.uniform(-1.0, 1.0, 3)
    merged = merge_adapters(adapters, weights, "exact")
    assert sorted(merged.a) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    for proj in merged.a:
        for layer in range(2):
            want = sum(w * _delta_FxD(ad, proj, layer) for w, ad in zip(weights, adapters) if proj in ad.a)
            np.testing.assert_allclose(_delta_FxD(merged, proj, layer), want, atol=1e-5)
    assert np.asarray(merged.scale["k_proj"]).tolist() == [0.0, 1.0]  # adapted in layer 1 only


def test_exact_single_adapter_weight_one_is_the_adapter(tiny_model, rng):
    # Same targets, rank and batch shape as test_cat_logits_match_peft's merge: the forward compiles once.
    adapter = _random_lora(tiny_model.config, rng, 16, 8.0, TARGETS)
    merged = merge_adapters([adapter], [1.0], "exact")
    ids = rng.integers(0, 128, (2, 11))
    got = lmj.forward(tiny_model, ids, adapter=merged)
    np.testing.assert_allclose(np.asarray(got), np.asarray(lmj.forward(tiny_model, ids, adapter=adapter)), atol=1e-5)


def test_exact_is_jittable_in_the_weights(ours, rng):
    pair = [ours["task0"], ours["task2"]]
    merge = jax.jit(lambda c: merge_adapters(pair, c, "exact"))
    coefficients = rng.uniform(-1, 1, 2).astype(np.float32)
    got, want = merge(coefficients), merge_adapters(pair, coefficients.tolist(), "exact")
    np.testing.assert_allclose(np.asarray(got.a["q_proj"]), np.asarray(want.a["q_proj"]), rtol=1e-6)


# --- errors --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    return from_hf_config(hf_models.TINY_CONFIGS["llama3"]())


@pytest.mark.parametrize("call,message", [
    (lambda q, q8, v, late: merge_adapters([], [], "linear"), "no adapters to merge"),
    (lambda q, q8, v, late: merge_adapters([q, q, q], [1.0, 1.0]), "2 weights for 3 adapters"),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "average"), "unknown merge method 'average'"),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "ties", density=0.0), r"density must be in \(0, 1\]"),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "ties", density=1.5), r"density must be in \(0, 1\]"),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "ties"), "'ties' prunes: pass density"),
    (lambda q, q8, v, late: merge_adapters([q, q8], [1, 1], "linear"), r"equal ranks, but q_proj has ranks \[4, 8\]"),
    (lambda q, q8, v, late: merge_adapters([q, v], [1, 1], "cat"),
     "adapter 1 adapts model.layers.0.self_attn.v_proj, adapter 0 does not"),
    (lambda q, q8, v, late: merge_adapters([q, late], [1, 1], "svd"),
     "adapter 0 adapts model.layers.0.self_attn.q_proj, adapter 1 does not"),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "dare_linear", density=0.5), "pass key="),
    (lambda q, q8, v, late: merge_adapters([q, q], [1, 1], "ties", density=0.5, majority_sign_method="mean"),
     "majority_sign_method must be"),
])
def test_errors(cfg, call, message, rng):
    q = _random_lora(cfg, rng, 4, 8.0, ["q_proj"])
    q8 = _random_lora(cfg, rng, 8, 8.0, ["q_proj"])
    v = _random_lora(cfg, rng, 4, 8.0, ["q_proj", "v_proj"])
    late = _random_lora(cfg, rng, 4, 8.0, ["q_proj"], layers=[1])
    with pytest.raises(ValueError, match=message):
        call(q, q8, v, late)
