"""Generation against transformers' ``generate`` (greedy, LoRA, beam), cache correctness, sampling, compiles."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process

import lora_merge_jax as lmj
from lora_merge_jax import tiny
from lora_merge_jax.evaluation import generate as gen
from lora_merge_jax.models import dot_library
from lora_merge_jax.models.config import ATTENTION_PROJECTIONS, PROJECTIONS
from lora_merge_jax.sharding import MeshConfig, make_mesh
from tests import hf_models

SCALE = 8.0  # sharpens the random models' logits so argmax is never a near-tie between implementations
PROMPT_LENGTHS = (4, 11, 7)
NEW_TOKENS = 12
_SHARP: dict = {}


def _sharp(name, tmp_path_factory):
    """(transformers model, our model, directory) of a tiny random model with SCALE-times larger weights."""
    if name not in _SHARP:
        hf = hf_models.build(name)
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                if "norm" not in pname and not pname.endswith("bias"):
                    p.mul_(SCALE)
        path = tmp_path_factory.mktemp(f"sharp_{name}")
        hf.save_pretrained(path)
        tiny.build_tokenizer(hf.config.vocab_size).save_pretrained(path)
        _SHARP[name] = (hf, lmj.load_pretrained(path), path)
    return _SHARP[name]


@pytest.fixture(scope="module", params=sorted(hf_models.TINY_CONFIGS))
def sharp(request, tmp_path_factory):
    return _sharp(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    return _sharp("llama3", tmp_path_factory)


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 128, n - 1).tolist() for n in lengths]


def _hf_generate(hf, prompts, eos, **kwargs):
    """transformers' new tokens for left-padded prompts, cut before the first EOS."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=eos,
                          do_sample=False, **kwargs)
    rows = out[:, width:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def _frequent_token(model, prompts):
    """A token greedy decoding emits mid-sequence: used as EOS so that rows stop at different steps."""
    first = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[])
    return first[0][NEW_TOKENS // 2]


def test_greedy_matches_transformers(sharp):
    hf, model, _ = sharp
    prompts = _prompts()
    ours = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert ours == _hf_generate(hf, prompts, eos=2)
    assert [len(t) for t in ours] == [NEW_TOKENS] * 3  # nobody hit EOS 2: full length
    eos = _frequent_token(model, prompts)
    ours = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos])
    assert ours == _hf_generate(hf, prompts, eos=eos)
    assert len(ours[0]) < NEW_TOKENS and all(eos not in t for t in ours)


def _random_lora(cfg):
    lora = lmj.init_lora(cfg, jax.random.key(1), rank=4, target_modules=list(PROJECTIONS))
    keys = jax.random.split(jax.random.key(2), len(lora.b))
    b = {name: 0.1 * jax.random.normal(k, x.shape) for k, (name, x) in zip(keys, sorted(lora.b.items()))}
    return dataclasses.replace(lora, b=b)


def test_greedy_with_lora_matches_transformers_with_folded_weights(sharp_llama):
    hf, model, path = sharp_llama
    lora = _random_lora(model.config)
    folded = copy.deepcopy(hf)
    with torch.no_grad():
        for proj in PROJECTIONS:
            delta_LxDxF = np.einsum("ldr,l,lrf->ldf", np.asarray(lora.a[proj]), np.asarray(lora.scale[proj]),
                                    np.asarray(lora.b[proj]))
            for layer, block in enumerate(folded.model.layers):
                module = getattr(block.self_attn if proj in ATTENTION_PROJECTIONS else block.mlp, proj)
                module.weight += torch.from_numpy(delta_LxDxF[layer].T.copy())
    prompts = _prompts(seed=3)
    ours = gen.generate(model, prompts, lora, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert ours == _hf_generate(folded, prompts, eos=2)
    assert ours != gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])  # LoRA mattered


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (2.0, True), (-0.5, "never"),
                                                             (0.5, "never")])
def test_beam_search_matches_transformers(sharp_llama, length_penalty, early_stopping):
    hf, model, _ = sharp_llama
    prompts = _prompts(seed=4)
    eos = _frequent_token(model, prompts)
    kwargs = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    ours = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos], method="beam", **kwargs)
    assert ours == _hf_generate(hf, prompts, eos=eos, **kwargs)


