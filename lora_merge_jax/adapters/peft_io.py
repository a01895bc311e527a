"""PEFT LoRA adapters in and out: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

Import (``load_peft_adapter``) first applies PEFT's own matching rules (``targets.py``) to the config to
decide which (projection, layer) pairs are adapted, then requires the safetensors file to hold exactly
those modules' ``lora_A`` [r, in] and ``lora_B`` [out, r], at the rank the config gives each module.
Anything PEFT can express but our forward does not compute (DoRA, LoRA biases, ``modules_to_save``,
embedding targets, initialisations that rewrite the base weights...) is refused with the offending key
named, never silently dropped. Pickled ``adapter_model.bin`` files are never read.

Export (``save_peft_adapter``) works for every adapter type through ``lowrank_factors``: each projection's
delta becomes a plain LoRA of its padded rank R per layer. A MELoRA becomes a rank N*R LoRA with
block-diagonal factors; gains that differ across rank components (MELoRA blocks with different
alpha_i/r_i, a merged adapter's c_k*s_k) are folded into B and that layer's scale set to 1. Ranks and
scales that differ between modules are written as ``rank_pattern``/``alpha_pattern`` entries keyed by the
escaped full module path (PEFT matches keys with ``(.*\\.)?(key)$``, so ``layers\\.1\\.`` never hits layer
11), and layer sets that differ between projections become a ``target_modules`` regex, because PEFT's
``layers_to_transform`` is global. PEFT therefore reproduces our logits exactly, not approximately.

Example:
    >>> adapter = load_peft_adapter("adapters/summarise", model)
    >>> save_peft_adapter(adapter, "out/summarise", model)   # PeftModel.from_pretrained(hf_model, "out/...")
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_merge_jax.adapters import common, targets
from lora_merge_jax.adapters.deltas import BlockDelta, LowRankDelta
from lora_merge_jax.adapters.lora import LoraAdapter, lora_scale
from lora_merge_jax.model_config import PROJECTIONS, ModelConfig
from lora_merge_jax.pretrained import Model, save_pretrained
from lora_merge_jax.safetensors_io import SafetensorsFile, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
# PEFT's default target_modules for llama, mistral and qwen2 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
_PEFT_DEFAULT_TARGETS = ("q_proj", "v_proj")

# Config fields whose truthy value makes the adapter more than W + scale * B @ A on linear projections.
_UNSUPPORTED = {
    "use_dora": "DoRA adds a learned magnitude vector", "lora_bias": "LoRA biases add a bias to lora_B",
    "modules_to_save": "fully trained copies of base modules are not LoRA factors",
    "trainable_token_indices": "trained embedding rows are not LoRA factors",
    "target_parameters": "LoRA on raw nn.Parameters", "layer_replication": "it changes the model's depth",
    "use_qalora": "QA-LoRA pools the adapter input", "alora_invocation_tokens": "aLoRA depends on the tokens",
    "arrow_config": "Arrow routes between adapters", "kasa_config": "KaSA modifies the base weights",
    "use_bdlora": "not a plain LoRA", "monteclora_config": "not a plain LoRA", "velora_config": "not a plain LoRA",
}
# init_lora_weights values whose adapters only make sense on base weights PEFT rewrote at init.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_FACTOR_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<factor>lora_[AB])(?:\.(?P<name>[^.]+))?\.weight")
_LAYER_MODULE = re.compile(r"model\.layers\.(?P<layer>\d+)\.\w+\.(?P<proj>\w+)")

LowRankFactors = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(A [L, in, R], B [L, R, out], scale [L]) float32: delta_W[l] = scale[l] * A[l] @ B[l]; scale 0 = not adapted."""


