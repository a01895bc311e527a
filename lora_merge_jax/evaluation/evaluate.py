"""Script-driven evaluation (``eval.py``): generate summaries with one or several adapters and score them.

For each adapter in the config (a PEFT directory, a run directory of ours, or none for the base model)
the prompts of the evaluation split are decoded with ``generate`` (KV cache, one jitted loop), the
predictions are scored with ``metrics.compute_metrics`` (ROUGE with the right tokenizer per language,
BLEU, optional BERTScore; several references scored as the max), and, optionally, the per-token loss of
the first reference is measured (less noisy than ROUGE on small models). Outputs: ``predictions_<name>.jsonl``,
``scores.json`` and ``report.md``, each written to a temporary file and renamed, so a failed run never
leaves a half-written report or touches earlier ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lora_merge_jax import tiny
from lora_merge_jax.data import batching, prompts
from lora_merge_jax.data.records import DataConfig, read_records
from lora_merge_jax.evaluation import generate, metrics
from lora_merge_jax.io import peft_import as peft_io
from lora_merge_jax.io.files import write_text_atomic
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.models import decoder, losses
from lora_merge_jax.models.model import Model
from lora_merge_jax.sharding import MeshConfig, make_mesh


@dataclasses.dataclass(frozen=True)
class AdapterEntry:
    """One system to evaluate."""

    name: str  # label in the report
    path: str | None = None  # PEFT adapter directory or run directory with adapter/; null = base model


@dataclasses.dataclass(frozen=True)
class GenerationSection:
    """How summaries are decoded."""

    method: Literal["greedy", "sample", "beam"] = "greedy"
    max_new_tokens: int = 128  # most new tokens per summary
    num_beams: int = 4  # beam search width
    length_penalty: float = 1.0  # beam search length penalty
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # sampling: nucleus mass (1 = off)
    seed: int = 0  # sampling seed
    batch_size: int = 16  # prompts decoded together


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    """How predictions are scored."""

    language: Literal["en", "ja"] = "en"  # picks the tokenizers below when they are null
    rouge_tokenizer: Literal["default", "mecab", "char"] | None = None  # default: en rouge-score, ja MeCab
    bertscore_model: str | None = None  # local BERTScore model directory; null skips BERTScore
    reference_loss: bool = True  # also report the per-token loss of the first reference


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """An evaluation run."""

    output_dir: str = "runs/eval"  # predictions, scores.json, report.md
    model_path: str | None = None  # base checkpoint; null = the embedded tiny model of runs/default
    dtype: Literal["float32", "bfloat16"] = "float32"  # base weights' dtype
    adapters: tuple[AdapterEntry, ...] = (AdapterEntry("base"),)  # the systems compared
    data: DataConfig = DataConfig()
    generation: GenerationSection = GenerationSection()
    metrics: MetricsSection = MetricsSection()
    mesh: MeshConfig = MeshConfig()

    def validate(self) -> None:
        names = [a.name for a in self.adapters]
        if not names:
            raise ValueError("adapters: nothing to evaluate")
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: names must be unique, got {names}")


def load_adapter(entry: AdapterEntry, model: Model) -> Any:
    """The adapter of ``entry`` (None for the base model); a missing path is an error naming it."""
    if entry.path is None:
        return None
    path = Path(entry.path)
    if not path.exists():
        raise FileNotFoundError(f"adapter '{entry.name}': {path} does not exist")
    return peft_io.load_peft_adapter(peft_io.adapter_dir(path), model)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "most_targets"))
def _reference_sums(cfg, compute_dtype, most_targets, weights, adapter, ids_BxT, mask_BxT, target_BxT):
    """(summed NLL, target token count) of one batch: one compiled program per adapter type and batch shape."""
    deltas = None if adapter is None else adapter.deltas(cfg)
    hidden, _ = decoder.apply_model(cfg, weights, ids_BxT, deltas=deltas, attention_mask_BxS=mask_BxT,
                                    compute_dtype=compute_dtype, return_hidden=True)
    # The LM head on the reference positions only: references are short next to their prompts.
    return losses.target_token_nll(hidden, ids_BxT, target_BxT, most_targets,
                                   functools.partial(decoder.lm_logits, weights))


def reference_examples(model: Model, cfg: DataConfig) -> list[prompts.TokenizedExample]:
    """Prompt + first reference of the first ``max_eval_examples`` usable evaluation records (file order),
    the same records ``build_eval_examples`` keeps, tokenised as training examples."""
    records = read_records(cfg, "eval")
    fmt = prompts.PromptFormat(model.tokenizer, cfg)
    limit = cfg.max_eval_examples or len(records)
    examples = []
    for r in records:
        if len(examples) == limit:
            break
        example = prompts.tokenize_example(model.tokenizer, r.input, r.targets[0], cfg, fields=r.fields,
                                           prompt_format=fmt, source=r.source)
        if example is not None:
            examples.append(example)
    return examples


def reference_loss(model: Model, adapter: Any, cfg: DataConfig, batch_size: int = 8) -> float:
    """Mean per-token NLL of the first reference of every evaluation example under ``adapter``.

    Every batch has ``batch_size`` rows (the last one filled with empty rows, which count no tokens), so one
    adapter type compiles once per padded length.
    """
    # Sorted by length: batches of similar lengths pad little (the mean does not depend on the order).
    examples = sorted(reference_examples(model, cfg), key=lambda e: len(e.input_ids))
    most_targets = prompts.max_target_tokens(examples)
    pad = prompts.pad_token_id(model.tokenizer)
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        length = batching.bucket_length(max(len(e.input_ids) for e in chunk), cfg.length_buckets, cfg.max_length)
        empty = np.zeros(0, np.int32)
        fill = batch_size - len(chunk)
        b = batching.pad_batch([e.input_ids for e in chunk] + [empty] * fill, length, pad,
                               masks=[e.target_mask for e in chunk] + [empty] * fill)
        with jax.set_mesh(model.mesh):  # traced with the mesh set: the model pins activations to the batch axes
            t, c = _reference_sums(model.config, model.compute_dtype, most_targets, model.weights, adapter,
                                   jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                                   jnp.asarray(b["target_mask"]))
        total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, cut into batches of ``batch_size`` after sorting by length over the whole set.

    A batch's prefill then pads little and most batches share a bucketed prompt length (one compile each);
    the caller writes results back by index, so the file order of the outputs does not change.

    Example:
        >>> length_sorted_batches([30, 10, 20, 11], 2)
        [[1, 3], [2, 0]]
    """
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]


