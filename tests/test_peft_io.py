"""PEFT import/export: our forward against PEFT's own, exact round trips both ways, and refused inputs.

Every numerical test draws random factors and tokens from its seed; logits are float32 and compared on the
non-padded positions only (padded rows are undefined), within TOL.
"""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import struct

import lora_merge_jax as lmj
from lora_merge_jax.adapters import factors
from lora_merge_jax.io import hf, peft_export
from lora_merge_jax.io import peft_import as peft_io
from lora_merge_jax.io.safetensors import SafetensorsFile, write_safetensors
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.models.deltas import LowRankDelta
from tests import hf_models
from tests.train_helpers import with_random_b

TOL = 1e-4  # max absolute logit difference against PEFT / transformers in float32
SAME = 1e-5  # our own forward on two representations of the same adapter


def _random_batch(rng, vocab=128, batch=3, length=11):
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones_like(ids)
    mask[1, : rng.integers(1, length // 2)] = 0  # left padding
    mask[2, length - rng.integers(1, length // 2):] = 0  # right padding
    return ids, mask


def _max_diff(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


def _ours(model, ids, mask, adapter=None):
    return np.asarray(lmj.forward(model, ids, adapter=adapter, attention_mask=mask))


def _torch_logits(torch_model, ids, mask):
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> our Model of the tiny checkpoint, loaded once; ``hf_models.build(name)`` is its torch twin."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            hf_models.save_tiny(name, path)
            cache[name] = lmj.load_pretrained(path, load_tokenizer=False)
        return cache[name]

    return get


# ---------------------------------------------------------------------------------- PEFT -> ours


# Several cases load into the same adapter shapes as EXPORT_CASES below, so their compiled forwards are shared.
PARITY_CASES = {
    "plain_all_linear": ("llama3", dict(r=4, lora_alpha=8, target_modules=list(PROJECTIONS))),
    "rslora": ("llama3", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "rank_alpha_pattern": ("qwen2", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], lora_dropout=0.1,
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "k_proj": 6},
        alpha_pattern={"up_proj": 3.0, r"layers\.0\.self_attn\.v_proj": 5})),
    "regex_targets": ("llama3", dict(r=4, lora_alpha=16,
                                     target_modules=r".*\.1\.self_attn\.(q|v)_proj|.*\.0\.mlp\.down_proj")),
    "layers_to_transform": ("llama3", dict(r=2, lora_alpha=2, target_modules=["o_proj", "gate_proj"],
                                           layers_to_transform=[1], lora_dropout=0.1)),
    "layers_to_transform_int": ("qwen2", dict(r=3, lora_alpha=6, target_modules=["k_proj", "v_proj", "up_proj"],
                                              exclude_modules=["v_proj"], layers_to_transform=0)),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_peft_adapter_gives_peft_logits(case, tiny, tmp_path, rng):
    name, kwargs = PARITY_CASES[case]
    peft_model = peft.get_peft_model(hf_models.build(name), peft.LoraConfig(**kwargs)).eval()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if ".lora_A." in pname or ".lora_B." in pname:  # PEFT starts B at 0: make the update visible
                torch.nn.init.normal_(p, std=0.1, generator=gen)
    peft_model.save_pretrained(tmp_path)

    model = tiny(name)
    adapter = peft_io.load_peft_adapter(tmp_path, model)
    assert adapter.dropout == kwargs.get("lora_dropout", 0.0)
    ids, mask = _random_batch(rng)
    ref = _torch_logits(peft_model, ids, mask)
    assert _max_diff(_ours(model, ids, mask, adapter), ref, mask) < TOL
    with peft_model.disable_adapter():  # the adapter really changes the logits
        assert _max_diff(_torch_logits(peft_model, ids, mask), ref, mask) > 10 * TOL


# ---------------------------------------------------------------------------------- ours -> PEFT


@struct.dataclass
class MergedLike:
    """Stand-in for the merged adapter: LoRAs concatenated on the rank axis, one gain per component."""

    a: dict
    b: dict
    gain: dict

    def deltas(self, cfg):
        return {p: LowRankDelta(self.a[p], self.b[p], self.gain[p]) for p in self.a}


def _lora_mixed(cfg, key):
    """Ranks that differ by layer and by module, alphas by module, and a module adapted in one layer only."""
    adapter = lmj.init_lora(cfg, key, rank=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                            rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "k_proj": 6},
                            alpha_pattern={"up_proj": 3.0}, dropout=0.1)
    return dataclasses.replace(adapter, scale=adapter.scale | {"v_proj": adapter.scale["v_proj"].at[0].set(0.0)})


def _merged_like(cfg, key):
    # numpy draws seeded by the key (jax.random would compile for every new shape)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    a, b, gain = {}, {}, {}
    for proj in ("q_proj", "v_proj"):
        d_in, d_out = cfg.projection_shape(proj)
        a[proj] = jnp.asarray(rng.normal(0, 0.1, (2, d_in, 8)), jnp.float32)
        b[proj] = jnp.zeros((2, 8, d_out), jnp.float32)
        gain[proj] = rng.uniform(-2, 2, (2, 8)).astype(np.float32)
    gain["v_proj"][0] = 0.0  # pruned away in layer 0
    return MergedLike(a, b, {p: jnp.asarray(g) for p, g in gain.items()})


def _make(make, cfg, rng):
    """``make(cfg, key)`` with a fresh key (eagerly: op compilations are cached across tests, a jit is not)."""
    return make(cfg, jax.random.key(int(rng.integers(2**31))))


EXPORT_CASES = {
    "lora_uniform": ("llama3", lambda cfg, key: lmj.init_lora(cfg, key, rank=4, alpha=8,
                                                              target_modules=list(PROJECTIONS))),
    "lora_mixed": ("qwen2", _lora_mixed),
    "lora_layers": ("llama3", lambda cfg, key: lmj.init_lora(cfg, key, rank=2, alpha=3, layers=[1], dropout=0.1,
                                                             target_modules=["o_proj", "gate_proj"])),
    "melora_uniform": ("llama3", lambda cfg, key: lmj.init_melora(cfg, key, num_blocks=4, rank=2, alpha=4.0)),
    "melora_mixed": ("qwen2", lambda cfg, key: lmj.init_melora(
        cfg, key, num_blocks=2, rank=[2, 3], alpha=[4.0, 1.5], target_modules=["q_proj", "gate_proj", "down_proj"])),
    "merged_like": ("llama3", _merged_like),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_saved_adapter_loads_in_peft_and_back(case, tiny, tmp_path, rng):
    name, make = EXPORT_CASES[case]
    model = tiny(name)
    adapter = with_random_b(_make(make, model.config, rng), rng)
    peft_export.save_peft_adapter(adapter, tmp_path / "adapter", model, base_model_name_or_path="tiny/" + name)

    ids, mask = _random_batch(rng)
    ours = _ours(model, ids, mask, adapter)
    peft_model = peft.PeftModel.from_pretrained(hf_models.build(name), tmp_path / "adapter").eval()
    assert _max_diff(ours, _torch_logits(peft_model, ids, mask), mask) < TOL
    with peft_model.disable_adapter():  # the adapter really changes the logits
        assert _max_diff(ours, _torch_logits(peft_model, ids, mask), mask) > 10 * TOL
    reloaded = peft_io.load_peft_adapter(tmp_path / "adapter", model)
    assert reloaded.dropout == getattr(adapter, "dropout", 0.0)
    assert _max_diff(ours, _ours(model, ids, mask, reloaded), mask) < SAME


def test_export_config_is_exact_and_minimal(tiny, tmp_path, rng):
    model = tiny("qwen2")
    mixed = _make(_lora_mixed, model.config, rng)
    conf = json.loads((peft_export.save_peft_adapter(mixed, tmp_path / "m", model) / peft_io.CONFIG_NAME).read_text())
    # v_proj is adapted in layer 1 only, the others in both: a regex, since layers_to_transform is global.
    assert conf["layers_to_transform"] is None
    assert re.fullmatch(conf["target_modules"], "model.layers.1.self_attn.v_proj")
    assert not re.fullmatch(conf["target_modules"], "model.layers.0.self_attn.v_proj")
    # q_proj layer 1 has rank 2 padded to 4, so its scale 8/2 needs alpha 16 at r=4; up_proj has 3/4; k_proj
    # keeps its rank 6 and alpha 8 (written as 8, not float32(8/6)*6: both give PEFT the same float32 scale).
    assert (conf["r"], conf["lora_alpha"], conf["use_rslora"]) == (4, 8.0, False)
    assert conf["rank_pattern"] == {r"model\.layers\.0\.self_attn\.k_proj": 6,
                                    r"model\.layers\.1\.self_attn\.k_proj": 6}
    assert conf["alpha_pattern"] == {r"model\.layers\.1\.self_attn\.q_proj": 16.0,
                                     r"model\.layers\.0\.mlp\.up_proj": 3.0,
                                     r"model\.layers\.1\.mlp\.up_proj": 3.0}
    assert conf["lora_dropout"] == 0.1

    melora = _make(EXPORT_CASES["melora_uniform"][1], model.config, rng)
    conf = json.loads((peft_export.save_peft_adapter(melora, tmp_path / "b", model) / peft_io.CONFIG_NAME).read_text())
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"]) == (8, 16.0, ["q_proj", "v_proj"])


def test_exported_patterns_are_anchored_to_one_layer():
    """PEFT matches pattern keys with (.*\\.)?(key)$ and target regexes with fullmatch: layer 1 must not hit 11."""
    from peft.utils.other import get_pattern_key

    key = re.escape("model.layers.1.self_attn.q_proj")
    assert get_pattern_key([key], "model.layers.1.self_attn.q_proj") == key
    assert get_pattern_key([key], "model.layers.11.self_attn.q_proj") != key
    target, layers = peft_export._target_spec({"q_proj": [1], "v_proj": [1, 11]}, num_layers=12)
    assert layers is None
    hits = {f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "v_proj")
            if re.fullmatch(target, f"model.layers.{i}.self_attn.{p}")}
    assert hits == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                    "model.layers.11.self_attn.v_proj"}


def test_lowrank_factors_reproduce_every_delta(tiny, rng):
    model = tiny("llama3")
    for make in (EXPORT_CASES["melora_mixed"][1], _merged_like, _lora_mixed):
        adapter = with_random_b(_make(make, model.config, rng), rng)
        for proj, delta in adapter.deltas(model.config).items():
            a, b, scale = factors.lowrank_factors(adapter, model.config)[proj]
            ours = np.einsum("ldr,l,lrf->ldf", a, scale, b)
            np.testing.assert_allclose(ours, np.asarray(delta.weight()), atol=1e-6, err_msg=proj)


@pytest.mark.parametrize("kind", ["lora", "melora"])
def test_merged_model_loads_in_transformers(kind, tiny, tmp_path, rng):
    model = tiny("llama3")
    adapter = with_random_b(_make(EXPORT_CASES[f"{kind}_uniform"][1], model.config, rng), rng)
    hf.save_merged_model(model, adapter, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids, mask = _random_batch(rng)
    assert _max_diff(_ours(model, ids, mask, adapter), _torch_logits(merged, ids, mask), mask) < TOL


# ---------------------------------------------------------------------------------- refused inputs


_KEY = "base_model.model.model.layers.{i}.self_attn.{p}.lora_{f}.weight"


def _write_adapter(path, rng, conf=None, extra=None, drop=()):
    """A valid rank-2 q_proj adapter for the tiny 2-layer, hidden-64 models, then the requested damage."""
    tensors = {_KEY.format(i=i, p="q_proj", f=f): rng.normal(size=s).astype(np.float32)
               for i in range(2) for f, s in (("A", (2, 64)), ("B", (64, 2)))}
    tensors.update(extra or {})
    for key in drop:
        tensors.pop(key)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / peft_io.WEIGHTS_NAME, tensors)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]} | (conf or {})
    (path / peft_io.CONFIG_NAME).write_text(json.dumps(config))
    return path


