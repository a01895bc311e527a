"""PEFT LoRA adapters in: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

``load_peft_adapter`` first applies PEFT's own matching rules (``adapters/targets.py``) to the config to
decide which (projection, layer) pairs are adapted, then requires the safetensors file to hold exactly
those modules' ``lora_A`` [r, in] and ``lora_B`` [out, r], at the rank the config gives each module.
Anything PEFT can express but our forward does not compute (DoRA, LoRA biases, ``modules_to_save``,
embedding targets, initialisations that rewrite the base weights...) is refused with the offending key
named, never silently dropped. Pickled ``adapter_model.bin`` files are never read.

Example:
    >>> adapter = load_peft_adapter("adapters/summarise", model)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from lora_merge_jax.adapters import common, targets
from lora_merge_jax.adapters.lora import LoraAdapter, lora_scale
from lora_merge_jax.io.safetensors import SafetensorsFile
from lora_merge_jax.models.config import PROJECTIONS, ModelConfig
from lora_merge_jax.models.model import Model

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
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
    return common.place(read_peft_adapter(path, model.config), model.config, model.mesh)


def read_peft_adapter(path: str | os.PathLike, cfg: ModelConfig) -> LoraAdapter:
    """``load_peft_adapter`` without the placement: every factor a host numpy array.

    For adapters that are combined before use (the task LoRAs of a merge): on a multi-process mesh every
    operation on placed arrays is a collective program that all processes must run in step, so a combination
    is computed on the host and placed once.
    """
    directory = Path(path)
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
                                 f"(expected '{KEY_PREFIX}{module}.lora_A.weight')")
            if "lora_B" not in keys:
                raise ValueError(f"{weights_file}: '{keys['lora_A']}' has no matching lora_B "
                                 f"(expected '{keys['lora_A'].replace('.lora_A', '.lora_B')}')")
            a_LxDxR[i, :, :rank] = _fetch(weights, keys["lora_A"], "(r, in_features)", (rank, d_in), cfg).T
            b_LxRxF[i, :rank, :] = _fetch(weights, keys["lora_B"], "(out_features, r)", (d_out, rank), cfg).T
            module_alpha = float(targets.pattern_value(conf.get("alpha_pattern"), module, alpha))
            scale_L[i] = lora_scale(module_alpha, rank, rslora)
        a[proj], b[proj], scale[proj] = a_LxDxR, b_LxRxF, scale_L
    return LoraAdapter(a, b, scale, float(conf.get("lora_dropout", 0.0)))


def adapter_dir(path: str | os.PathLike) -> Path:
    """A PEFT adapter directory, or a run directory whose ``adapter/`` holds one."""
    path = Path(path)
    if (path / "adapter" / CONFIG_NAME).exists():
        return path / "adapter"
    return path