def evaluate(cfg: EvalConfig, log=print, progress: bool = True) -> dict[str, Any]:
    """Runs every adapter of ``cfg`` and writes predictions, ``scores.json`` and ``report.md``.

    Returns:
        {adapter name: scores} as written to ``scores.json``.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out}: exists and is not a directory")
    model_path = cfg.model_path or str(tiny.embedded_model(tiny.DEFAULT_RUN_DIR))
    mesh = make_mesh(cfg.mesh)
    log(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
    model = load_pretrained(model_path, dtype=jnp.dtype(cfg.dtype), mesh=mesh)
    if model.tokenizer is None:
        raise ValueError(f"{model_path}: no tokenizer files; evaluation needs the model's tokenizer")
    adapters = {entry.name: load_adapter(entry, model) for entry in cfg.adapters}  # fail before any work
    examples, stats = prompts.build_eval_examples(cfg.data, model.tokenizer)
    if not examples:
        raise ValueError(f"{cfg.data.eval_file or cfg.data.hub_name}: the evaluation set is empty")
    log(f"data: {stats}")
    out.mkdir(parents=True, exist_ok=True)
    g = cfg.generation
    batches = length_sorted_batches([len(e.prompt_ids) for e in examples], g.batch_size)
    results: dict[str, Any] = {}
    for name, adapter in adapters.items():
        predictions = [""] * len(examples)
        for rows in tqdm(batches, desc=f"eval {name}", disable=not progress):
            tokens = generate.generate(
                model, [examples[i].prompt_ids for i in rows], adapter, max_new_tokens=g.max_new_tokens,
                method=g.method, num_beams=g.num_beams, length_penalty=g.length_penalty, temperature=g.temperature,
                top_k=g.top_k, top_p=g.top_p, seed=g.seed)
            for i, text in zip(rows, model.tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                predictions[i] = text.strip()
        references = [list(e.references) for e in examples]
        scores = metrics.compute_metrics(predictions, references, cfg.metrics.language, cfg.metrics.rouge_tokenizer,
                                         cfg.metrics.bertscore_model)
        if cfg.metrics.reference_loss:
            scores["reference_loss"] = reference_loss(model, adapter, cfg.data)
        results[name] = scores
        lines = [json.dumps({"source": e.source, "prediction": p, "references": list(e.references)},
                            ensure_ascii=False) for e, p in zip(examples, predictions)]
        write_text_atomic(out / f"predictions_{name}.jsonl", "\n".join(lines) + "\n")
        ref_loss = f" ref-loss {scores['reference_loss']:.4f}" if "reference_loss" in scores else ""
        log(f"{name}: ROUGE-1 {scores['rouge1']:.2f} ROUGE-2 {scores['rouge2']:.2f} ROUGE-L {scores['rougeL']:.2f} "
            f"BLEU {scores['bleu']:.2f}{ref_loss}")
    write_text_atomic(out / "scores.json", json.dumps(results, indent=2, ensure_ascii=False))
    write_text_atomic(out / "report.md", markdown_report(results, cfg))
    return results


def markdown_report(results: dict[str, Any], cfg: EvalConfig) -> str:
    """A Markdown table comparing the systems, with how every number was computed."""
    cols = ["rouge1", "rouge2", "rougeL", "bleu"] + (["reference_loss"] if cfg.metrics.reference_loss else [])
    if any("bertscore_f1" in r for r in results.values()):
        cols.append("bertscore_f1")
    head = "| system | " + " | ".join(cols) + " | examples |"
    rows = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in results.items():
        cells = [f"{r[c]:.4f}" if c == "reference_loss" else f"{r[c]:.2f}" if c in r else "-" for c in cols]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['num_examples']} |")
    first = next(iter(results.values()))
    notes = [f"- {k}: {v}" for k, v in first.get("settings", {}).items()] + [f"- {n}" for n in first.get("notes", [])]
    source = cfg.data.eval_file or cfg.data.hub_name
    return (f"# Evaluation on {source}\n\n" + "\n".join(rows) + "\n\nHow the scores were computed:\n"
            + "\n".join(notes) + "\n")
