"""Tables, reading and plot of ``bench/paper_table.py``: results.json, table.md, RESULTS.md section, PNG.

Every unit's ``result.json`` is gathered; methods that see no target data (N = 0: the base model, static
merges) are shown under every N. Cells are mean ± sample standard deviation over seeds, with the number
of runs when it is not the number of seeds asked for. The "reading" compares the adaptive merge with
pruning against every other method at each N on the reference loss, and says whether the difference is
larger than the seed spread (|mean difference| > sqrt(std_a^2 + std_b^2)).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

SECTION = "## Paper table (issue 9)"
REAL_SECTION = "## Paper table on a real LLM: SmolLM2-135M-Instruct (issue 19)"
DEFAULT_METHODS = ("base", "lora", "melora", "static_exact", "static_linear", "static_ties", "static_dare_ties",
                   "lorahub", "coef_only", "merge_noprune", "merge_prune", "merge_prune_magnitude",
                   "merge_prune_component", "merge_prune_global", "merge_prune_layer")  # a grid without --methods
ALL_METHODS = DEFAULT_METHODS + ("coef_only_coef_lr_1e-1", "merge_prune_coef_lr_3e-1", "merge_prune_coef_lr_1e-1",
                                  "merge_prune_coef_lr_1e-3")  # a sweep names these
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "reference_loss")
LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU",
          "reference_loss": "ref. loss"}
TARGET_NAMES = {"xscitldr_ja": "X-SciTLDR ja->ja", "mts_dialog": "MTS-Dialog", "scitldr": "SciTLDR"}


def row_name(setting: str, method: str) -> str:
    return method if setting == "-" else f"{method} [{setting}]"


def _stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def summarise(records: list[dict], ns: tuple[int, ...]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """{target: {row: {N: {metric: {mean, std, n}}}}}; N-independent rows are repeated under every N."""
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for r in records:
        for n in (ns if r["n"] == 0 else (r["n"],)):
            grouped.setdefault((r["target"], row_name(r["setting"], r["method"]), n), []).append(r)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for (target, row, n), rs in grouped.items():
        cell = {m: _stats([r["scores"][m] for r in rs]) for m in METRICS}
        if any("sparsity" in r for r in rs):
            cell["sparsity"] = _stats([r.get("sparsity", 0.0) for r in rs])
        out.setdefault(target, {}).setdefault(row, {})[n] = cell
    return out


def _cell(stat: dict[str, float] | None, digits: int, seeds: int) -> str:
    if stat is None:
        return "-"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f} (1 run)"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return text + (f" ({stat['n']} runs)" if stat["n"] != seeds else "")


def _order(rows: dict) -> list[str]:
    def key(row: str) -> tuple[int, str]:
        method = row.split(" [")[0]
        return (ALL_METHODS.index(method) if method in ALL_METHODS else 99, row)

    return sorted(rows, key=key)


def metric_table(rows: dict, ns: tuple[int, ...], metric: str, seeds: int) -> list[str]:
    digits = 3 if metric == "reference_loss" else 2
    lines = ["| method | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for row in _order(rows):
        lines.append(f"| {row} | " + " | ".join(_cell(rows[row].get(n, {}).get(metric), digits, seeds)
                                                 for n in ns) + " |")
    return lines


# The paper's claims as "a has a lower loss than b": pruning helps, updating the LoRAs helps, and the adaptive
# merge with pruning beats LoraHub, a static merge and a LoRA trained on the target alone.
PAPER_CLAIMS = (("merge_prune", "merge_noprune"), ("merge_noprune", "coef_only"), ("merge_prune", "coef_only"),
                ("merge_prune", "lorahub"), ("merge_prune", "static_exact"), ("merge_prune", "lora"))


def _compare(a: dict, b: dict) -> str:
    """'holds' / 'fails' for "a has lower loss than b", and whether the gap exceeds the seed spread."""
    diff = b["mean"] - a["mean"]
    spread = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    clear = min(a["n"], b["n"]) >= 2 and abs(diff) > spread
    return f"{'holds' if diff > 0 else 'fails'} ({diff:+.3f}{', beyond the seed spread' if clear else ''})"


def reading(summary: dict, ns: tuple[int, ...]) -> list[str]:
    """Per target, setting and N: where the adaptive merge with pruning ranks, and the paper's pairwise claims."""
    lines: list[str] = []
    for target, rows in summary.items():
        settings = sorted({r.split("[")[1].rstrip("]") for r in rows if " [" in r})
        for setting in settings:
            mine = {r.split(" [")[0]: cells for r, cells in rows.items() if " [" not in r or r.endswith(f"[{setting}]")}
            pruned = "merge_prune" if "merge_prune" in mine else next(
                (m for m in ALL_METHODS if m.startswith("merge_prune") and m in mine), None)
            for n in ns:
                losses = {m: c[n]["reference_loss"] for m, c in mine.items() if n in c}
                if not losses:
                    continue
                ranked = sorted(losses, key=lambda m: losses[m]["mean"])
                head = f"- {TARGET_NAMES.get(target, target)}, {setting} sources, N={n}: best {ranked[0]} " \
                       f"({losses[ranked[0]]['mean']:.3f})"
                if pruned in losses:
                    head += f"; {pruned} ranks {ranked.index(pruned) + 1} of {len(ranked)}"
                claims = [f"{a} < {b}: {_compare(losses[a], losses[b])}" for a, b in PAPER_CLAIMS
                          if a in losses and b in losses]
                lines.append(head + (". The paper's claims, a < b in ref. loss (in brackets b - a): "
                                     + "; ".join(claims) if claims else "") + ".")
    return lines


