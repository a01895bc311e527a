"""Greedy decode-step time of SmolLM2-135M-Instruct in lora_merge_jax alone (no reference implementation).

The per-step cost of the decode loop, isolated from the prefill: ``generate`` with 1 and with N new tokens on
the same prompts (random token ids, no EOS, so every row decodes N tokens), each the best of 2 timed runs
after a compiling one; per step = (t_N - t_1) / (N - 1). For comparisons with transformers, see
``decode_bench.py``; this one is for A/B runs of our own code (two checkouts, alternated).

``--compare-dot-libraries`` times the program that ``generate`` picks (``models/dot_library.py``: Eigen's dots
for float32 on a CPU) against one compiled with XLA's defaults (YNNPACK's dots), alternated in one process
for ``--rounds`` rounds (one ``generate`` call's time varies by seconds from call to call on shared machines):
the check to run on a CPU type where that choice was never measured.

    python bench/decode_step.py --batch 16 --prompt-len 256 --new-tokens 49 [--dtype bfloat16]
    python bench/decode_step.py --batch 16 --prompt-len 256 --new-tokens 33 --compare-dot-libraries --rounds 3
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
    parser.add_argument("--compare-dot-libraries", action="store_true",
                        help="also time XLA's default dot library, alternated with generate's choice")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each length (and program)")
    args = parser.parse_args()
    model = lmj.load_pretrained(fetch_smollm2(), dtype=args.dtype)
    rng = np.random.default_rng(0)
    prompts = [[int(x) for x in rng.integers(10, 40000, args.prompt_len)] for _ in range(args.batch)]

    chosen = gen.program_for(model.activation_dtype)
    programs = {"generate's choice": chosen}
    if args.compare_dot_libraries:
        programs["XLA's defaults"] = gen._program(())
        if programs["XLA's defaults"] is chosen:
            sys.exit(f"generate already runs XLA's defaults for {args.dtype} here: nothing to compare")
    pick = gen.program_for

    def run(name: str, new_tokens: int) -> tuple[float, list[list[int]]]:
        gen.program_for = lambda _dtype: programs[name]  # which compiled program generate calls
        try:
            start = time.perf_counter()
            tokens = gen.generate(model, prompts, max_new_tokens=new_tokens, eos_token_ids=())
            return time.perf_counter() - start, tokens
        finally:
            gen.program_for = pick

    outputs = {}
    for name in programs:  # compile both lengths of each program
        run(name, 1)
        outputs[name] = run(name, args.new_tokens)[1]
    if len(set(map(str, outputs.values()))) > 1:
        print("note: the programs' tokens differ (float32 sums in another order can flip a near tie)")
    times = {name: {1: [], args.new_tokens: []} for name in programs}
    for round_ in range(args.rounds):
        for name in programs if round_ % 2 == 0 else list(programs)[::-1]:
            for n in (1, args.new_tokens):
                times[name][n].append(run(name, n)[0])
    for name, by_length in times.items():
        one, many = min(by_length[1]), min(by_length[args.new_tokens])
        step_ms = (many - one) / (args.new_tokens - 1) * 1e3
        print(f"{name}: {args.dtype}, batch {args.batch}, prompt {args.prompt_len}: prefill + 1 token "
              f"{one:.3f} s, {args.new_tokens} tokens {many:.3f} s, decode step {step_ms:.1f} ms")


if __name__ == "__main__":
    main()
