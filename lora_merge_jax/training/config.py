"""The configuration of a training run (``train.py``), as typed frozen dataclasses.

One ``TrainConfig`` describes a LoRA or MELoRA trained on a source task, or the adaptive merge of task
LoRAs on a target task (with its ablations). Every field can be set in YAML or with
``--set section.field=value``; unknown keys are refused by name (``config.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from lora_merge_jax.data.records import DataConfig
from lora_merge_jax.merge.pruning import PruneConfig
from lora_merge_jax.models.config import PROJECTIONS
from lora_merge_jax.sharding import MeshConfig
from lora_merge_jax.training.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The frozen base model."""

    path: str | None = None  # Hugging Face checkpoint directory; null = the embedded tiny model
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the frozen base weights
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # activations (default: dtype)


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    """The adapter trained from scratch (kind lora or melora) or the merge (kind merge)."""

    kind: Literal["lora", "melora", "merge"] = "lora"  # what is trained
    rank: int = 8  # LoRA rank r (MELoRA: rank of each mini LoRA)
    alpha: float = 16.0  # LoRA alpha (MELoRA: alpha of each mini LoRA)
    target_modules: tuple[str, ...] | str = PROJECTIONS  # projection names, or a regex over module paths
    layers: tuple[int, ...] | None = None  # adapt only these layers (PEFT layers_to_transform)
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    rank_pattern: dict[str, int] | None = None  # per-module rank overrides (regex keys, as PEFT)
    alpha_pattern: dict[str, float] | None = None  # per-module alpha overrides
    num_blocks: int = 4  # MELoRA: number of mini LoRAs n
    dropout: float = 0.0  # dropout on the adapter input during training
    init_from: str | None = None  # start from this PEFT adapter directory instead of a fresh init

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter.rank: must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout: must be in [0, 1), got {self.dropout}")
        if self.num_blocks < 1:
            raise ValueError(f"adapter.num_blocks: must be >= 1, got {self.num_blocks}")


@dataclasses.dataclass(frozen=True)
class MergeSection:
    """The adaptive merge of task LoRAs (used when adapter.kind is merge)."""

    task_adapters: tuple[str, ...] = ()  # PEFT adapter directories (or run directories with adapter/)
    granularity: Literal["task", "task_layer", "task_module"] = "task"  # one coefficient per ...
    init_coefficients: float | None = None  # initial c_k (default 1/K)
    train_factors: bool = True  # false: coefficients only, LoRAs frozen (the ablation)
    pruning: PruneConfig = PruneConfig()  # parameter pruning during fine-tuning
    export_rank: int | None = None  # also export an SVD-compressed LoRA of this rank


@dataclasses.dataclass(frozen=True)
class RunSection:
    """The training loop."""

    steps: int = 200  # optimizer steps
    seed: int = 0  # adapter init and dropout
    grad_accum: int = 1  # micro-batches per step
    remat: bool = False  # recompute layer activations in the backward pass (saves memory)
    log_every: int = 10  # steps between metric lines
    save_every: int = 100  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept
    async_checkpoints: bool = True  # write checkpoints in the background
    max_nonfinite_in_a_row: int = 10  # stop (after saving) when this many steps in a row are non-finite
    distributed: bool = False  # multi-process job: call jax.distributed.initialize() (TPU pod, SLURM: auto-detected)
    coordinator_address: str | None = None  # host:port of process 0's coordinator (else auto-detected)
    num_processes: int | None = None  # processes in the job, with coordinator_address
    process_id: int | None = None  # this process's index in [0, num_processes), with coordinator_address
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "save_every", "keep_checkpoints", "max_nonfinite_in_a_row"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        explicit = {n: getattr(self, n) for n in ("coordinator_address", "num_processes", "process_id")}
        if any(v is not None for v in explicit.values()):
            missing = [n for n, v in explicit.items() if v is None]
            if missing:
                raise ValueError(f"train.{', train.'.join(missing)}: coordinator_address, num_processes and "
                                 "process_id are set together (or none of them, to auto-detect)")
            if not self.distributed:
                raise ValueError("train.coordinator_address: set with train.distributed false; a multi-process "
                                 "job needs train.distributed: true")
            if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
                raise ValueError(f"train.process_id: must be in [0, num_processes={self.num_processes}), "
                                 f"got {self.process_id}")

    def distributed_kwargs(self) -> dict[str, str | int]:
        """Keyword arguments of ``jax.distributed.initialize`` ({} = auto-detection)."""
        if self.coordinator_address is None:
            return {}
        return {"coordinator_address": self.coordinator_address, "num_processes": self.num_processes,
                "process_id": self.process_id}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    output_dir: str = "runs/default"  # checkpoints, metrics, the exported adapter
    model: ModelSection = ModelSection()
    adapter: AdapterSection = AdapterSection()
    merge: MergeSection = MergeSection()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: RunSection = RunSection()
    mesh: MeshConfig = MeshConfig()

    def validate(self) -> None:
        if self.adapter.kind == "merge":
            if not self.merge.task_adapters:
                raise ValueError("merge.task_adapters: a merge needs at least one task LoRA, got zero")
            p = self.merge.pruning
            if p.enabled and p.criterion == "sensitivity" and not self.merge.train_factors:
                raise ValueError("merge.pruning.criterion: 'sensitivity' needs gradients of the factors; "
                                 "with merge.train_factors false use 'magnitude'")