def pruning_choice(summary: dict, ns: tuple[int, ...]) -> list[str]:
    """Mean reference loss of each pruning variant over targets, settings and N (the defaults' evidence)."""
    totals: dict[str, list[float]] = {}
    for rows in summary.values():
        for row, cells in rows.items():
            method = row.split(" [")[0]
            if method.startswith("merge_"):
                totals.setdefault(method, []).extend(c["reference_loss"]["mean"] for n, c in cells.items() if n in ns)
    if not totals:
        return []
    ranked = sorted((sum(v) / len(v), k, len(v)) for k, v in totals.items())
    return [f"- {k}: mean reference loss {m:.4f} over {c} (target, setting, N) cells" for m, k, c in ranked]


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text(encoding="utf-8"))


def write_report(out: Path, preset: Any, size: str, machine: dict, units: list, records: list[dict],
                 wall_seconds: float, notes: list[str], tag: str | None = None,
                 sources: dict[str, tuple[str, ...]] | None = None, mirror: Path | None = None) -> dict[str, Any]:
    """Writes ``results.json`` and ``table.md`` in ``out`` from the finished units' records; returns the summary.

    Args:
        records: the finished units' records (from their run directories or the mirror).
        tag: the evaluation split's name when it is not the targets' development split (``--eval-file``): the
            files are then ``results_<tag>.json`` and ``table_<tag>.md``.
        sources: target -> source tasks, for the report's text.
        mirror: the folder of mirrored records; the base model's and the sources' records are read from it when
            ``out`` lacks them (a lost ``runs/``).
    """
    ns, seeds = tuple(preset.ns), len(preset.seeds)
    summary = summarise(records, ns)
    base_info_file = out / "base" / "DONE.json"
    if not base_info_file.exists() and mirror is not None:
        base_info_file = mirror / "base_model.json"
    base_info = _read_json(base_info_file) if base_info_file.exists() else {}
    source_files = {f.parent.parent.name + "/" + f.parent.name: f for f in out.glob("sources/*/*/DONE.json")}
    if mirror is not None:
        for f in mirror.glob("source__*.json"):
            source_files.setdefault("/".join(f.stem.split("__")[1:3]), f)
    starts = sorted(r["finished"] for r in records if "finished" in r)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "size": size, "machine": machine,
            "preset": dataclasses.asdict(preset), "base_model": base_info, "wall_seconds": wall_seconds,
            "units_done": len(records), "units_planned": len(units), "notes": notes, "eval_split": tag,
            "sources": {t: list(s) for t, s in (sources or {}).items() if t in preset.targets},
            "first_finished": starts[0] if starts else None, "last_finished": starts[-1] if starts else None,
            "scored_by": dict(collections.Counter(r.get("scored_by", "(not recorded)") for r in records)),
            "seconds": {"base": base_info.get("seconds", 0.0),
                        "sources": sum(_read_json(f)["seconds"] for f in source_files.values()),
                        "units": sum(r.get("train_seconds", 0.0) + r.get("build_seconds", 0.0) + r["eval_seconds"]
                                     for r in records)}}
    lean = [{k: v for k, v in r.items() if k != "scores"} | {"scores": {m: r["scores"][m] for m in METRICS}}
            for r in records]
    results = {"meta": meta, "summary": {t: {row: {str(n): c for n, c in cells.items()} for row, cells in rows.items()}
                                         for t, rows in summary.items()}, "units": lean}
    suffix = "" if tag is None else f"_{tag}"
    _atomic(out / f"results{suffix}.json", json.dumps(results, indent=2, ensure_ascii=False))
    _atomic(out / f"table{suffix}.md", "\n".join(markdown(meta, summary, ns, seeds)) + "\n")
    return results


