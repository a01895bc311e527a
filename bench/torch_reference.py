"""The reference the benchmarks compare with, set up one way: transformers' PyTorch models, and PEFT LoRA.

``torch_model`` is transformers' model of a checkpoint directory or, through transformers' own GGUF loader, of
a ``.gguf`` file, in float32 or bfloat16 (``decode_bench.py`` generates with it). ``peft_lora`` puts a fresh PEFT
LoRA on it (alpha = 2 x rank, no dropout; float32 factors on a bfloat16 model, PEFT's default) with
``torch.optim.AdamW`` without weight decay, and its ``step`` clips the gradient norm to 1.0 as ours does
(``train_bench.py``: one step on a fixed batch; ``epoch_bench.py``: an epoch of padded batches). Import this
module after setting the thread environment: it imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import transformers


def torch_model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' model of a checkpoint directory or of a .gguf file (its own GGUF loader) in ``dtype``."""
    if path.suffix.lower() == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


class PeftLora(NamedTuple):
    model: torch.nn.Module  # the PEFT model, in training mode
    params: list[torch.nn.Parameter]  # the LoRA factors (the only trainable parameters)
    optimizer: torch.optim.Optimizer

    def step(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step on a [B, T] batch (labels -100 where there is no loss); returns the loss."""
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def peft_lora(path: Path, rank: int, target_modules: tuple[str, ...], learning_rate: float,
              dtype: torch.dtype = torch.float32) -> PeftLora:
    """The checkpoint at ``path`` in ``dtype`` with a fresh PEFT LoRA of ``rank`` on ``target_modules`` (float32
    factors whatever ``dtype``: PEFT's ``autocast_adapter_dtype``) and its AdamW."""
    import peft

    model = peft.get_peft_model(torch_model(path, dtype), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(target_modules), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return PeftLora(model, params, torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0))