# ----------------------------------------------------------------------------------------------- import


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such PEFT adapter directory")
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; a PEFT adapter directory needs {CONFIG_NAME}")
    try:
        conf = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(conf).__name__}")
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {conf.get('peft_type')!r} is not supported; only 'LORA' is")
    for key, why in _UNSUPPORTED.items():
        if conf.get(key):
            raise ValueError(f"{file}: '{key}': {conf[key]!r} is not supported ({why})")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{file}: 'bias': {conf['bias']!r} is not supported (it trains base biases); use 'none'")
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{file}: 'init_lora_weights': {init!r} adapters expect base weights that PEFT modified; "
                         "convert it to a plain LoRA with PEFT first")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(conf.get(key) or {}, dict):
            raise ValueError(f"{file}: '{key}' must be an object mapping module patterns to values")
    r = conf.get("r", 8)
    if not isinstance(r, int) or r <= 0 or any(not isinstance(v, int) or v <= 0
                                               for v in (conf.get("rank_pattern") or {}).values()):
        raise ValueError(f"{file}: 'r' and 'rank_pattern' values must be positive integers")
    dropout = conf.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{file}: 'lora_dropout': {dropout!r} must be a number in [0, 1)")
    return conf


def _non_projection_modules(cfg: ModelConfig) -> list[str]:
    """Module paths of the transformers model that PEFT could match but that are not adaptable projections."""
    names = ["model.embed_tokens", "lm_head", "model.norm", "model.rotary_emb", "model", "model.layers"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}{s}" for s in ("", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm",
                                                   ".post_attention_layernorm")]
    return names


def _targeted(cfg: ModelConfig, conf: dict[str, Any], file: Path) -> dict[str, list[int]]:
    """Projection -> adapted layers, by PEFT's rules for target/exclude_modules and layers_to_transform."""
    target = conf.get("target_modules")
    if target is None:
        target = list(_PEFT_DEFAULT_TARGETS)
    elif target == "all-linear":  # PEFT: every linear layer except the output layer
        target = list(PROJECTIONS)
    elif not isinstance(target, (str, list)):
        raise ValueError(f"{file}: 'target_modules' must be a list of names or a regex string, got {target!r}")
    layers = conf.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else (layers or None)  # PEFT: an empty list means all layers
    if layers is not None and isinstance(target, str):
        raise ValueError(f"{file}: 'layers_to_transform' cannot be combined with a regex 'target_modules' "
                         "(PEFT refuses it too)")
    if conf.get("layers_pattern") not in (None, "", [], "layers", ["layers"]):
        raise ValueError(f"{file}: 'layers_pattern': {conf['layers_pattern']!r} does not name this model's "
                         "decoder layers ('layers')")
    for module in _non_projection_modules(cfg):
        if targets.matches(target, module):
            raise ValueError(f"{file}: 'target_modules': {target!r} selects '{module}', which is not a linear "
                             f"projection in a decoder layer; only {', '.join(PROJECTIONS)} can be adapted")
    try:
        chosen = targets.resolve(cfg, target, layers)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    exclude = conf.get("exclude_modules")
    if exclude:
        chosen = {p: [i for i in ids if not targets.matches(exclude, targets.module_path(i, p))]
                  for p, ids in chosen.items()}
        chosen = {p: ids for p, ids in chosen.items() if ids}
    return chosen


def _factor_keys(weights: SafetensorsFile, cfg: ModelConfig) -> dict[tuple[str, int], dict[str, str]]:
    """(projection, layer) -> {'lora_A': key, 'lora_B': key}; every tensor must be one of these factors."""
    found: dict[tuple[str, int], dict[str, str]] = {}
    L = cfg.num_hidden_layers
    for key in weights.keys():
        m = _FACTOR_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{weights.path}: tensor '{key}' is not a lora_A/lora_B weight; DoRA magnitudes, "
                             "LoRA biases and saved modules are not supported")
        module = m["module"]
        site = _LAYER_MODULE.fullmatch(module)
        proj = site["proj"] if site else None
        if proj not in PROJECTIONS or module != targets.module_path(int(site["layer"]), proj):
            raise ValueError(f"{weights.path}: tensor '{key}' adapts '{module}', which is not a linear projection "
                             f"in a decoder layer; only {', '.join(PROJECTIONS)} can be adapted")
        layer = int(site["layer"])
        if layer >= L:
            raise ValueError(f"{weights.path}: tensor '{key}' is for layer {layer}, but the model has {L} layers "
                             f"(0..{L - 1}); was this adapter trained for another base model?")
        slot = found.setdefault((proj, layer), {})
        if m["factor"] in slot:
            raise ValueError(f"{weights.path}: tensors '{slot[m['factor']]}' and '{key}' are both {m['factor']} of "
                             f"'{module}' (several adapters in one file are not supported)")
        slot[m["factor"]] = key
    return found


