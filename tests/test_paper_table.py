"""bench/paper_table.py end to end at smoke size (tokenizer, pretraining, sources, methods, report), and resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from paper_table_report import SECTION, replace_section, section_title

requires_shared_data = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"needs {os.path.normpath(SHARED_DATA)} (the real summarisation data the paper table runs on; "
           "present in CI)")


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_backend_optimization_level=0")  # one CPU device; fast compiles
    cmd = [sys.executable, str(REPO / "bench" / "paper_table.py"), "--size", "smoke", "--out-dir", str(out),
           "--data-dir", str(Path(SHARED_DATA).resolve()), *extra]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)


@requires_shared_data
def test_smoke_pipeline_then_rerun_skips_everything(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    base = json.loads((tmp_path / "base" / "DONE.json").read_text())
    assert base["vocab_size"] == 512 and base["final_loss"] > 0
    assert (tmp_path / "base" / "model" / "config.json").exists()
    assert (tmp_path / "base" / "model" / "tokenizer.json").exists()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["units_done"] == results["meta"]["units_planned"] == 4
    rows = results["summary"]["xscitldr_ja"]
    assert set(rows) == {"base", "static_ties [lora]", "lorahub [lora]", "merge_prune [lora]"}
    for row in rows.values():
        cell = row["8"]
        assert cell["reference_loss"]["n"] == 1 and cell["reference_loss"]["mean"] > 0
        assert 0 <= cell["rougeL"]["mean"] <= 100
    pruned = next(u for u in results["units"] if u["method"] == "merge_prune")
    assert 0 < pruned["sparsity"] < 1  # pruning ran
    lorahub = next(u for u in results["units"] if u["method"] == "lorahub")
    assert len(lorahub["lorahub_weights"]) == 2  # two source LoRAs in the smoke grid
    report = (tmp_path / "RESULTS.md").read_text()
    assert section_title("smoke") + "\n" in report and "| merge_prune [lora] |" in report and "Reading" in report
    assert (tmp_path / "paper_table_smoke.png").stat().st_size > 0

    again = _run(tmp_path)  # resumable: every unit and the base model are skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[base] done already" in again.stdout and "4 units, 4 done already" in again.stdout
    assert "[source]" not in again.stdout
    report = _run(tmp_path, "--report-only", "--methods", "base", "merge_prune", "melora")  # runs nothing
    assert report.returncode == 0, report.stderr[-3000:]
    assert "[base]" not in report.stdout and "report of 2 of 3 planned units" in report.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["summary"]["xscitldr_ja"]) == {"base", "merge_prune [lora]"}
    assert not (tmp_path / "units" / "xscitldr_ja" / "-" / "melora").exists()
    other = _run(tmp_path, "--target-steps", "5")  # finished units of another budget are never mixed in
    assert other.returncode != 0 and "target_steps differ" in other.stderr


def test_replace_section_keeps_other_sections():
    doc = "# Benchmark results\n\n## Performance (issue 7)\n\nfast\n\n" + SECTION + "\n\nold\n\n## Later\n\nkeep\n"
    new = replace_section(doc, "new table")
    assert "old" not in new and "new table" in new
    assert new.index("## Performance (issue 7)") < new.index(SECTION) < new.index("## Later")
    assert "fast" in new and "keep" in new
    assert replace_section("", "x").startswith("# Benchmark results\n\n" + SECTION)
    appended = replace_section("# R\n\n## Performance (issue 7)\n\nfast\n", "x")
    assert appended.endswith(SECTION + "\n\nx\n") and "fast" in appended


def test_each_size_replaces_only_its_own_section():
    main, long = section_title("cpu"), section_title("cpu_long")
    assert long.startswith(main)  # a prefix: the lookup must not take one for the other
    doc = replace_section(replace_section("", "cpu table", main), "long table", long)
    doc = replace_section(doc, "cpu table 2", main)
    doc = replace_section(doc, "long table 2", long)
    assert doc.count(main + "\n") == 1 and doc.count(long + "\n") == 1
    assert "cpu table 2\n" in doc and "long table 2\n" in doc
    assert "cpu table\n" not in doc and "long table\n" not in doc


# ---------------------------------------------------------------------------------------- the real sizes' path

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"


def _tiny_chat_model(path: Path) -> Path:
    """A random tiny Llama (character tokenizer) with a chat template: stands in for SmolLM2 in the real path."""
    from lora_merge_jax import tiny

    tiny.make_tiny_model(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return path


def _run_real(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="--xla_backend_optimization_level=0")
    cmd = [sys.executable, str(REPO / "bench" / "paper_table.py"), "--size", "real_smoke", "--out-dir", str(out),
           "--data-dir", str(Path(SHARED_DATA).resolve()), "--base-model", str(model), "--mirror-dir",
           str(out / "mirror"), *extra]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)


@requires_shared_data
def test_real_path_evaluates_saved_adapters_and_mirrors(tmp_path):
    """The real sizes' path on a tiny model: no pretraining, chat-template prompts, adapters saved and then
    scored from the saved weights, --eval-file kept apart, results that survive the loss of the run directory."""
    model = _tiny_chat_model(tmp_path / "model")
    out = tmp_path / "run"
    done = _run_real(out, model, "--methods", "base", "static_exact", "merge_prune")  # LoraHub: in the smoke test
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (out / "base" / "model").exists()  # nothing pretrained
    base = json.loads((out / "base" / "DONE.json").read_text())
    assert base["model_file"] == "model" and len(base["sha256"]) == 64
    unit = out / "units" / "scitldr" / "lora" / "merge_prune" / "N4" / "seed0"
    assert (unit / "run" / "adapter" / "adapter_model.safetensors").exists()  # the saved weights ...
    assert not (unit / "run" / "checkpoints").exists()  # ... without the checkpoints
    trained = json.loads((unit / "trained.json").read_text())
    record = json.loads((unit / "result.json").read_text())
    assert record["train_losses"] == trained["train_losses"] and 0 < record["sparsity"] < 1
    assert record["scores"]["reference_loss"] > 0 and record["scores"]["eval_examples"] == 2
    mirrored = sorted(p.name for p in (out / "mirror").glob("scitldr__*.json"))
    assert mirrored == ["scitldr__lora__merge_prune__N4__seed0.json", "scitldr__lora__static_exact__N0__seed0.json",
                        "scitldr__none__base__N0__seed0.json"]
    assert json.loads((out / "mirror" / mirrored[0]).read_text())["scores"] == record["scores"]
    report = (out / "RESULTS.md").read_text()
    assert section_title("real_smoke") + "\n" in report and "| merge_prune [lora] |" in report
    assert "Partial" not in report and base["sha256"] in report

    # a separate evaluation pass over the saved adapters, on another split: kept apart from the default scores
    other = _run_real(out, model, "--methods", "base", "static_exact", "merge_prune", "--eval-file",
                      "scitldr/train.jsonl")
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "[source]" not in other.stdout and "stage evaluate" in other.stdout
    again = json.loads((unit / "result_scitldr_train.json").read_text())
    assert again["eval_file"] == "scitldr/train.jsonl" and again["scores"] != record["scores"]
    assert json.loads((unit / "result.json").read_text()) == record
    assert (out / "results_scitldr_train.json").exists() and (out / "mirror" / "eval_scitldr_train").is_dir()
    assert (out / "RESULTS.md").read_text() == report  # scores on another split are not published

    # --rescore: only the units that another version of the scoring code scored, and resumable
    stale = {**record, "scored_by": "0ld5c0re4bcd"}
    for file in (unit / "result.json", out / "mirror" / mirrored[0]):
        file.write_text(json.dumps(stale))
    rescored = _run_real(out, model, "--methods", "base", "static_exact", "merge_prune", "--stage", "evaluate",
                         "--rescore")
    assert rescored.returncode == 0, rescored.stdout[-3000:] + rescored.stderr[-3000:]
    assert f"3 units, 2 done already (mirror {out / 'mirror'}); scoring code {record['scored_by']}: 1 to rescore" \
        in rescored.stdout
    assert rescored.stdout.count("ROUGE-L") == 1 and "merge_prune N=4" in rescored.stdout
    assert json.loads((unit / "result.json").read_text())["scored_by"] == record["scored_by"]
    assert json.loads((out / "mirror" / mirrored[0]).read_text())["scores"] == record["scores"]  # deterministic
    resumed = _run_real(out, model, "--methods", "base", "static_exact", "merge_prune", "--stage", "evaluate",
                        "--rescore")
    assert "0 to rescore" in resumed.stdout and "ROUGE-L" not in resumed.stdout

    import shutil

    shutil.rmtree(out / "units")  # runs/ lost: the mirror still holds every finished unit
    (out / "results.json").unlink()
    rerun = _run_real(out, model, "--methods", "base", "static_exact", "merge_prune", "--report-only")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["units_done"] == results["meta"]["units_planned"] == 3
