"""The paper's comparison at small scale (issue 9): does merging source LoRAs with update + pruning win?

One command runs the whole study, resumably (every finished unit writes a ``result.json`` / ``DONE`` marker
and is skipped on a rerun; an interrupted unit is redone from scratch):

    python bench/paper_table.py --size cpu          # the full grid: 2 targets x 2 source settings x 3 N x 3 seeds
                                                    # (350 units, 15-80 s each on 2 CPU cores)
    python bench/paper_table.py --size cpu_long     # its core on a stronger base: ~1.5 h on 2 CPU cores
    python bench/paper_table.py --size cpu --targets xscitldr_ja --settings lora --ns 50   # a part of the grid
    python bench/paper_table.py --size smoke --out-dir /tmp/pt   # the whole pipeline in a minute (the test)
    python bench/paper_table.py --size cpu --report-only --targets xscitldr_ja mts_dialog   # report a grid
        # that several narrower invocations ran in parts, running nothing

``--size`` picks the model and budgets (``smoke``, ``cpu``: hidden 128, 4 layers, 200 pretraining steps;
``cpu_long``: the same with 1,500 pretraining steps and the core methods; ``gpu``: hidden 512, 8 layers,
4,000 steps); ``--seeds``, ``--ns``, ``--targets``, ``--settings``,
``--methods`` and the step options narrow or change the grid. Progress lines (with an estimate of the
time left) go to stdout and ``<out-dir>/log.txt``.

Stages, each under ``--out-dir`` (default ``runs/paper_table/<size>``):
  1. ``base/``: a byte-level BPE tokenizer trained on the *train* splits of ``--data-dir`` (English and
     Japanese abstracts, TLDRs, dialogues, notes) and a Llama-architecture model pretrained from scratch
     on the same text (``bench/pretrain.py``), saved as a Hugging Face checkpoint.
  2. ``sources/<setting>/<task>/``: source-task adapters trained with ``trainer.train`` on the full
     source data sets; setting ``lora`` (LoRAs) and ``melora`` (MELoRAs, exported as block-diagonal LoRAs).
  3. ``units/<target>/<setting>/<method>/N<n>/seed<s>/``: every method on N target training examples
     (``data.max_examples``, ``subset_seed = seed``) with the same number of steps, then the same evaluation
     on the target's development split: ROUGE-1/2/L (MeCab for Japanese), BLEU, and the per-token loss of
     the reference summaries (``evaluation.reference_loss``). Methods that do not see the target data (the
     base model, static merges) are run once (per seed when random) and shown under every N.
  4. ``results.json``, ``table.md``; unless ``--no-publish``, also the size's section of ``bench/RESULTS.md``
     ("## Paper table (issue 9)" for cpu, "..., size <size>" for the others) and its plot
     (``bench/paper_table.png``, ``bench/paper_table_<size>.png``; for smoke: inside ``--out-dir``).

Sources and targets. Target ``xscitldr_ja`` (X-SciTLDR ja->ja) merges SciTLDR en->en, MTS-Dialog and
X-SciTLDR en->ja; target ``mts_dialog`` (MTS-Dialog) holds MTS-Dialog out of the sources and merges
SciTLDR, X-SciTLDR en->ja and ACI-Bench (67 long dialogue -> clinical note pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from paper_table_report import ALL_METHODS  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one run of the study."""

    vocab_size: int
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
    max_eval_examples: int
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


PRESETS = {
    "smoke": Preset(vocab_size=512, hidden=32, layers=2, heads=2, kv_heads=1, ffw=64, seq_len=64, pretrain_steps=4,
                    pretrain_batch=4, pretrain_lr=3e-3, corpus_docs=60, max_length=192, max_target_length=12,
                    length_buckets=(128,), batch_size=4, source_steps=2, target_steps=3, max_eval_examples=4,
                    eval_batch=4, lorahub_budget=3, lorahub_max_examples=None, rank=2, melora_blocks=2, ns=(8,),
                    seeds=(0,), targets=("xscitldr_ja",), settings=("lora",),
                    methods=("base", "static_ties", "lorahub", "merge_prune")),
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
}

ACI_BENCH = {
    "train_file": "aci_bench/train.csv", "eval_file": "aci_bench/valid.csv", "input_field": "dialogue",
    "target_field": "note",
    "prompt_template": "Write the clinical note for the following doctor-patient conversation.\n\n{input}\n\nNote:\n",
}
# data presets: a file of configs/data or an inline dict
DATA = {"scitldr": "scitldr.yaml", "mts_dialog": "mts_dialog.yaml", "xscitldr_en_ja": "xscitldr_en_ja.yaml",
        "xscitldr_ja": "xscitldr_ja.yaml", "aci_bench": ACI_BENCH}
