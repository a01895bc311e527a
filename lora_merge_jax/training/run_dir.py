"""The run directory: its resolved config (refusing a resume with a different one), and resuming from it.

A run directory holds ``run_config.yaml`` (the resolved config, seed included), ``checkpoints/``,
``damaged_checkpoints/`` (checkpoints that failed to restore, moved aside by ``--resume latest_valid``),
``metrics.jsonl``, ``tensorboard/`` and the exported ``adapter/``. In a multi-process job process 0 writes
them (the others wait at a barrier), into a directory every process can read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_merge_jax import config
from lora_merge_jax.io.files import write_text_atomic
from lora_merge_jax.training.checkpoint import Checkpointer, CheckpointError
from lora_merge_jax.training.config import TrainConfig

RUN_CONFIG = "run_config.yaml"
# How a run is launched, not what it computes: a resume may use other processes, ports, or one host.
LAUNCH_FIELDS = ("distributed", "coordinator_address", "num_processes", "process_id")


def without_launch_fields(run_config: dict) -> dict:
    """A config's plain form (``config.to_dict``) without the fields that only say how it is launched."""
    train = {k: v for k, v in (run_config.get("train") or {}).items() if k not in LAUNCH_FIELDS}
    return {**run_config, "train": train}


def check_run_config(out: Path, cfg: TrainConfig, force: bool) -> bool:
    """Refuses a resume whose config differs from the one the run started with (``output_dir`` and how it is
    launched aside: a moved run directory, or one resumed on other processes, still resumes); returns
    whether ``run_config.yaml`` needs (re)writing."""
    file = out / RUN_CONFIG
    current = config.to_dict(cfg)
    if not file.exists():
        return True
    saved = yaml.safe_load(file.read_text())
    if saved == current:
        return False
    saved, current = without_launch_fields(saved), without_launch_fields(current)
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k) and k != "output_dir")
    if diff and not force:
        raise ValueError(f"{file}: this run was started with a different config (sections {diff} differ); "
                         "resume with the same config, or pass --force to override")
    return True


def write_run_config(out: Path, cfg: TrainConfig) -> None:
    """Writes the run's resolved config (seed included) beside its checkpoints, atomically."""
    write_text_atomic(out / RUN_CONFIG, yaml.safe_dump(config.to_dict(cfg), sort_keys=False, allow_unicode=True))


def restore(ckpt: Checkpointer, abstract: Any, mode: str, log) -> tuple[Any, dict, int]:
    """Restores the latest complete checkpoint; with ``latest_valid`` the latest one that restores.

    Orbax lists only complete (renamed) step directories, so a save cut short is never a candidate. A
    listed one that cannot be read (truncated, corrupted) is an error with ``latest``; ``latest_valid``
    says so, falls back to the previous one, and moves the damaged ones aside (to
    ``damaged_checkpoints/`` beside ``checkpoints/``) so that the resumed run can save those steps again.
    """
    if mode not in ("latest", "latest_valid"):
        raise ValueError(f"--resume {mode!r}: expected 'latest' or 'latest_valid'")
    steps = ckpt.steps()
    if mode == "latest":
        try:
            return ckpt.restore(abstract, steps[-1])
        except CheckpointError as e:
            raise CheckpointError(f"{e}\nthe latest checkpoint cannot be restored (damaged?); nothing was changed. "
                                  "Pass --resume latest_valid to fall back to the previous complete checkpoint") from e
    damaged = []
    for step in reversed(steps):
        try:
            restored = ckpt.restore(abstract, step)
        except CheckpointError as e:
            log(f"checkpoint step {step} cannot be restored ({e}); trying the previous one")
            damaged.append(step)
            continue
        for bad in damaged:
            log(f"damaged checkpoint step {bad} moved to {ckpt.quarantine(bad)}")
        return restored
    raise CheckpointError(f"{ckpt.directory}: none of the checkpoints {steps} could be restored")
