"""One epoch of SciTLDR on SmolLM2-135M: our packed training against transformers + PEFT with per-batch padding.

The figure a user feels: the wall time of an epoch over the SciTLDR train split (the ``configs/data/scitldr.yaml``
template, 1,992 examples; ``--examples N`` takes the first N of the preset's subset shuffle), LoRA rank 8 on
all seven projections, AdamW (clip 1.0), float32, batch 8, on the real SmolLM2-135M-Instruct (its GGUF).

- Ours: ``training.loop.train`` exactly as ``train.py`` runs it, with ``data.packing: true``: examples in the
  epoch's shuffled order are packed first-fit into rows of the preset's ``pack_length`` tokens (segment ids
  keep them apart), and the epoch is the iterator's full batches of packed rows. Timed end to end (model
  load, compilation of each row length, the steps, the final checkpoint and PEFT export), and the step loop
  (from metrics.jsonl; its first step includes the compile).
- Theirs: ``peft.get_peft_model`` on transformers' own GGUF load, the same examples in the same epoch order,
  batches of 8 examples right-padded to the batch's longest (``DataCollatorForSeq2Seq``'s padding: labels
  -100 on prompts and pads), the same optimizer settings. Timed end to end the same way (model load to the
  last optimizer step), and the step loop alone.

Both report real (non-pad) tokens per second: the tokens of the examples each trained on, over its wall time.
The two run back to back in one process (ours first), with the machine's load printed before each; ours is
written to ``--out`` before PEFT starts. ``--peft-steps N`` runs PEFT on the epoch's first N batches only
and extrapolates its epoch: load time + step loop x (the epoch's padded tokens / those of the N batches),
since a step's time follows its padded tokens (the first N batches of a shuffled epoch are a random sample).
``--systems peft`` runs PEFT alone and takes ours from an earlier ``--out`` of the same settings.

    python bench/epoch_bench.py --examples 128 --out epoch_bench.json     # a part of the epoch
    python bench/epoch_bench.py --out epoch_bench.json                    # the whole epoch (about 2 h on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
RANK, LEARNING_RATE, BATCH = 8, 1e-4, 8
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def data_values(data_dir: Path, examples: int | None, packing: bool) -> dict:
    from lora_merge_jax import config

    values = config.read_yaml(REPO / "configs" / "data" / "scitldr.yaml")
    values.update(data_dir=str(data_dir), batch_size=BATCH, packing=packing, max_examples=examples)
    return values


def ours(gguf: Path, data: dict, out: Path) -> dict:
    """Our packed epoch through ``train()``: wall time, steps, real tokens."""
    from lora_merge_jax import config
    from lora_merge_jax.data.batching import TrainIterator
    from lora_merge_jax.data.prompts import build_train_examples, pad_token_id
    from lora_merge_jax.data.records import DataConfig
    from lora_merge_jax.io.gguf import gguf_tokenizer
    from lora_merge_jax.training.config import TrainConfig
    from lora_merge_jax.training.loop import train

    tokenizer = gguf_tokenizer(gguf)  # the rows' sizes only: no need to load and dequantize the weights here
    examples, _ = build_train_examples(DataConfig(**data), tokenizer)
    iterator = TrainIterator(examples, DataConfig(**data), pad_token_id(tokenizer))
    steps = iterator.steps_in_epoch(0)
    rows = [next(iterator) for _ in range(steps)]
    real_tokens = int(sum(int(r["attention_mask"].sum()) for r in rows))
    padded_tokens = int(sum(r["input_ids"].size for r in rows))
    cfg = config.from_dict(TrainConfig, {
        "output_dir": str(out), "model": {"path": str(gguf), "dtype": "float32"},
        "adapter": {"kind": "lora", "rank": RANK, "alpha": 2.0 * RANK, "target_modules": list(PROJECTIONS)},
        "data": data, "optim": {"learning_rate": LEARNING_RATE, "decay": "constant", "warmup_steps": 0,
                                "clip_norm": 1.0, "weight_decay": 0.0},
        "train": {"steps": steps, "save_every": steps, "keep_checkpoints": 1, "async_checkpoints": False,
                  "progress": True, "log_every": 1}})
    start = time.perf_counter()
    result = train(cfg, log=lambda *a: print("  ours:", *a, flush=True))
    wall = time.perf_counter() - start
    if result.stopped_early:  # SIGTERM: train() saved and returned early, so the epoch's figures would be wrong
        raise SystemExit(f"ours stopped after {len(result.losses)} of {steps} steps: no result")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": steps, "examples": int(sum(r["segment_ids"].max(axis=1).sum() for r in rows)),
            "real_tokens": real_tokens, "padded_tokens": padded_tokens, "wall_s": wall,
            "loop_s": real_tokens / last["tokens_per_second"], "real_tokens_per_s": real_tokens / wall,
            "final_loss": result.losses[-1]}


def peft_epoch(gguf: Path, data: dict, max_steps: int | None) -> dict:
    """The same examples, in the same epoch order, through PEFT with per-batch padding (the first
    ``max_steps`` batches only, if given, with the epoch extrapolated from them)."""
    import torch
    import transformers
    from torch_reference import peft_lora

    from lora_merge_jax.data.batching import TrainIterator
    from lora_merge_jax.data.prompts import build_train_examples, pad_token_id
    from lora_merge_jax.data.records import DataConfig

    start = time.perf_counter()
    reference = peft_lora(gguf, RANK, PROJECTIONS, LEARNING_RATE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           trust_remote_code=False)
    cfg = DataConfig(**{**data, "packing": False})
    examples, _ = build_train_examples(cfg, tokenizer)
    order = TrainIterator(examples, cfg, pad_token_id(tokenizer)).epoch_order(0)
    pad = pad_token_id(tokenizer)
    steps = len(order) // BATCH
    batches = [[examples[i] for i in order[step * BATCH:(step + 1) * BATCH]] for step in range(steps)]
    lengths = [max(len(e.input_ids) for e in chunk) for chunk in batches]  # each batch padded to its longest
    padded = [BATCH * length for length in lengths]
    run = steps if max_steps is None else min(steps, max_steps)
    real_tokens, losses = 0, []
    loop_start = time.perf_counter()
    for step, (chunk, length) in enumerate(zip(batches[:run], lengths)):
        ids = torch.full((BATCH, length), pad, dtype=torch.long)
        mask = torch.zeros((BATCH, length), dtype=torch.long)
        labels = torch.full((BATCH, length), -100, dtype=torch.long)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n] = torch.as_tensor(e.input_ids)
            mask[r, :n] = 1
            labels[r, :n] = torch.where(torch.as_tensor(e.target_mask) == 1, ids[r, :n], -100)
            real_tokens += n
        losses.append(reference.step(ids, mask, labels))
        print(f"  peft: step {step + 1}/{run} loss {losses[-1]:.4f} ({time.perf_counter() - loop_start:.0f} s)",
              flush=True)
    end = time.perf_counter()
    setup, loop = loop_start - start, end - loop_start
    epoch_real = sum(len(e.input_ids) for chunk in batches for e in chunk)
    epoch_loop = loop * sum(padded) / sum(padded[:run])  # = loop when the whole epoch ran
    return {"steps": steps, "steps_run": run, "examples": steps * BATCH, "real_tokens": epoch_real,
            "real_tokens_run": real_tokens, "padded_tokens": sum(padded), "padded_tokens_run": sum(padded[:run]),
            "setup_s": setup, "loop_s_run": loop, "loop_s": epoch_loop, "wall_s": setup + epoch_loop,
            "extrapolated": run < steps, "real_tokens_per_s": epoch_real / (setup + epoch_loop),
            "final_loss": losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                    help="holds scitldr/train.jsonl (default ../shared/data)")
    ap.add_argument("--examples", type=int, help="the first N examples of the subset shuffle (default: all)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--systems", nargs="+", choices=("ours", "peft"), default=["ours", "peft"],
                    help="peft alone takes ours from --out, written by an earlier run of the same settings")
    ap.add_argument("--peft-steps", type=int, help="PEFT on the first N batches, the epoch extrapolated")
    args = ap.parse_args()
    if "ours" not in args.systems and not (args.out and args.out.exists()):
        raise SystemExit("--systems peft needs --out to hold an earlier run's results for ours")
    if not (args.data_dir / "scitldr" / "train.jsonl").exists():
        raise SystemExit(f"{args.data_dir / 'scitldr' / 'train.jsonl'}: not found; SciTLDR-A from "
                         "github.com/allenai/scitldr, or --data-dir")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from lora_merge_jax.io.gguf_fetch import fetch_smollm2

    gguf = fetch_smollm2()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results = {"examples_requested": args.examples, "threads": len(os.sched_getaffinity(0)), "load_before": {}}
    if "ours" in args.systems:
        with tempfile.TemporaryDirectory() as tmp:
            results["load_before"]["ours"] = os.getloadavg()[0]
            results["ours"] = ours(gguf, data_values(args.data_dir, args.examples, True), Path(tmp) / "run")
        if args.out:  # ours alone, in case the (longer) PEFT half is stopped
            args.out.write_text(json.dumps(results, indent=2))
    else:
        earlier = json.loads(args.out.read_text())
        if (earlier["examples_requested"], earlier["threads"]) != (args.examples, results["threads"]):
            raise SystemExit(f"{args.out}: ours ran with examples={earlier['examples_requested']}, threads="
                             f"{earlier['threads']}; this run has {args.examples}, {results['threads']}")
        results["ours"], results["load_before"] = earlier["ours"], earlier["load_before"]
    if "peft" not in args.systems:
        return
    results["load_before"]["peft"] = os.getloadavg()[0]
    results["peft"] = peft_epoch(gguf, data_values(args.data_dir, args.examples, False), args.peft_steps)
    o, p = results["ours"], results["peft"]
    results["speedup_real_tokens_per_s"] = o["real_tokens_per_s"] / p["real_tokens_per_s"]
    print(f"\nSciTLDR train, {o['examples']} of the epoch's examples, SmolLM2-135M, LoRA r={RANK} x 7, batch {BATCH}, "
          f"{results['threads']} threads; load {results['load_before']}")
    print("system                       steps  real tokens  wall s  real tok/s")
    print(f"ours, packed                 {o['steps']:5d}  {o['real_tokens']:11,d}  {o['wall_s']:6.0f}  "
          f"{o['real_tokens_per_s']:10.1f}   (padded: {o['padded_tokens']:,} tokens; step loop {o['loop_s']:.0f} s)")
    ran = f", {p['steps_run']} steps run, the rest extrapolated" if p["extrapolated"] else ""
    print(f"PEFT, per-batch padding      {p['steps']:5d}  {p['real_tokens']:11,d}  {p['wall_s']:6.0f}  "
          f"{p['real_tokens_per_s']:10.1f}   (padded: {p['padded_tokens']:,} tokens; step loop {p['loop_s']:.0f} s"
          f"{ran})")
    print(f"ours / PEFT, real tokens/s: {results['speedup_real_tokens_per_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
