"""Evaluate one or several adapters (or the base model) on a summarization data set.

    python eval.py                                    # the base model and the adapter of `python train.py`
    python eval.py --config configs/eval_scitldr.yaml --set model_path=/ckpt/Llama-3.2-1B --set data.data_dir=/data

Writes predictions_<name>.jsonl, scores.json and report.md to output_dir.
"""

from __future__ import annotations

import argparse
import json
import sys

from lora_merge_jax import config, tiny
from lora_merge_jax.evaluation.evaluate import EvalConfig


def _embedded_default() -> list[str]:
    """With no --config: the embedded tiny model and task, base model against `python train.py`'s adapter."""
    task = tiny.embedded_task(tiny.DEFAULT_RUN_DIR)
    return [f"data.{key}={json.dumps(value)}" for key, value in task.items()] + [
        "data.max_eval_examples=32", "generation.max_new_tokens=48", "metrics.reference_loss=true",
        f"adapters=[{{name: base, path: null}}, {{name: lora, path: {tiny.DEFAULT_RUN_DIR}}}]"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny model and task)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    try:
        defaults = _embedded_default() if args.config is None else []
        cfg = config.load_config(EvalConfig, args.config, defaults + args.set)
    except ValueError as e:  # ConfigError, and the checks some config sections run on construction
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lora_merge_jax.evaluation.evaluate import evaluate

    try:
        evaluate(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"report: {cfg.output_dir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