def test_cached_decode_equals_full_forward(llama_checkpoint):
    model = lmj.load_pretrained(llama_checkpoint)
    prompts = _prompts(seed=5)
    out = gen.generate_detailed(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[], output_logits=True)
    # One uncached forward over prompt + generated tokens, right-padded (positions = slot index, exact).
    width = max(map(len, prompts)) + NEW_TOKENS
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros_like(ids)
    for i, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        ids[i, : len(prompt) + len(tokens)] = prompt + tokens
        mask[i, : len(prompt) + len(tokens)] = 1
    full_BxTxV = np.asarray(lmj.forward(model, ids, attention_mask=mask))
    for i, (prompt, tokens, logits_NxV) in enumerate(zip(prompts, out.tokens, out.logits)):
        assert len(tokens) == NEW_TOKENS and logits_NxV.shape == (NEW_TOKENS, 128)
        recomputed_NxV = full_BxTxV[i, len(prompt) - 1: len(prompt) - 1 + NEW_TOKENS]
        assert np.abs(logits_NxV - recomputed_NxV).max() < 1e-4
        assert tokens == np.argmax(logits_NxV, axis=-1).tolist()


@pytest.mark.parametrize("arch, fold", [("llama3", True), ("qwen2", False)])  # qwen2: q/k/v biases
def test_unstacked_decode_steps_equal_the_stacked_scan(tmp_path, rng, arch, fold):
    # CPU decodes over per-layer copies, q/k/v and gate/up joined, the adapter folded in for 32-bit compute
    # (else its own products; decoder.decode_unstacked); GPUs and TPUs keep the stacked scan with the adapter's
    # own products. Both from the same prefill, with a sliding window on layer 0: the same hidden states, to
    # float32 rounding of the folded weights (1e-5 relative).
    from lora_merge_jax.models import decoder
    from lora_merge_jax.models import weights as weights_lib

    hf_models.save_tiny(arch, tmp_path)
    model = lmj.load_pretrained(tmp_path)
    cfg = dataclasses.replace(model.config, sliding_windows=(3,) + (0,) * (model.config.num_hidden_layers - 1))
    deltas = _random_lora(cfg).deltas(cfg)
    b, p, steps = 3, 6, 4
    ids_BxP = jnp.asarray(rng.integers(3, 128, (b, p)), jnp.int32)
    cache = weights_lib.init_cache(cfg, b, p + steps, jnp.float32)
    mask_BxS = jnp.zeros((b, p + steps), jnp.int32).at[:, :p].set(1)
    _, cache = decoder.apply_model(cfg, model.weights, ids_BxP, deltas=deltas, attention_mask_BxS=mask_BxS,
                                   cache=cache, return_hidden=True)
    layers, caches = decoder.unstack_layers(model.weights, deltas, fold=fold), decoder.unstack_cache(cache)
    for step in range(steps):
        slot = p + step
        mask_BxS = mask_BxS.at[:, slot].set(1)
        token_Bx1 = jnp.asarray(rng.integers(3, 128, (b, 1)), jnp.int32)
        positions_Bx1 = jnp.full((b, 1), slot)
        stacked, cache = decoder.apply_model(cfg, model.weights, token_Bx1, deltas=deltas, attention_mask_BxS=mask_BxS,
                                             positions_BxT=positions_Bx1, cache=cache, cache_index=slot,
                                             return_hidden=True)
        unstacked, caches = decoder.decode_unstacked(cfg, model.weights, layers, token_Bx1, caches, slot, mask_BxS,
                                                     positions_Bx1)
        np.testing.assert_allclose(np.asarray(unstacked), np.asarray(stacked), rtol=1e-5, atol=1e-5,
                                   err_msg=f"decode step {step}")
    for layer, (k_BxKxHdxS, v_BxKxSxHd) in enumerate(caches):
        np.testing.assert_allclose(np.asarray(k_BxKxHdxS), np.asarray(cache.k_LxBxSxKxHd[layer]).transpose(0, 2, 3, 1),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v_BxKxSxHd), np.asarray(cache.v_LxBxSxKxHd[layer]).transpose(0, 2, 1, 3),
                                   rtol=1e-5, atol=1e-5)


def test_shared_prefix_is_prefilled_once_and_matches_transformers(sharp_llama, rng):
    # Prompts that share 37 leading tokens (as a chat template's system turn): 32 of them go through the model
    # once and are copied to every row; greedy and beam results equal transformers', logits the unshared run's.
    hf, model, _ = sharp_llama
    head = [1] + rng.integers(3, 128, 36).tolist()
    prompts = [head + rng.integers(3, 128, n).tolist() for n in (1, 9, 4)]
    assert gen.shared_prefix_length(prompts) == 32
    eos = _frequent_token(model, prompts)
    shared = gen.generate_detailed(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos],
                                   output_logits=True)
    assert shared.tokens == _hf_generate(hf, prompts, eos=eos)
    plain = gen.generate_detailed(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos],
                                  output_logits=True, share_prefix=False)
    assert plain.tokens == shared.tokens
    for ours, reference in zip(shared.logits, plain.logits):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    beams = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[eos], method="beam", num_beams=3)
    assert beams == _hf_generate(hf, prompts, eos=eos, num_beams=3)
    assert gen.shared_prefix_length([head[:20] + [5], head[:20] + [6]]) == 16  # 20 in common: cut to 16
    assert gen.shared_prefix_length([head, head]) == 32  # identical: each keeps a token of its own (36 -> 32)
    assert gen.shared_prefix_length([head[:17], head[:17]]) == 16
    assert gen.shared_prefix_length([head[:16], head[:16]]) == 0  # 15 may be shared: under 16
    assert gen.shared_prefix_length([head]) == 0


