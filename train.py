"""Train a LoRA or MELoRA on a source task, or the adaptive merge of task LoRAs on a target task.

    python train.py                                   # the embedded tiny model and task, about a minute on CPU
    python train.py --config configs/lora_scitldr.yaml --set data.data_dir=../shared/data
    python train.py --config configs/merge_xscitldr_ja.yaml --resume latest
"""

from __future__ import annotations

import argparse
import sys

from lora_merge_jax import config
from lora_merge_jax.training.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny model and task)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--resume", nargs="?", const="latest", choices=["latest", "latest_valid"],
                        help="continue from the latest complete checkpoint (latest_valid: skip damaged ones)")
    parser.add_argument("--force", action="store_true", help="resume even if the config changed")
    args = parser.parse_args(argv)
    try:
        cfg = config.load_config(TrainConfig, args.config, args.set)
    except ValueError as e:  # ConfigError, and the checks some config sections run on construction
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lora_merge_jax.training.loop import train

    try:
        result = train(cfg, resume=args.resume, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.losses:
        print(f"loss: first {result.losses[0]:.4f}, last {result.losses[-1]:.4f} over {len(result.losses)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
