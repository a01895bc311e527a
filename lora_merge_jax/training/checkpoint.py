"""Training checkpoints with orbax-checkpoint: the train state and the data position, never base weights.

Each checkpoint step directory holds ``state`` (the TrainState pytree: adapter, masks, optimizer state,
step, RNG, counters, pruning statistics) and ``data`` (the iterator position, JSON). Orbax writes a step
into a temporary directory (``<step>.orbax-checkpoint-tmp-<time>``) and renames it when complete, so an
interrupted save is never listed as a step; ``restore`` therefore only sees complete checkpoints. A
complete one damaged afterwards (a truncated or corrupted file: OCDBT checks CRC-32C checksums) raises
``CheckpointError`` naming its step directory. The run's resolved config is written
beside the steps (``run_config.yaml``) so a resume can refuse a different config.

Multi-process jobs: every process creates the ``Checkpointer`` and calls ``save``, ``restore``, ``quarantine``,
``wait`` and ``close`` for the same steps, in the same order (orbax synchronises them inside); each writes
and reads its own shards of the state, into a directory all of them can reach (a shared file system).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the message names its directory."""


class Checkpointer:
    """Saves and restores ``(TrainState, data position)`` under ``directory``.

    Example:
        >>> ckpt = Checkpointer("runs/x/checkpoints", keep=3)
        >>> ckpt.save(100, state, {"epoch": 0, "index": 12})
        >>> state, position = ckpt.restore(abstract_state)
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise FileExistsError(f"{self.directory}: exists and is not a directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_position: dict, force: bool = False) -> bool:
        """Starts saving (asynchronously when enabled); returns whether a save was started."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores ``step`` (default: the latest complete one) into ``abstract_state``'s structure and shardings.

        Args:
            abstract_state: the TrainState as ShapeDtypeStructs with shardings (``jax.eval_shape`` of init).
            step: which step; default the latest.

        Returns:
            (state, data position, step).

        Raises:
            CheckpointError: no checkpoint, or one that cannot be read (naming its directory).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        error: Exception | None = None
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
            )
        except Exception as e:  # orbax raises many types for a damaged step directory
            error = e
        failed = _processes_where(error is not None)  # each process reads its own shards: all must agree
        if failed:
            reason = (f"{type(error).__name__}: {error}" if error is not None
                      else f"process(es) {failed} could not read their part of it")
            raise CheckpointError(f"{self.directory / str(step)}: cannot restore checkpoint: {reason}") from error
        return restored.state, dict(restored.data), step

    def quarantine(self, step: int) -> Path:
        """Moves step directory ``step`` (one that cannot be restored) to ``damaged_checkpoints/`` beside
        this directory, so that it is kept for inspection but is no longer a step; returns where it went."""
        target_dir = self.directory.parent / "damaged_checkpoints"
        target = target_dir / str(step)
        suffix = 1
        while target.exists():
            target, suffix = target_dir / f"{step}.{suffix}", suffix + 1
        _barrier(f"quarantine {step}: target chosen")  # every process has looked before process 0 moves it
        if jax.process_index() == 0:
            target_dir.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        _barrier(f"quarantine {step}: moved")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _barrier(name: str) -> None:
    """Waits until every process of a multi-process job gets here (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _processes_where(flag: bool) -> list[int]:
    """The processes on which ``flag`` is true (every process calls this; with one process, no collective)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    flags = multihost_utils.process_allgather(np.int32(flag))
    return [int(i) for i in np.flatnonzero(flags)]


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``state`` carrying ``shardings``: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
