"""What a finished run writes beside its checkpoints: the PEFT adapter, and for a merge its compact and
SVD-compressed forms and the training plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_merge_jax.io import peft_export
from lora_merge_jax.io.files import write_json_atomic
from lora_merge_jax.merge.adaptive import MergedLoraAdapter
from lora_merge_jax.merge.compress import compact, compress
from lora_merge_jax.training.plots import plot_training


def write_merge_outputs(adapter: MergedLoraAdapter, model: Any, out: Path, export_rank: int | None, log) -> None:
    """Writes ``adapter_compact/`` (pruned components dropped), optionally ``adapter_rank{r}/``, the plot."""
    small = compact(adapter)
    peft_export.save_peft_adapter(small, out / "adapter_compact", model)
    ranks = {n: a.shape[-1] for n, a in small.a.items()}
    log(f"compact PEFT export (pruned components dropped): {out / 'adapter_compact'}, ranks {ranks}")
    if export_rank is not None:
        compressed, errors = compress(adapter, export_rank)
        peft_export.save_peft_adapter(compressed, out / f"adapter_rank{export_rank}", model)
        write_json_atomic(out / f"adapter_rank{export_rank}" / "svd_error.json", errors)
        log(f"rank-{export_rank} SVD export: relative Frobenius error {errors}")
    if plot_training(out / "metrics.jsonl", out / "merge_training.png"):
        log(f"plot: {out / 'merge_training.png'}")