def markdown(meta: dict, summary: dict, ns: tuple[int, ...], seeds: int) -> list[str]:
    p, b, m, t = meta["preset"], meta["base_model"], meta["machine"], meta["seconds"]
    real = p.get("base_model") is not None
    partial = meta["units_done"] < meta["units_planned"]
    cores = f"{m['cores']} cores" + (f", {m['cores_used']} used" if m.get("cores_used", m["cores"]) != m["cores"]
                                      else "")
    span = (f" Units finished between {meta['first_finished']} and {meta['last_finished']}."
            if meta.get("first_finished") else "")
    if real:
        base_line = (f"- Base model: {b.get('model_file', '?')} (SHA-256 {b.get('sha256', '?')}), used as it is "
                     "(no pretraining here), dequantized to float32; prompts are the user turn of its chat template "
                     "and summaries its assistant turn, so the zero-shot base is prompted as it was tuned.")
    else:
        base_line = (f"- Base model: Llama architecture pretrained from scratch here, hidden {p['hidden']}, "
                     f"{p['layers']} layers, {p['heads']} heads ({p['kv_heads']} KV), FFW {p['ffw']}, byte-level BPE "
                     f"vocabulary {p['vocab_size']}"
                     + (f"; {b.get('parameters', 0):,} parameters, {b.get('pretrain_tokens', 0):,} pretraining tokens "
                        f"({p['pretrain_steps']} steps), LM loss {b.get('first_loss', 0):.2f} -> "
                        f"{b.get('final_loss', 0):.2f} in {b.get('pretrain_seconds', 0) / 60:.1f} min" if b else "")
                     + ".")
    split = ("the first" if p["max_eval_examples"] else "all") + (
        f" {p['max_eval_examples']}" if p["max_eval_examples"] else "") + (
        " examples of each development split" if meta.get("eval_split") is None
        else f" examples of `{meta['eval_split']}` (--eval-file, not the development split)")
    lines = [
        *([f"**Partial grid: {meta['units_done']} of {meta['units_planned']} planned units done.**", ""]
          if partial else []),
        (f"Generated by `python bench/paper_table.py --size {meta['size']}` on {meta['date']}; machine: {m['cpu']}, "
        f"{cores} ({m['jax_devices']}), JAX {m['jax']}. Time: base model {t['base'] / 60:.1f} min, source "
        f"adapters {t['sources'] / 60:.1f} min, units {t['units'] / 60:.1f} min (wall time of the last invocation "
        f"{meta['wall_seconds'] / 60:.1f} min); {meta['units_done']} of {meta['units_planned']} planned units "
        f"finished.{span}"),
        "",
        base_line,
        *(["- Sources: " + "; ".join(f"{TARGET_NAMES.get(tg, tg)} merges {', '.join(s)}"
                                      for tg, s in meta["sources"].items())
           + " (title generation: SciTLDR train abstracts -> titles). No source sees a target's dev split."]
          if meta.get("sources") else []),
        (f"- Adapters: rank {p['rank']} on all 7 projections (MELoRA: {p['melora_blocks']} blocks); sources trained "
        f"{p['source_steps']} steps on their full train split; every target method {p['target_steps']} steps of "
        f"batch {p['batch_size']} (the same budget), examples cut to {p['max_length']} tokens, summaries to "
        f"{p['max_target_length']}. Merges: task_layer coefficients; pruning to 50% (defaults unless named). "
        f"LoraHub: {p['lorahub_budget']} evaluations of the loss on "
        f"{'all N' if p['lorahub_max_examples'] is None else 'at most ' + str(p['lorahub_max_examples'])} examples. "
        "Static merges: weights 1/K, density 0.5."),
        (f"- Evaluation: {split}, greedy decoding "
        f"of up to {p['max_target_length']} tokens; ROUGE F1 (MeCab for Japanese), sacreBLEU, and the mean "
        "per-token NLL of the first reference summary (ref. loss, lower is better)."),
        (f"- Grid: seeds {p['seeds']}, N {p['ns']}, targets {list(p['targets'])}, source settings "
        f"{list(p['settings'])}, methods {list(p['methods']) if p['methods'] else 'all'}. Cells: mean ± std over "
        f"seeds (run count in brackets when it differs from {seeds}); base and static merges see no target data "
        "and repeat under every N (static_dare_ties varies with the seed)."),
        *[f"- Note: {n}" for n in meta["notes"]],
        *([f"- Note: the scores come from {len(meta['scored_by'])} versions of the scoring code ("
           + ", ".join(f"{v}: {c} units" for v, c in sorted(meta["scored_by"].items()))
           + "); `--stage evaluate --rescore` scores them all with the current one."]
          if len(meta.get("scored_by", {})) > 1 else []),
    ]
    for target, rows in summary.items():
        name = TARGET_NAMES.get(target, target)
        for metric in ("reference_loss", "rougeL"):
            lines += ["", f"#### {name}: {LABELS[metric]}" + (" (lower is better)" if metric == "reference_loss"
                                                              else ""), "", *metric_table(rows, ns, metric, seeds)]
        lines += ["", f"<details><summary>{name}: ROUGE-1, ROUGE-2, BLEU</summary>", ""]
        for metric in ("rouge1", "rouge2", "bleu"):
            lines += [f"{LABELS[metric]}:", "", *metric_table(rows, ns, metric, seeds), ""]
        lines += ["</details>"]
    lines += ["", "#### Reading (automatic, on the reference loss)", "", *reading(summary, ns)]
    choice = pruning_choice(summary, ns)
    if choice:
        lines += ["", "Merge variants, averaged over every finished cell (for choosing the pruning defaults):", "",
                  *choice]
    return lines


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def section_title(size: str) -> str:
    """The RESULTS.md heading of one size's table: cpu and real are the main ones, other sizes get their own."""
    if size.startswith("real"):
        return REAL_SECTION if size == "real" else f"{REAL_SECTION}, size {size}"
    return SECTION if size == "cpu" else f"{SECTION}, size {size}"


