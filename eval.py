"""Evaluate one or several adapters (or the base model) on a summarization data set.

    python eval.py                                    # after `python train.py`: the default job's comparison
    python eval.py --config configs/eval_scitldr.yaml --set model_path=/ckpt/Llama-3.2-1B --set data.data_dir=/data

Writes predictions_<name>.jsonl, scores.json and report.md to output_dir. With no --config, the embedded
default job of `python train.py` (lora_merge_jax/default_job.py): the base model, a LoRA from scratch, the
static merge and the adaptive merge with pruning, on the toy target's dev split; the report
(runs/default/eval/report.md) also shows the merge's coefficients and sparsity over training and its plot.
"""

from __future__ import annotations

import argparse
import sys

from lora_merge_jax import config, default_job
from lora_merge_jax.evaluation.evaluate import EvalConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: the comparison of the embedded default job)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    embedded = args.config is None
    try:
        if embedded:
            cfg = default_job.eval_config(args.set)
        else:
            cfg = config.load_config(EvalConfig, args.config, args.set)
    except ValueError as e:  # ConfigError, and the checks some config sections run on construction
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lora_merge_jax.evaluation.evaluate import evaluate

    try:
        if embedded:
            default_job.evaluate_default(cfg)  # prints the table and where the report is
        else:
            evaluate(cfg)
            print(f"report: {cfg.output_dir}/report.md")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