def test_prompts_in_one_bucket_compile_once(sharp_llama):
    _, model, _ = sharp_llama
    kwargs = dict(max_new_tokens=NEW_TOKENS, prompt_bucket=16)
    gen.generate(model, _prompts(seed=6, lengths=(5, 5, 5)), eos_token_ids=[2], **kwargs)
    program = gen.program_for(model.activation_dtype)
    compiled = program._cache_size()
    # Lengths 9 and 16 pad to 16 like 5; 4 prompts pad to a batch of 4 like 3; other EOS ids are data.
    gen.generate(model, _prompts(seed=7, lengths=(9, 9, 9, 9)), eos_token_ids=[7], **kwargs)
    gen.generate(model, _prompts(seed=8, lengths=(2, 16, 3)), eos_token_ids=[], **kwargs)
    assert program._cache_size() == compiled


def test_float32_decoding_on_a_cpu_runs_its_products_outside_ynnpack(sharp_llama, monkeypatch):
    """generate's float32 program is compiled with Eigen's dots (dot_library: YNNPACK's few-row products are
    slow); bfloat16 keeps XLA's defaults. The check reads the compiled HLO of a decode step's product."""
    _, model, _ = sharp_llama
    x_RxD, w_DxF = jnp.ones((16, 64), jnp.float32), jnp.ones((64, 96), jnp.float32)

    def compiled_text(compiler_options):
        product = jax.jit(lambda x, w: jnp.tanh(x @ w), compiler_options=compiler_options)
        return product.lower(x_RxD, w_DxF).compile().as_text()

    if "ynn_fusion" not in compiled_text(None):
        pytest.skip(f"this jaxlib ({jax.__version__}) does not send dots to YNNPACK by default")
    options = dot_library.decode_compiler_options(jnp.float32)
    assert options is not None and "ynn_fusion" not in compiled_text(options)
    assert dot_library.decode_compiler_options(jnp.bfloat16) is None
    program = gen.program_for(jnp.float32)
    before = program._cache_size()
    gen.generate(model, _prompts(seed=10, lengths=(3, 7)), max_new_tokens=2, eos_token_ids=[], prompt_bucket=32)
    assert model.weights.embed_VxD.dtype == jnp.float32 and program._cache_size() == before + 1
    assert program is not gen.program_for(jnp.bfloat16)
    # A user who names the option in XLA_FLAGS keeps it for decoding as well.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert dot_library.decode_compiler_options(jnp.float32) is None


def test_sampling_limits_equal_greedy(sharp_llama):
    _, model, _ = sharp_llama
    prompts = _prompts(seed=9)
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    greedy = gen.generate(model, prompts, **kwargs)
    assert gen.generate(model, prompts, method="sample", top_k=1, temperature=5.0, **kwargs) == greedy
    assert gen.generate(model, prompts, method="sample", top_p=1e-6, temperature=5.0, seed=3, **kwargs) == greedy
    assert gen.generate(model, prompts, method="sample", top_p=0.5, temperature=1e-4, seed=4, **kwargs) == greedy


def test_samples_come_from_the_top_k(sharp_llama):
    _, model, _ = sharp_llama
    prompts = _prompts(seed=10)
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_ids=[], method="sample", top_k=5, output_logits=True)
    out = gen.generate_detailed(model, prompts, temperature=10.0, **kwargs)
    for tokens, logits_NxV in zip(out.tokens, out.logits):
        top5_NxK = np.argsort(-logits_NxV, axis=-1)[:, :5]
        assert all(t in top5_NxK[i] for i, t in enumerate(tokens))
        assert any(t != top5_NxK[i, 0] for i, t in enumerate(tokens))  # at temperature 10, not just argmax
    again = [gen.generate_detailed(model, prompts, temperature=10.0, seed=s, **kwargs).tokens for s in (0, 1)]
    assert again[0] == out.tokens != again[1]  # the seed decides, and decides reproducibly


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.9),
                                                       (1.5, 20, 0.8), (1.0, 0, 0.3)])