_A = np.zeros((2, 64), np.float32)
BAD_ADAPTERS = {
    "not_lora": (dict(conf={"peft_type": "IA3"}), "peft_type 'IA3'"),
    "dora": (dict(conf={"use_dora": True}), "'use_dora'"),
    "lora_bias": (dict(conf={"lora_bias": True}), "'lora_bias'"),
    "bias_all": (dict(conf={"bias": "all"}), "'bias'"),
    "modules_to_save": (dict(conf={"modules_to_save": ["lm_head"]}), "'modules_to_save'"),
    "pissa": (dict(conf={"init_lora_weights": "pissa_niter_4"}), "pissa"),
    "embedding_target": (dict(conf={"target_modules": ["q_proj", "embed_tokens"]}), "model.embed_tokens"),
    "regex_hits_lm_head": (dict(conf={"target_modules": ".*(q_proj|lm_head)"}), "'lm_head'"),
    "regex_with_layers": (dict(conf={"target_modules": ".*q_proj", "layers_to_transform": [0]}),
                          "layers_to_transform"),
    "layer_out_of_range": (dict(conf={"layers_to_transform": [0, 7]}), r"layer\(s\) \[7\]"),
    "embedding_tensor": (dict(extra={"base_model.model.model.embed_tokens.lora_A.weight": _A}),
                         "model.embed_tokens.lora_A.weight' adapts 'model.embed_tokens'"),
    "magnitude_tensor": (dict(extra={"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": _A}),
                         "lora_magnitude_vector' is not a lora_A/lora_B weight"),
    "tensor_beyond_last_layer": (dict(extra={_KEY.format(i=5, p="q_proj", f="A"): _A}), "is for layer 5"),
    "untargeted_tensor": (dict(extra={_KEY.format(i=0, p="k_proj", f="A"): _A}),
                          "adapts 'model.layers.0.self_attn.k_proj', which .* does not target"),
    "missing_lora_B": (dict(drop=[_KEY.format(i=1, p="q_proj", f="B")]),
                       re.escape("layers.1.self_attn.q_proj.lora_A.weight' has no matching lora_B")),
    "missing_module": (dict(drop=[_KEY.format(i=0, p="q_proj", f=f) for f in "AB"]),
                       "no lora_A for 'model.layers.0.self_attn.q_proj'"),
    "wrong_rank": (dict(conf={"r": 3}),
                   re.escape("q_proj.lora_A.weight' has shape (2, 64), expected (r, in_features) = (3, 64)")),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_refused_with_its_key(case, tiny, tmp_path, rng):
    damage, match = BAD_ADAPTERS[case]
    path = _write_adapter(tmp_path / case, rng, **damage)
    with pytest.raises(ValueError, match=match):
        peft_io.load_peft_adapter(path, tiny("llama3"))


def test_keys_with_an_adapter_name_load_the_same(tiny, tmp_path, rng):
    model = tiny("llama3")
    plain = _write_adapter(tmp_path / "plain", rng, conf={"layers_to_transform": []})  # [] means every layer in PEFT
    named = tmp_path / "named"
    named.mkdir()
    weights = SafetensorsFile(plain / peft_io.WEIGHTS_NAME)
    write_safetensors(named / peft_io.WEIGHTS_NAME,
                      {k.replace(".weight", ".default.weight"): np.array(weights[k]) for k in weights.keys()})
    (named / peft_io.CONFIG_NAME).write_text((plain / peft_io.CONFIG_NAME).read_text())
    a, b = peft_io.load_peft_adapter(plain, model), peft_io.load_peft_adapter(named, model)
    assert a.a.keys() == b.a.keys() == {"q_proj"}
    np.testing.assert_array_equal(np.asarray(a.a["q_proj"]), np.asarray(b.a["q_proj"]))
    np.testing.assert_array_equal(np.asarray(a.b["q_proj"]), np.asarray(b.b["q_proj"]))
    np.testing.assert_array_equal(np.asarray(a.scale["q_proj"]), [2.0, 2.0])


def test_missing_or_malformed_files_are_named(tiny, tmp_path, rng):
    model = tiny("llama3")
    with pytest.raises(FileNotFoundError, match="nowhere: no such PEFT adapter directory"):
        peft_io.load_peft_adapter(tmp_path / "nowhere", model)
    path = _write_adapter(tmp_path / "a", rng)
    (path / peft_io.CONFIG_NAME).write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        peft_io.load_peft_adapter(path, model)
    (path / peft_io.CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        peft_io.load_peft_adapter(path, model)
    path = _write_adapter(tmp_path / "b", rng)
    (path / peft_io.WEIGHTS_NAME).rename(path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing .*pickle"):
        peft_io.load_peft_adapter(path, model)


def test_adapter_for_another_model_names_tensor_and_shapes(tiny, tmp_path):
    other = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    narrow = transformers.AutoModelForCausalLM.from_config(other, dtype=torch.float32)
    peft.get_peft_model(narrow, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    expected = re.escape("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (8, 32), "
                         "expected (r, in_features) = (8, 64)")
    with pytest.raises(ValueError, match=expected):
        peft_io.load_peft_adapter(tmp_path, tiny("llama3"))


def test_save_refuses_a_file_path_and_an_empty_adapter(tiny, tmp_path, rng):
    model = tiny("llama3")
    adapter = _make(lmj.init_lora, model.config, rng)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file: exists and is not a directory"):
        peft_export.save_peft_adapter(adapter, tmp_path / "file", model)
    empty = dataclasses.replace(adapter, scale={p: jnp.zeros_like(s) for p, s in adapter.scale.items()})
    with pytest.raises(ValueError, match="every scale is 0"):
        peft_export.save_peft_adapter(empty, tmp_path / "empty", model)


def test_read_gives_host_arrays_equal_to_the_loaded_adapter(tiny, tmp_path, rng):
    # read_peft_adapter is what a multi-process merge combines on the host before one placement: plain numpy,
    # the same values, scales and dropout as load_peft_adapter's placed arrays.
    model = tiny("llama3")
    adapter = with_random_b(lmj.init_lora(model.config, jax.random.key(int(rng.integers(1 << 30))), rank=4,
                                           target_modules=["q_proj", "down_proj"], dropout=0.1), rng)
    peft_export.save_peft_adapter(adapter, tmp_path, model)
    read, loaded = peft_io.read_peft_adapter(tmp_path, model.config), peft_io.load_peft_adapter(tmp_path, model)
    assert read.dropout == loaded.dropout == 0.1
    for leaf_read, leaf_loaded in zip(jax.tree.leaves(read), jax.tree.leaves(loaded), strict=True):
        assert type(leaf_read) is np.ndarray and isinstance(leaf_loaded, jax.Array)
        np.testing.assert_array_equal(leaf_read, np.asarray(leaf_loaded))
