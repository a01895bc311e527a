"""Greedy decode-step time of SmolLM2-135M-Instruct in lora_merge_jax alone (no reference implementation).

The per-step cost of the decode loop, isolated from the prefill: ``generate`` with 1 and with N new tokens on
the same prompts (random token ids, no EOS, so every row decodes N tokens), each the best of 2 timed runs
after a compiling one; per step = (t_N - t_1) / (N - 1). For comparisons with transformers, see
``decode_bench.py``; this one is for A/B runs of our own code (two checkouts, alternated).

    python bench/decode_step.py --batch 16 --prompt-len 256 --new-tokens 49 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lora_merge_jax as lmj  # noqa: E402
from lora_merge_jax.evaluation import generate as gen  # noqa: E402
from lora_merge_jax.io.gguf_fetch import fetch_smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=49)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and activations")
    args = parser.parse_args()
    model = lmj.load_pretrained(fetch_smollm2(), dtype=args.dtype)
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(10, 40000, args.prompt_len)] for _ in range(args.batch)]

    def run(new_tokens: int) -> float:
        start = time.perf_counter()
        gen.generate(model, prompts, max_new_tokens=new_tokens, eos_token_ids=())
        return time.perf_counter() - start

    run(1), run(args.new_tokens)  # compile both programs
    one = min(run(1) for _ in range(2))
    many = min(run(args.new_tokens) for _ in range(2))
    step_ms = (many - one) / (args.new_tokens - 1) * 1e3
    print(f"{args.dtype}, batch {args.batch}, prompt {args.prompt_len}: prefill + 1 token {one:.3f} s, "
          f"{args.new_tokens} tokens {many:.3f} s, decode step {step_ms:.1f} ms")


if __name__ == "__main__":
    main()