def _fetch(weights: SafetensorsFile, key: str, layout: str, expected: tuple[int, int], cfg: ModelConfig) -> np.ndarray:
    shape = weights.shape(key)
    if shape != expected:
        raise ValueError(f"{weights.path}: tensor '{key}' has shape {shape}, expected {layout} = {expected} for this "
                         f"{cfg.model_type} model (hidden_size={cfg.hidden_size}); was the adapter trained for "
                         "another base model?")
    return np.asarray(weights[key], np.float32)


def load_peft_adapter(path: str | os.PathLike, model: Model) -> LoraAdapter:
    """Reads a PEFT LoRA adapter directory into a LoraAdapter placed on ``model``'s mesh.

    Args:
        path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        model: the base model the adapter was trained for (its architecture checks every shape).

    Returns:
        A LoraAdapter with PEFT's ranks, scales (alpha/r, or alpha/sqrt(r) with rsLoRA), layers and dropout.

    Raises:
        FileNotFoundError: the directory, config or safetensors file is missing.
        ValueError: naming the key or tensor, for anything that is not a plain LoRA of this model's projections.

    Example:
        >>> adapter = load_peft_adapter("adapters/summarise", model)
        >>> logits = forward(model, ids, adapter=adapter)
    """
    directory, cfg = Path(path), model.config
    conf = _read_config(directory)
    conf_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = ", ".join(p.name for p in directory.glob("adapter_model*.bin"))
        hint = f" (found {pickled}: pickle formats are never loaded; convert to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{weights_file}: missing{hint}")
    chosen = _targeted(cfg, conf, conf_file)
    weights = SafetensorsFile(weights_file)
    found = _factor_keys(weights, cfg)
    for (proj, layer), keys in found.items():
        if layer not in chosen.get(proj, ()):
            raise ValueError(f"{weights_file}: tensor '{next(iter(keys.values()))}' adapts "
                             f"'{targets.module_path(layer, proj)}', which {conf_file} does not target")

    r, alpha, rslora = conf.get("r", 8), float(conf.get("lora_alpha", 8)), bool(conf.get("use_rslora", False))
    L = cfg.num_hidden_layers
    a, b, scale = {}, {}, {}
    for proj, layer_ids in chosen.items():
        d_in, d_out = cfg.projection_shape(proj)
        paths = {i: targets.module_path(i, proj) for i in layer_ids}
        ranks = {i: int(targets.pattern_value(conf.get("rank_pattern"), p, r)) for i, p in paths.items()}
        a_LxDxR = np.zeros((L, d_in, max(ranks.values())), np.float32)
        b_LxRxF = np.zeros((L, max(ranks.values()), d_out), np.float32)
        scale_L = np.zeros((L,), np.float32)
        for i, module in paths.items():
            keys, rank = found.get((proj, i), {}), ranks[i]
            if "lora_A" not in keys:
                raise ValueError(f"{weights_file}: no lora_A for '{module}', which {conf_file} targets "
                                 f"(expected '{_KEY_PREFIX}{module}.lora_A.weight')")
            if "lora_B" not in keys:
                raise ValueError(f"{weights_file}: '{keys['lora_A']}' has no matching lora_B "
                                 f"(expected '{keys['lora_A'].replace('.lora_A', '.lora_B')}')")
            a_LxDxR[i, :, :rank] = _fetch(weights, keys["lora_A"], "(r, in_features)", (rank, d_in), cfg).T
            b_LxRxF[i, :rank, :] = _fetch(weights, keys["lora_B"], "(out_features, r)", (d_out, rank), cfg).T
            module_alpha = float(targets.pattern_value(conf.get("alpha_pattern"), module, alpha))
            scale_L[i] = lora_scale(module_alpha, rank, rslora)
        a[proj], b[proj], scale[proj] = a_LxDxR, b_LxRxF, scale_L
    adapter = LoraAdapter(a, b, scale, float(conf.get("lora_dropout", 0.0)))
    return common.place(adapter, cfg, model.mesh)