def test_filter_logits_matches_transformers_warpers(temperature, top_k, top_p):
    logits_BxV = np.random.default_rng(0).normal(0, 3, (4, 128)).astype(np.float32)
    warpers = [logits_process.TemperatureLogitsWarper(temperature)]
    warpers += [logits_process.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [logits_process.TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = torch.from_numpy(logits_BxV)
    for warper in warpers:
        expected = warper(None, expected)
    ours = np.asarray(gen.filter_logits(jnp.asarray(logits_BxV), temperature, top_k, top_p))
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)


def test_sample_frequencies_follow_the_filtered_distribution():
    probs_V = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits_1xV = jnp.log(jnp.asarray(probs_V, jnp.float32))[None]
    for top_k, top_p, kept in [(3, 1.0, 3), (0, 0.7, 3), (0, 0.5, 2), (0, 1.0, 6)]:
        filtered_V = gen.filter_logits(logits_1xV, 1.0, top_k, top_p)[0]
        draws = jax.random.categorical(jax.random.key(top_k + int(10 * top_p)), filtered_V, shape=(20000,))
        counts_V = np.bincount(np.asarray(draws), minlength=6) / 20000
        expected_V = np.where(np.arange(6) < kept, probs_V, 0) / probs_V[:kept].sum()
        np.testing.assert_allclose(counts_V, expected_V, atol=0.015)


def test_sharded_mesh_matches_default_mesh(sharp_llama):
    _, model, path = sharp_llama  # default mesh: data=8, so a batch of 4 (12 beam rows) stays replicated
    many = lmj.load_pretrained(path, mesh=make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    assert tuple(many.weights.layers.proj["q_proj"].sharding.spec) == (None, "fsdp", "tensor")
    prompts = _prompts(seed=11)
    kwargs = dict(max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert gen.generate(many, prompts, **kwargs) == gen.generate(model, prompts, **kwargs)
    beam = dict(kwargs, method="beam", num_beams=3)
    assert gen.generate(many, prompts, **beam) == gen.generate(model, prompts, **beam)
    shared = [prompts[0] + prompts[1] + prompts[2] + p for p in prompts]  # 22 tokens in common: one row's prefix
    assert gen.shared_prefix_length(shared) == 16
    assert gen.generate(many, shared, **kwargs) == gen.generate(model, shared, **kwargs)

    # The CPU decode loop joins q/k/v and gate/up only where their output axis is whole: with tensor=2 the
    # joined columns would cross the shards and move in every step.
    from lora_merge_jax.models import weights as weights_lib

    def decode_weight_keys(m):
        cache = weights_lib.init_cache(m.config, 1, 4, jnp.float32)
        with jax.set_mesh(m.mesh):
            layers = jax.eval_shape(lambda w: gen._for_decoding(w, None, cache, None)[0], m.weights)
        return sorted(layers.layers[0].proj)

    assert decode_weight_keys(model) == ["down_proj", "gate_proj+up_proj", "o_proj", "q_proj+k_proj+v_proj"]
    assert decode_weight_keys(many) == sorted(PROJECTIONS)


def test_generate_text_decodes_new_tokens(sharp_llama):
    _, model, _ = sharp_llama
    texts = ["hello world", "a longer prompt, with punctuation!", "x"]
    out = gen.generate_text(model, texts, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    ids = [model.tokenizer(t)["input_ids"] for t in texts]
    expected = gen.generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert out == model.tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert gen.default_eos_token_ids(model) == (2,)


def test_bad_requests_raise(sharp_llama):
    _, model, _ = sharp_llama
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        gen.generate(model, [[1, 500]])
    with pytest.raises(ValueError, match="method 'topk'"):
        gen.generate(model, [[1]], method="topk")
    with pytest.raises(ValueError, match="min_new_tokens"):
        gen.generate(model, [[1]], max_new_tokens=4, min_new_tokens=5)
    assert gen.generate(model, []) == []


def test_bfloat16_greedy_matches_transformers_in_bfloat16(sharp_llama):
    """bfloat16 weights and activations on both sides (our KV cache holds them as uint16 bits: models/bits.py);
    the sharpened logits keep bfloat16 rounding from flipping any argmax."""
    hf, _, path = sharp_llama
    model = lmj.load_pretrained(path, dtype="bfloat16")
    assert gen.weights_lib.init_cache(model.config, 1, 4, jnp.bfloat16).k_LxBxSxKxHd.dtype == jnp.uint16
    prompts = _prompts(seed=3)
    ours = gen.generate(model, prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert ours == _hf_generate(copy.deepcopy(hf).to(torch.bfloat16), prompts, eos=2)
