"""Train a LoRA or MELoRA on a source task, or the adaptive merge of task LoRAs on a target task.

    python train.py                                   # the embedded default job: the adaptive merge in miniature
    python train.py --config configs/lora_scitldr.yaml --set data.data_dir=../shared/data
    python train.py --config configs/merge_xscitldr_ja.yaml --resume latest

Multi-process jobs run this same command in every process with ``--set train.distributed=true`` (the job is
auto-detected on Cloud TPU and under SLURM), or with the coordinator given explicitly:
``--set train.coordinator_address=host0:1234 --set train.num_processes=N --set train.process_id=i``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from lora_merge_jax import config
from lora_merge_jax.training.config import TrainConfig

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def _exit_now(code: int) -> None:
    """Leaves a multi-process job at once. A normal exit would run ``jax.distributed.shutdown()`` (atexit), a
    barrier the other processes may never reach, so an error on one process would hang all of them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (with neither --config nor --set: the embedded default "
                        "job; with --set only: a LoRA on the embedded tiny model and toy task)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", choices=["latest", "latest_valid"],
                        help="continue from the latest complete checkpoint (latest_valid: skip damaged ones)")
    parser.add_argument("--force", action="store_true", help="resume even if the config changed")
    args = parser.parse_args(argv)
    if args.config is None and not args.set and args.resume is None and not args.force:
        return _main_default()
    try:
        cfg = config.load_config(TrainConfig, args.config, args.set)
    except ValueError as e:  # ConfigError, and the checks some config sections run on construction
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lora_merge_jax.training.loop import train

    if cfg.train.distributed:
        return _main_distributed(cfg, args)
    try:
        result = train(cfg, resume=args.resume, force=args.force)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.losses:
        print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} over {len(result.losses)} steps")
    return 0


def _main_default() -> int:
    """No arguments: the embedded default job (``default_job.py``): source LoRAs on toy tasks (cached), then their
    adaptive merge with pruning on a low-resource toy target, and the baselines ``python eval.py`` compares."""
    from lora_merge_jax.default_job import run_default

    try:
        run_default()
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _main_distributed(cfg: TrainConfig, args: argparse.Namespace) -> int:
    """``main`` in one process of a multi-process job: any error ends this process at once (exit 1) after
    printing it, so that the job's launcher sees it and stops the others; a clean end leaves the job."""
    import jax

    from lora_merge_jax.training.loop import train

    try:
        result = train(cfg, resume=args.resume, force=args.force)
    except EXPECTED_ERRORS as e:
        where = f" (process {jax.process_index()})" if jax.distributed.is_initialized() else ""
        print(f"error{where}: {e}", file=sys.stderr)
        _exit_now(1)
    except BaseException:  # noqa: BLE001  (anything else: the traceback, then out)
        traceback.print_exc()
        _exit_now(1)
    if result.losses and jax.process_index() == 0:
        print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} over {len(result.losses)} steps")
    sys.stdout.flush()
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