# ----------------------------------------------------------------------------------------------- export


def _block_diagonal(delta: BlockDelta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MELoRA blocks as one LoRA of rank N*R: A [L, D, N*R], B [L, N*R, F] block-diagonal, gain [L, N*R]."""
    a, b, gain = (np.asarray(jax.device_get(x), np.float32) for x in (delta.a_NxDnxR, delta.b_NxRxFn, delta.gain_NxR))
    layers, n, dn, r = a.shape
    fn = b.shape[-1]
    a_full = np.zeros((layers, n * dn, n * r), np.float32)
    b_full = np.zeros((layers, n * r, n * fn), np.float32)
    for i in range(n):
        a_full[:, i * dn:(i + 1) * dn, i * r:(i + 1) * r] = a[:, i]
        b_full[:, i * r:(i + 1) * r, i * fn:(i + 1) * fn] = b[:, i]
    return a_full, b_full, gain.reshape(layers, n * r)


def _fold_gain(a: np.ndarray, b: np.ndarray, gain_LxR: np.ndarray) -> LowRankFactors:
    """One scale per layer: a uniform positive gain is the scale; otherwise gain goes into B and scale is 1."""
    b = b.copy()
    scale_L = np.zeros(gain_LxR.shape[0], np.float32)
    for layer, gain_R in enumerate(gain_LxR):
        if not gain_R.any():
            continue  # not adapted in this layer
        if gain_R[0] > 0 and np.all(gain_R == gain_R[0]):
            scale_L[layer] = gain_R[0]
        else:
            scale_L[layer] = 1.0
            b[layer] = gain_R[:, None] * b[layer]
    return a, b, scale_L


def lowrank_factors(adapter: Any, cfg: ModelConfig) -> dict[str, LowRankFactors]:
    """Every projection's delta of any adapter as exact per-layer LoRA factors.

    Works from ``adapter.deltas(cfg)``, so it serves LoRA, MELoRA (block-diagonal, rank N*R) and any later
    adapter whose deltas are ``LowRankDelta`` or ``BlockDelta``.

    Args:
        adapter: any adapter with ``deltas(cfg)``.
        cfg: the base model's architecture.

    Returns:
        projection -> (A [L, in, R], B [L, R, out], scale [L]) float32 numpy arrays on the host, with
        ``delta_W[l] == scale[l] * A[l] @ B[l]``; scale is 0 in layers the adapter leaves alone.

    Example:
        >>> a, b, scale = lowrank_factors(melora, model.config)["q_proj"]   # rank N*R, block-diagonal
    """
    out = {}
    for proj, delta in adapter.deltas(cfg).items():
        if isinstance(delta, LowRankDelta):
            a, b, gain = (np.asarray(jax.device_get(x), np.float32) for x in (delta.a_DxR, delta.b_RxF, delta.gain_R))
            gain = np.broadcast_to(gain, a.shape[::2])
        elif isinstance(delta, BlockDelta):
            a, b, gain = _block_diagonal(delta)
        else:
            raise TypeError(f"{proj}: a {type(delta).__name__} delta cannot be written as LoRA factors")
        out[proj] = _fold_gain(a, b, gain)
    return out


def _target_spec(layer_sets: dict[str, list[int]], num_layers: int) -> tuple[list[str] | str, list[int] | None]:
    """(target_modules, layers_to_transform) selecting exactly ``layer_sets`` under PEFT's rules."""
    first = next(iter(layer_sets.values()))
    if all(ids == first for ids in layer_sets.values()):
        return list(layer_sets), (None if len(first) == num_layers else first)
    alternatives = []
    for proj, ids in layer_sets.items():
        head, tail = targets.module_path(0, proj).split(".0.", 1)  # model.layers | self_attn.q_proj
        alternatives.append(rf"{re.escape(head)}\.({'|'.join(map(str, ids))})\.{re.escape(tail)}")
    return "(?:" + "|".join(alternatives) + ")", None


def _alpha(scale: np.float32, rank: int) -> float:
    """lora_alpha for which PEFT's float32 scale alpha / rank is exactly ``scale``, rounded when that stays exact."""
    exact = float(scale) * rank  # a float32 times a small int: exact in a double, and so is exact / rank
    nice = round(exact, 6)
    return nice if np.float32(nice / rank) == scale else exact


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_peft_adapter(adapter: Any, path: str | os.PathLike, model: Model,
                      base_model_name_or_path: str | None = None) -> Path:
    """Writes any adapter as a PEFT LoRA directory that ``PeftModel.from_pretrained`` loads exactly.

    Args:
        adapter: a LoraAdapter, MeloraAdapter or any adapter with ``deltas(cfg)``.
        path: output directory (created; files are replaced atomically).
        model: the base model (architecture and default ``base_model_name_or_path``).
        base_model_name_or_path: recorded in the config for ``AutoPeftModel`` (default: ``model.path``).

    Returns:
        The output directory.

    Raises:
        FileExistsError: ``path`` exists and is not a directory.
        ValueError: the adapter adapts nothing.

    Example:
        >>> save_peft_adapter(adapter, "out/adapter", model)
        >>> peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    """
    path, cfg = Path(path), model.config
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    tensors: list[tuple[str, np.ndarray]] = []
    layer_sets: dict[str, list[int]] = {}
    rank_alpha: dict[str, tuple[int, float]] = {}  # module path -> (rank, alpha) with alpha / rank == scale
    factors = lowrank_factors(adapter, cfg)
    for proj in [p for p in PROJECTIONS if p in factors]:  # a stable order, whatever the adapter's dict order
        a, b, scale = factors[proj]
        ids = [i for i in range(cfg.num_hidden_layers) if scale[i] != 0]
        if not ids:
            continue
        layer_sets[proj] = ids
        rank = a.shape[-1]
        for i in ids:
            module = targets.module_path(i, proj)
            tensors.append((f"{_KEY_PREFIX}{module}.lora_A.weight", np.ascontiguousarray(a[i].T)))
            tensors.append((f"{_KEY_PREFIX}{module}.lora_B.weight", np.ascontiguousarray(b[i].T)))
            rank_alpha[module] = (rank, _alpha(scale[i], rank))
    if not tensors:
        raise ValueError(f"{type(adapter).__name__}: every scale is 0, so there is no adapter to export")
    target_modules, layers_to_transform = _target_spec(layer_sets, cfg.num_hidden_layers)
    rank = Counter(r for r, _ in rank_alpha.values()).most_common(1)[0][0]
    alpha = Counter(al for _, al in rank_alpha.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or model.path,
        "r": rank, "lora_alpha": alpha, "use_rslora": False,
        "target_modules": target_modules, "layers_to_transform": layers_to_transform, "layers_pattern": None,
        "rank_pattern": {re.escape(m): r for m, (r, _) in rank_alpha.items() if r != rank},
        "alpha_pattern": {re.escape(m): al for m, (_, al) in rank_alpha.items() if al != alpha},
        "lora_dropout": float(getattr(adapter, "dropout", 0.0)),
        "bias": "none", "use_dora": False, "lora_bias": False, "modules_to_save": None, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    _write_json(path / CONFIG_NAME, config)
    return path


def save_merged_model(model: Model, adapter: Any, path: str | os.PathLike) -> Path:
    """Writes base + adapter folded into one Hugging Face checkpoint that transformers loads directly.

    Args:
        model: the base model (config, tokenizer and weights).
        adapter: any adapter; ``fold`` adds its delta-W to the base weights, in their dtype.
        path: output directory (created).

    Returns:
        The output directory.

    Example:
        >>> save_merged_model(model, adapter, "out/merged")
        >>> AutoModelForCausalLM.from_pretrained("out/merged")
    """
    return save_pretrained(model, path, weights=common.fold(model, adapter))
