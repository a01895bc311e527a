"""Convert a llama.cpp GGUF file (Llama, Mistral, Qwen2) into a Hugging Face checkpoint directory.

    python convert_gguf.py model.gguf out_dir [--dtype float32|bfloat16|float16] [--max-shard-gb 5]

The output (config.json, model.safetensors or shards with an index, tokenizer files with the chat
template) loads in transformers (``AutoModelForCausalLM.from_pretrained(out_dir)``) and in
``lora_merge_jax.load_pretrained(out_dir)``, and can be a train.py ``model.path``. Quantized weights are
dequantized to float32 (what llama.cpp and transformers compute), then written in ``--dtype``: float32
(the default) keeps them exactly, bfloat16 halves the size. One tensor is held in memory at a time.
``load_pretrained`` also reads the .gguf directly; converting once saves the dequantization at each load
and gives a directory other tools read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the .gguf file (or a directory holding exactly one)")
    parser.add_argument("out_dir", help="output checkpoint directory (created)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the written weights")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="split the weights into files of at most this many GiB (default 5)")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write the tokenizer files")
    args = parser.parse_args(argv)

    from lora_merge_jax.io.hf import convert_gguf

    try:
        out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                           write_tokenizer=not args.no_tokenizer)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        parser.exit(2, f"convert_gguf.py: error: {e}\n")
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return out


if __name__ == "__main__":
    main()
