"""eval.py end to end on the embedded tiny model, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_merge_jax import config, tiny
from lora_merge_jax.evaluation.evaluate import EvalConfig, evaluate

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny.make_tiny_model(root / "model")
    tiny.make_tiny_task(root / "task", train_size=8, dev_size=6)
    return root


def _cfg(root: Path, out: Path, *extra: str) -> EvalConfig:
    sets = [f"output_dir={out}", f"model_path={root / 'model'}", f"data.data_dir={root / 'task'}",
            "data.train_file=train.jsonl", "data.eval_file=dev.jsonl", "data.prompt_template='Reverse: {input}\n'",
            "data.max_length=96", "data.max_target_length=16", "generation.max_new_tokens=8",
            "generation.batch_size=4"]
    return config.load_config(EvalConfig, None, sets + list(extra))


def test_report_scores_and_predictions(setup, tmp_path):
    results = evaluate(_cfg(setup, tmp_path), log=lambda *_: None, progress=False)
    assert set(results) == {"base"}
    assert results["base"]["num_examples"] == 6 and results["base"]["reference_loss"] > 0
    lines = (tmp_path / "predictions_base.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "references" in json.loads(lines[0])
    assert json.loads((tmp_path / "scores.json").read_text())["base"]["rouge1"] == results["base"]["rouge1"]
    assert "| base |" in (tmp_path / "report.md").read_text()


def test_missing_adapter_is_named_and_earlier_report_untouched(setup, tmp_path):
    evaluate(_cfg(setup, tmp_path), log=lambda *_: None, progress=False)
    before = (tmp_path / "report.md").read_text()
    cfg = _cfg(setup, tmp_path, "adapters=[{name: mine, path: /nonexistent/adapter}]")
    with pytest.raises(FileNotFoundError, match="adapter 'mine': /nonexistent/adapter does not exist"):
        evaluate(cfg, log=lambda *_: None, progress=False)
    assert (tmp_path / "report.md").read_text() == before


def test_missing_reference_field(setup, tmp_path):
    cfg = _cfg(setup, tmp_path, "data.target_field=tldr")
    with pytest.raises(ValueError, match="dev.jsonl:1.*tldr"):
        evaluate(cfg, log=lambda *_: None, progress=False)


def test_eval_py_exits_nonzero_with_the_message(setup, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), "--set", f"model_path={tmp_path / 'none'}",
                           "--set", f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1
    assert "none: no such checkpoint directory" in done.stderr


def test_reference_loss_equals_transformers(setup, tmp_path):
    """The per-token loss of the references (LM head on the reference positions only) against transformers'
    full logits on the same tokenised examples; float32, tolerance 1e-5 relative."""
    import numpy as np
    import torch
    import transformers

    import lora_merge_jax as lmj
    from lora_merge_jax.data import prompts
    from lora_merge_jax.data.records import read_records
    from lora_merge_jax.evaluation.evaluate import reference_loss

    cfg = _cfg(setup, tmp_path).data
    model = lmj.load_pretrained(setup / "model")
    ours = reference_loss(model, None, cfg, batch_size=4)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32).eval()
    fmt = prompts.PromptFormat(model.tokenizer, cfg)
    total = count = 0.0
    for r in read_records(cfg, "eval"):
        ex = prompts.tokenize_example(model.tokenizer, r.input, r.targets[0], cfg, fields=r.fields, prompt_format=fmt)
        with torch.no_grad():
            logits = torch_model(torch.tensor(ex.input_ids[None], dtype=torch.long)).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.input_ids[1:], dtype=torch.long),
                                                reduction="none").numpy()
        total += float((nll * ex.target_mask[1:]).sum())
        count += float(ex.target_mask[1:].sum())
    assert count > 0 and np.isclose(ours, total / count, rtol=1e-5, atol=0)


def test_reference_loss_scores_the_first_usable_examples_and_compiles_once(setup, tmp_path, monkeypatch):
    """With ``max_eval_examples=2`` and the first record skipped as too long, the records scored are the 2nd
    and 3rd (as ``build_eval_examples`` keeps them), not the 1st and 2nd; a second adapter of the same type
    and a second call reuse the compiled program."""
    import dataclasses

    import jax
    import numpy as np

    import lora_merge_jax as lmj
    from lora_merge_jax.evaluation import evaluate as evaluate_lib

    records = [json.loads(line) for line in (setup / "task" / "dev.jsonl").read_text().splitlines()]
    long_first = [{"document": " ".join(["apple"] * 60), "summary": "x"}, *records[:3]]
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "long.jsonl").write_text("\n".join(map(json.dumps, long_first)) + "\n")
    (tmp_path / "task" / "two.jsonl").write_text("\n".join(map(json.dumps, records[:2])) + "\n")
    base = dataclasses.replace(_cfg(setup, tmp_path).data, data_dir=str(tmp_path / "task"), on_overlong="skip")
    model = lmj.load_pretrained(setup / "model")
    lora = lmj.init_lora(model.config, jax.random.key(0), rank=2)
    lora = lora.replace(b={n: v + 0.05 for n, v in lora.b.items()})
    capped = dataclasses.replace(base, eval_file="long.jsonl", max_eval_examples=2)
    both = dataclasses.replace(base, eval_file="two.jsonl")
    assert np.isclose(evaluate_lib.reference_loss(model, lora, capped, batch_size=8),
                      evaluate_lib.reference_loss(model, lora, both, batch_size=8), rtol=1e-6)

    other = lora.replace(b={n: v * 2 for n, v in lora.b.items()})
    compiled = evaluate_lib._reference_sums._cache_size()
    evaluate_lib.reference_loss(model, other, both, batch_size=8)
    assert evaluate_lib._reference_sums._cache_size() == compiled
