"""Which (projection, layer) pairs an adapter targets, with PEFT's matching rules.

PEFT names a module by its path in the transformers model, e.g. ``model.layers.3.self_attn.q_proj``.
A list of targets matches a module whose path ends with one of them; a string is a regex that must match
the whole path; ``layers_to_transform`` then keeps only the listed layers. ``rank_pattern`` and
``alpha_pattern`` keys are regexes matched against the end of the path, first match wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from lora_merge_jax.models.config import PROJECTIONS, ModelConfig

_PREFIX = {p: "self_attn" for p in PROJECTIONS[:4]} | {p: "mlp" for p in PROJECTIONS[4:]}


def module_path(layer: int, projection: str) -> str:
    """The transformers module path of one projection, as PEFT sees it."""
    return f"model.layers.{layer}.{_PREFIX[projection]}.{projection}"


def matches(target_modules: str | Sequence[str], path: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; list entries match its dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def pattern_value(pattern: Mapping[str, float] | None, path: str, default: float) -> float:
    """The value of the first pattern key that matches the end of ``path`` (PEFT's ``get_pattern_key``)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def resolve(cfg: ModelConfig, target_modules: str | Sequence[str],
            layers: Sequence[int] | None = None) -> dict[str, list[int]]:
    """Projection name -> the layer indices it is adapted in.

    Raises:
        ValueError: when nothing matches, or ``layers`` names a layer the model does not have.
    """
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"layers_to_transform: layer(s) {bad} outside 0..{cfg.num_hidden_layers - 1}")
    chosen = range(cfg.num_hidden_layers) if layers is None else sorted(set(layers))
    out: dict[str, list[int]] = {}
    for proj in PROJECTIONS:
        hit = [i for i in chosen if matches(target_modules, module_path(i, proj))]
        if hit:
            out[proj] = hit
    if not out:
        raise ValueError(
            f"target_modules={target_modules!r} matches no projection; choose among {', '.join(PROJECTIONS)}"
        )
    return out
