"""PEFT LoRA adapters out: any adapter as a directory that ``PeftModel.from_pretrained`` loads exactly.

``save_peft_adapter`` works for every adapter type through ``adapters.factors.lowrank_factors``: each
projection's delta becomes a plain LoRA of its padded rank R per layer (a MELoRA a rank N*R LoRA with
block-diagonal factors; gains that differ across rank components folded into B). Ranks and scales that
differ between modules are written as ``rank_pattern``/``alpha_pattern`` entries keyed by the escaped full
module path (PEFT matches keys with ``(.*\\.)?(key)$``, so ``layers\\.1\\.`` never hits layer 11), and
layer sets that differ between projections become a ``target_modules`` regex, because PEFT's
``layers_to_transform`` is global. PEFT therefore reproduces our logits exactly, not approximately.

Example:
    >>> save_peft_adapter(adapter, "out/summarise", model)   # PeftModel.from_pretrained(hf_model, "out/...")
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lora_merge_jax.adapters import targets
from lora_merge_jax.adapters.factors import lowrank_factors
from lora_merge_jax.io.files import write_json_atomic
from lora_merge_jax.io.peft_import import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from lora_merge_jax.io.safetensors import write_safetensors
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.models.model import Model


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
            tensors.append((f"{KEY_PREFIX}{module}.lora_A.weight", np.ascontiguousarray(a[i].T)))
            tensors.append((f"{KEY_PREFIX}{module}.lora_B.weight", np.ascontiguousarray(b[i].T)))
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
    write_json_atomic(path / CONFIG_NAME, config)
    return path
