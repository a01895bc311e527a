"""The embedded default: a tiny Llama-architecture model and toy tasks, made here, no download.

``python train.py`` with no arguments uses these (``default_job.py``), so that a fresh install runs the
project's main job end to end in a few minutes on two CPU cores. The tokenizer is character-level
(printable ASCII), built with the ``tokenizers`` package and saved in transformers' format; the model is a
real checkpoint directory written with our own ``save_pretrained``; the tasks are deterministic toy
"summarisations" of a list of words: word-level transformations over one small vocabulary (``TOY_TASKS``:
reverse the list, sort it, rotate it by one, sort it in descending order...), related enough that LoRAs
trained on some of them help with another.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from lora_merge_jax import sharding
from lora_merge_jax.io.files import write_text_atomic
from lora_merge_jax.io.hf import save_pretrained
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import from_hf_config
from lora_merge_jax.models.model import Model

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORDS = ("apple", "river", "stone", "cloud", "green", "light", "music", "paper", "quiet", "storm", "tiger",
         "under", "voice", "water", "young", "zebra", "bread", "chair", "dance", "eagle")


def build_tokenizer(vocab_size: int = 128) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with pad/bos/eos/unk (ids 0-3)."""
    chars = list(SPECIAL_TOKENS) + [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    if len(chars) > vocab_size:
        raise ValueError(f"a character tokenizer needs vocab_size >= {len(chars)}, got {vocab_size}")
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def tiny_hf_config(vocab_size: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   ffw: int = 128) -> transformers.LlamaConfig:
    """A Llama 3-style config small enough to train on a laptop CPU in seconds."""
    return transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffw, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def make_tiny_model(path: str | Path, seed: int = 0, **config_kwargs) -> Path:
    """Writes a random-weight tiny Llama checkpoint (config, safetensors, tokenizer) to ``path``.

    Weights are drawn with std 1/sqrt(hidden): with the usual 0.02 a model this narrow has logits too
    flat for any adapter to make a confident prediction through the tied embeddings.
    """
    hf_config = tiny_hf_config(**config_kwargs)
    cfg = from_hf_config(hf_config)
    mesh = sharding.make_mesh()
    weights = weights_lib.init_random(cfg, jax.random.key(seed), jnp.float32, mesh, std=cfg.hidden_size ** -0.5)
    model = Model(cfg, weights, mesh, hf_config, build_tokenizer(hf_config.vocab_size))
    return save_pretrained(model, path)


def _reverse(words: list[str]) -> list[str]:
    return words[::-1]


def _sort(words: list[str]) -> list[str]:
    return sorted(words)


def _rotate(words: list[str]) -> list[str]:
    return words[1:] + words[:1]


def _sort_descending(words: list[str]) -> list[str]:
    return sorted(words, reverse=True)


# name -> (transformation of the word list, prompt template). All share WORDS and the input distribution.
TOY_TASKS: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "reverse": (_reverse, "Reverse: {input}\n"),
    "sort": (_sort, "Sort: {input}\n"),
    "rotate": (_rotate, "Rotate: {input}\n"),
    "sort_descending": (_sort_descending, "Sort descending: {input}\n"),
}


def word_task_example(rng: random.Random, task: str) -> dict[str, str]:
    """One record of toy task ``task``: 3 to 6 words drawn from ``WORDS`` and their transformation."""
    transform, _ = TOY_TASKS[task]
    words = rng.choices(WORDS, k=rng.randint(3, 6))
    return {"document": " ".join(words), "summary": " ".join(transform(words))}


def make_word_task(directory: str | Path, task: str, train_size: int, dev_size: int, seed: int | str = 0) -> Path:
    """Writes ``train.jsonl`` and ``dev.jsonl`` of toy task ``task`` (fields document, summary); the same
    arguments always write the same files (``random.Random(seed)``: a string seed is as deterministic)."""
    if task not in TOY_TASKS:
        raise ValueError(f"unknown toy task {task!r}; choose among {', '.join(TOY_TASKS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, size in (("train", train_size), ("dev", dev_size)):
        lines = [json.dumps(word_task_example(rng, task)) for _ in range(size)]
        write_text_atomic(directory / f"{split}.jsonl", "\n".join(lines) + "\n")
    return directory


def make_tiny_task(directory: str | Path, train_size: int = 512, dev_size: int = 64, seed: int = 0) -> Path:
    """Writes ``train.jsonl`` and ``dev.jsonl`` of the word-reversal task (fields document, summary)."""
    return make_word_task(directory, "reverse", train_size, dev_size, seed)


DEFAULT_RUN_DIR = Path("runs/default")  # where `python train.py` with no arguments writes


def embedded_model(run_dir: str | Path) -> Path:
    """The embedded model's directory under ``run_dir``, written on first use."""
    path = Path(run_dir) / "embedded" / "model"
    if not (path / "config.json").exists():
        make_tiny_model(path)
    return path


def embedded_task(run_dir: str | Path) -> dict[str, Any]:
    """The embedded task's data-section fields (``DataConfig`` keywords), its files written on first use."""
    directory = Path(run_dir) / "embedded" / "task"
    if not (directory / "train.jsonl").exists():
        make_tiny_task(directory)
    return {"data_dir": str(directory), "train_file": "train.jsonl", "eval_file": "dev.jsonl",
            "prompt_template": "Reverse: {input}\n", "max_length": 96, "max_target_length": 48,
            "length_buckets": (64,)}


def toy_task(run_dir: str | Path, task: str, train_size: int, dev_size: int, seed: int = 0) -> dict[str, Any]:
    """Toy task ``task``'s data-section fields (``DataConfig`` keywords), its files written on first use under
    ``run_dir/embedded/tasks/<task>-<train_size>-<dev_size>-<seed>/`` (so other sizes never reuse them)."""
    directory = Path(run_dir) / "embedded" / "tasks" / f"{task}-{train_size}-{dev_size}-{seed}"
    if not (directory / "dev.jsonl").exists():  # dev is written last
        # Seeded by the task's name too: tasks draw different word lists, so the target's dev inputs are not
        # the sources' training inputs.
        make_word_task(directory, task, train_size, dev_size, f"{task}:{seed}")
    # One padded length, so one compiled train step per run: the longest prompt (bos, "Sort descending: ", 6
    # five-letter words, newline: 54 tokens) and summary (35 characters and the end token) fit in 96, and an
    # evaluation prompt fits in 96 - max_target_length, so no input is ever cut.
    return {"data_dir": str(directory), "train_file": "train.jsonl", "eval_file": "dev.jsonl",
            "prompt_template": TOY_TASKS[task][1], "max_length": 96, "max_target_length": 40,
            "length_buckets": ()}