TARGETS = {"xscitldr_ja": ("ja", ("scitldr", "mts_dialog", "xscitldr_en_ja")),
           "mts_dialog": ("en", ("scitldr", "xscitldr_en_ja", "aci_bench"))}


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


# --------------------------------------------------------------------------------------------- configs


def data_section(name: str, preset: Preset, data_dir: Path, **extra: Any) -> dict[str, Any]:
    """A DataConfig dict: the data preset, cut to the preset's lengths."""
    from lora_merge_jax import config

    spec = DATA[name]
    values = dict(spec) if isinstance(spec, dict) else config.read_yaml(REPO / "configs" / "data" / spec)
    values.update(data_dir=str(data_dir), max_length=preset.max_length,
                  max_target_length=preset.max_target_length, length_buckets=list(preset.length_buckets),
                  batch_size=preset.batch_size, max_eval_examples=preset.max_eval_examples, **extra)
    return values


def train_config(out: Path, base: Path, data: dict, adapter: dict, steps: int, seed: int, lr: float,
                 merge: dict | None = None) -> Any:
    from lora_merge_jax import config
    from lora_merge_jax.training.config import TrainConfig

    values = {
        "output_dir": str(out), "model": {"path": str(base), "dtype": "float32"}, "adapter": adapter,
        "merge": merge or {}, "data": data,
        "optim": {"learning_rate": lr, "coefficient_learning_rate": 1e-2, "warmup_steps": max(steps // 10, 1),
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
}


def merge_section(method: str, source_dirs: list[str]) -> dict[str, Any]:
    merge: dict[str, Any] = {"task_adapters": source_dirs, "granularity": "task_layer"}
    if method == "coef_only":
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


def plan_units(targets, settings, methods, ns, seeds) -> list[Unit]:
    """Seeds outermost, so that an interrupted run has whole seeds done first."""
    units: list[Unit] = []
    for seed in seeds:
        for target in targets:
            if "base" in methods and seed == seeds[0]:
                units.append(Unit(target, "-", "base", 0, 0))
            for setting in settings:
                for m in methods:
                    if m.startswith("static_") and (m == "static_dare_ties" or seed == seeds[0]):
                        units.append(Unit(target, setting, m, 0, seed if m == "static_dare_ties" else 0))
            for n in ns:
                for m in methods:
                    if m in ("lora", "melora") and settings:
                        units.append(Unit(target, "-", m, n, seed))
                for setting in settings:
                    for m in methods:
                        if m == "lorahub" or m == "coef_only" or m.startswith("merge_"):
                            units.append(Unit(target, setting, m, n, seed))
    return units


class Study:
    """Runs units against one base model, caching what units share (model, source adapters, eval data)."""

    def __init__(self, preset: Preset, base: Path, data_dir: Path, out: Path, sources: dict, log):
        self.preset, self.base, self.data_dir, self.out, self.sources, self.log = (preset, base, data_dir, out,
                                                                                   sources, log)
        self._model = None
        self._eval_examples: dict[str, Any] = {}

    @property
    def model(self):
        from lora_merge_jax.io.hf import load_pretrained

        if self._model is None:
            self._model = load_pretrained(self.base)
        return self._model

    # -- source adapters -------------------------------------------------------------------------------
    def source_dir(self, setting: str, task: str) -> Path:
        """Trains (once) the source adapter of ``task`` in ``setting`` on the task's full train split."""
        from lora_merge_jax.training import loop as trainer

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
        result = trainer.train(cfg, log=lambda *_: None)
        info = {"final_loss": sum(result.losses[-5:]) / len(result.losses[-5:]), "first_loss": result.losses[0],
                "seconds": time.perf_counter() - t0}
        (out / "DONE.json").write_text(json.dumps(info, indent=2))
        self.log(f"[source] {setting} on {task}: loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} "
                 f"({info['seconds']:.0f} s)")
        return result.adapter_dir

    def source_adapters(self, target: str, setting: str) -> list[Path]:
        return [self.source_dir(setting, task) for task in self.sources[target]]

    # -- evaluation --------------------------------------------------------------------------------------
    def evaluate(self, model, adapter, target: str) -> dict[str, Any]:
        """Greedy summaries of the dev split scored with ROUGE/BLEU, and the reference summaries' loss."""
        from lora_merge_jax.data import prompts
        from lora_merge_jax.evaluation import evaluate as evaluation
        from lora_merge_jax.evaluation import generate, metrics

        data_cfg = self.target_data(target)
        if target not in self._eval_examples:
            self._eval_examples[target] = prompts.build_eval_examples(data_cfg, model.tokenizer)[0]
        examples = self._eval_examples[target]
        predictions: list[str] = []
        for start in range(0, len(examples), self.preset.eval_batch):
            chunk = examples[start:start + self.preset.eval_batch]
            tokens = generate.generate(model, [e.prompt_ids for e in chunk], adapter,
                                       max_new_tokens=self.preset.max_target_length)
            predictions += [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        language = TARGETS[target][0]
        scores = metrics.compute_metrics(predictions, [list(e.references) for e in examples], language)
        scores["reference_loss"] = evaluation.reference_loss(model, adapter, data_cfg, self.preset.eval_batch)
        scores["examples"] = [{"prediction": p, "reference": e.references[0]} for p, e in
                              zip(predictions[:3], examples[:3])]
        return scores

    def target_data(self, target: str, n: int | None = None, seed: int = 0):
        from lora_merge_jax.data.records import DataConfig

        extra = {} if n is None else {"max_examples": n, "subset_seed": seed, "shuffle_seed": seed}
        return DataConfig(**data_section(target, self.preset, self.data_dir, **extra))

    # -- one unit ---------------------------------------------------------------------------------------------
    def run(self, unit: Unit) -> dict[str, Any]:
        from lora_merge_jax.training import loop as trainer

        out = unit.directory(self.out)
        if out.exists():
            shutil.rmtree(out)  # an interrupted unit is redone from scratch
        out.mkdir(parents=True)
        p, m = self.preset, unit.method
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if m in ("base",) or m.startswith("static_") or m == "lorahub":
            model = self.model
            if m == "base":
                adapter = None
            else:
                adapter, extra = self.frozen_merge(model, unit)
        else:
            if m in ("lora", "melora"):
                adapter_cfg, merge, lr = adapter_section(m, p), None, LEARNING_RATE[m]
            else:
                sources = [str(d) for d in self.source_adapters(unit.target, unit.setting)]
                adapter_cfg, merge, lr = {"kind": "merge"}, merge_section(m, sources), LEARNING_RATE["merge"]
            data = data_section(unit.target, p, self.data_dir, max_examples=unit.n, subset_seed=unit.seed,
                                shuffle_seed=unit.seed)
            cfg = train_config(out / "run", self.base, data, adapter_cfg, p.target_steps, unit.seed, lr, merge)
            result = trainer.train(cfg, log=lambda *_: None)
            model, adapter = result.model, result.state.adapter
            extra["train_loss_first"], extra["train_loss_final"] = result.losses[0], result.losses[-1]
            if hasattr(adapter, "sparsity"):
                import numpy as np

                sparsity = {k: float(np.mean(np.asarray(v))) for k, v in adapter.sparsity().items()}
                extra["sparsity"] = sum(sparsity.values()) / max(len(sparsity), 1)
            shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # the PEFT export stays
        t1 = time.perf_counter()
        scores = self.evaluate(model, adapter, unit.target)
        record = {**dataclasses.asdict(unit), "scores": scores, "train_seconds": t1 - t0,
                  "eval_seconds": time.perf_counter() - t1, **extra}
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False))
        tmp.replace(out / "result.json")
        return record

    def frozen_merge(self, model, unit: Unit) -> tuple[Any, dict[str, Any]]:
        """Static merges (uniform weights 1/K) and LoraHub (coefficients searched on the N examples)."""
        import jax
        import numpy as np

        from lora_merge_jax.data import batching, prompts
        from lora_merge_jax.io import peft_import as peft_io
        from lora_merge_jax.merge import lorahub, static

        loras = [peft_io.load_peft_adapter(d, model) for d in self.source_adapters(unit.target, unit.setting)]
        k = len(loras)
        if unit.method.startswith("static_"):
            method = unit.method.removeprefix("static_")
            density = 0.5 if method in ("ties", "dare_ties") else None
            merged = static.merge_adapters(loras, [1.0 / k] * k, method, density=density,
                                           key=jax.random.key(unit.seed))
            return merged, {}
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
        merged, weights = lorahub.lorahub_merge(model, loras, batches, budget=self.preset.lorahub_budget,
                                                seed=unit.seed)
        return merged, {"lorahub_weights": np.asarray(weights).round(4).tolist()}


# ------------------------------------------------------------------------------------------------- main


def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informative only
        model = platform.processor() or "unknown"
    import jax

    return {"cpu": model, "cores": os.cpu_count(), "jax_devices": f"{len(jax.devices())} x "
            f"{jax.devices()[0].platform}", "python": platform.python_version(), "jax": jax.__version__}


GRID_FIELDS = ("ns", "seeds", "targets", "settings", "methods")  # may change between invocations of one out-dir


def check_same_budgets(out: Path, preset: Preset) -> None:
    """Refuses to mix results of different sizes or budgets in one out-dir (finished units would be reused)."""
    file = out / "budgets.json"
    budgets = {k: v for k, v in dataclasses.asdict(preset).items() if k not in GRID_FIELDS}
    budgets = json.loads(json.dumps(budgets))  # tuples as lists, as read back
    if file.exists():
        saved = json.loads(file.read_text())
        changed = sorted(k for k in set(saved) | set(budgets) if saved.get(k) != budgets.get(k))
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
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (target subset, adapter init); preset default")
    ap.add_argument("--ns", type=int, nargs="+", help="target training examples N")
    ap.add_argument("--targets", nargs="+", choices=sorted(TARGETS))
    ap.add_argument("--settings", nargs="+", choices=("lora", "melora"), help="kind of the source adapters")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    ap.add_argument("--target-steps", type=int, help="step budget of every trained method")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--source-steps", type=int)
    ap.add_argument("--max-eval-examples", type=int)
    ap.add_argument("--lorahub-budget", type=int)
    ap.add_argument("--lorahub-max-examples", type=int)
    ap.add_argument("--publish", action=argparse.BooleanOptionalAction, default=None,
                    help="write bench/RESULTS.md's section and bench/paper_table.png (default: not for smoke)")
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
    out = (args.out_dir or REPO / "runs" / "paper_table" / args.size).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    check_same_budgets(out, preset)
    log_file = open(out / "log.txt", "a", encoding="utf-8")

    def log(line: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        log_file.write(stamped + "\n")
        log_file.flush()

    import jax

    # Units of one kind compile the same programs: keep them across units and reruns.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    t_start = time.perf_counter()
    log(f"paper table, size {args.size}: {preset}")
    from paper_table_report import publish, write_report

    methods = preset.methods or ALL_METHODS
    units = plan_units(preset.targets, preset.settings, methods, preset.ns, preset.seeds)
    publish_to_bench = args.publish if args.publish is not None else args.size != "smoke"
    if args.report_only:
        summary = write_report(out, preset, args.size, machine(), units, 0.0, args.note)
        publish(out, REPO / "bench" if publish_to_bench else out, log, args.size)
        log(f"report of {summary['meta']['units_done']} of {len(units)} planned units: {out / 'results.json'}")
        return summary
    base = build_base(preset, data_dir, out, log)
    if args.only_base:
        return {}
    sources = {t: s[:2] if args.size == "smoke" else s for t, (_, s) in TARGETS.items()}  # smoke: 2 sources
    study = Study(preset, base, data_dir, out, sources, log)
    done = sum((u.directory(out) / "result.json").exists() for u in units)
    log(f"{len(units)} units, {done} done already")
    spent: list[float] = []
    for i, unit in enumerate(units, 1):
        if (unit.directory(out) / "result.json").exists():
            continue
        t0 = time.perf_counter()
        record = study.run(unit)
        spent.append(time.perf_counter() - t0)
        left = sum(not (u.directory(out) / "result.json").exists() for u in units)
        s = record["scores"]
        log(f"[{i}/{len(units)}] {unit.target} {unit.setting} {unit.method} N={unit.n} seed={unit.seed}: "
            f"ROUGE-L {s['rougeL']:.2f} BLEU {s['bleu']:.2f} ref-loss {s['reference_loss']:.4f} "
            f"({spent[-1]:.0f} s; {left} left, ~{left * sum(spent) / len(spent) / 60:.0f} min)")
        write_report(out, preset, args.size, machine(), units, time.perf_counter() - t_start, args.note)
        if publish_to_bench:  # partial results are readable while a long run goes on
            publish(out, REPO / "bench", lambda *_: None, args.size)
    summary = write_report(out, preset, args.size, machine(), units, time.perf_counter() - t_start, args.note)
    publish(out, REPO / "bench" if publish_to_bench else out, log, args.size)
    log(f"finished in {(time.perf_counter() - t_start) / 60:.1f} min: {out / 'results.json'}")
    return summary


if __name__ == "__main__":
    main()