def plot_name(size: str) -> str:
    return "paper_table.png" if size == "cpu" else f"paper_table_{size}.png"


def replace_section(document: str, body: str, title: str = SECTION) -> str:
    """``document`` with its ``title`` section (up to the next "## ") replaced by ``body``, or appended."""
    section = f"{title}\n\n{body.rstrip()}\n"
    start = document.find(title + "\n")  # the newline: one title may be a prefix of another
    if start < 0:
        return (document.rstrip() + "\n\n" if document.strip() else "# Benchmark results\n\n") + section
    end = document.find("\n## ", start + len(title))
    rest = "" if end < 0 else "\n" + document[end + 1:]
    return document[:start] + section + rest


def publish(out: Path, dest: Path, log, size: str) -> None:
    """Writes the size's section of ``dest/RESULTS.md`` (other sections untouched) and its plot in ``dest``."""
    results = json.loads((out / "results.json").read_text())
    body = (out / "table.md").read_text(encoding="utf-8")
    png = dest / plot_name(size)
    body += f"\n![score against N]({png.name})\n" if plot(results, png) else ""
    results_md = dest / "RESULTS.md"
    current = results_md.read_text(encoding="utf-8") if results_md.exists() else ""  # read late: others write too
    _atomic(results_md, replace_section(current, body, section_title(size)))
    log(f"wrote {results_md} ({section_title(size)!r}) and {png}")


def _method_index(row: str) -> int:
    method = row.split(" [")[0]
    return ALL_METHODS.index(method) if method in ALL_METHODS else len(ALL_METHODS)


def plot(results: dict, png: Path) -> bool:
    """Reference loss and ROUGE-L against N, one line per method (flat lines: no target data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    if not summary:
        return False
    ns = results["meta"]["preset"]["ns"]
    fig, axes = plt.subplots(len(summary), 2, figsize=(13, 4.6 * len(summary)), squeeze=False)
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors  # one distinct colour per method
    for row_axes, (target, rows) in zip(axes, summary.items()):
        for ax, metric in zip(row_axes, ("reference_loss", "rougeL")):
            for row in _order(rows):
                points = [(n, rows[row][str(n)][metric]) for n in ns if str(n) in rows[row]]
                if not points:
                    continue
                flat = row.split(" [")[0] in ("base",) or row.startswith("static_")
                ax.errorbar([n for n, _ in points], [s["mean"] for _, s in points], [s["std"] for _, s in points],
                            label=row, color=colors[_method_index(row) % len(colors)], marker="" if flat else "o",
                            linestyle="--" if flat else "-", capsize=3, linewidth=2.2 if "merge_prune [" in row
                            else 1.2)
            ax.set(xlabel="target training examples N", ylabel=LABELS[metric], xticks=ns,
                   title=f"{TARGET_NAMES.get(target, target)}: {LABELS[metric]}"
                   + (" (lower is better)" if metric == "reference_loss" else ""))
            ax.grid(alpha=0.3)
        row_axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
