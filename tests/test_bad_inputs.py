"""A catalogue of bad inputs, each through the path a user takes (a config, ``train()``/``evaluate()`` or the CLI).

Every case checks the message (it names the file and line, the config key or the tensor) and, for the
in-process ``train()`` cases, that an earlier run in the same ``output_dir`` (checkpoints, run config,
metrics, exported adapter, report) is left byte for byte and mtime for mtime as it was: every check runs
before anything is written. The two CLI cases check the exit code and stderr. Unit tests of the same
checks live in test_data.py, test_model_errors.py, test_peft_io.py and test_eval.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_merge_jax import config, tiny
from lora_merge_jax.adapters.lora import init_lora
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.io.peft_export import save_peft_adapter
from lora_merge_jax.io.safetensors import SafetensorsFile, write_safetensors
from lora_merge_jax.training.config import TrainConfig
from lora_merge_jax.training.loop import train

REPO = Path(__file__).resolve().parent.parent
GOOD = '{"document": "apple river", "summary": "river apple"}\n'


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: (bytes, mtime in ns)."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model and task, an earlier run's output directory, and PEFT adapters good and bad."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tiny.make_tiny_model(root / "model")
    tiny.make_tiny_task(root / "task", train_size=16, dev_size=4)

    earlier = root / "earlier"  # what an earlier run left: none of it may change
    for name, content in {"checkpoints/3/state/d/0123abcd": b"\x00\x01orbax data", "checkpoints/3/data/metadata":
                          b'{"epoch": 0}', "run_config.yaml": b"train: {seed: 0}\n", "metrics.jsonl":
                          b'{"step": 1, "loss": 5.0}\n', "adapter/adapter_model.safetensors": b"tensors",
                          "report.md": b"# Evaluation\n", "scores.json": b"{}"}.items():
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_bytes(content)

    model = load_pretrained(root / "model")
    key = jax.random.key(0)
    for name, targets in (("lora_qv", ("q_proj", "v_proj")), ("lora_qk", ("q_proj", "k_proj"))):
        save_peft_adapter(init_lora(model.config, key, rank=4, target_modules=targets), root / name, model)
    shutil.copytree(root / "lora_qv", root / "lora_dora")
    conf = json.loads((root / "lora_dora" / "adapter_config.json").read_text())
    (root / "lora_dora" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))

    tiny.make_tiny_model(root / "other_model", hidden=32, ffw=60)  # another base model: hidden 32, ffw 60
    other = load_pretrained(root / "other_model")
    save_peft_adapter(init_lora(other.config, key, rank=4), root / "lora_other", other)
    return root


def train_config(env: Path, *sets: str, data_dir: Path | None = None) -> TrainConfig:
    base = [f"output_dir={env / 'earlier'}", f"model.path={env / 'model'}", f"data.data_dir={data_dir or env / 'task'}",
            "data.train_file=train.jsonl", "data.prompt_template='Reverse: {input}\n'", "data.max_length=96",
            "data.max_target_length=48", "data.batch_size=8", "train.steps=2", "train.progress=false",
            "train.async_checkpoints=false"]
    return config.load_config(TrainConfig, None, base + list(sets))


def expect_train_error(env: Path, error: type[Exception], match: str, *sets: str, data_dir: Path | None = None) -> None:
    """``train()`` raises ``error`` matching ``match`` and leaves the earlier run's files untouched."""
    before = snapshot(env / "earlier")
    with pytest.raises(error, match=match):
        train(train_config(env, *sets, data_dir=data_dir), log=lambda *_: None)
    assert snapshot(env / "earlier") == before


def data_file(tmp_path: Path, name: str, content: str | bytes) -> tuple[Path, str]:
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path, f"data.train_file={name}"


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("name, content, message", [
    ("train.jsonl", GOOD + '{"document": "x", "summary": }\n', r"train\.jsonl:2: malformed JSON line"),
    ("train.csv", "document,abstract\napple,river\n", r"train\.csv:1: no column 'summary' in the header"),
    ("train.jsonl", "\n \n", r"train\.jsonl: file is empty"),
    ("train.jsonl", GOOD + '{"document": "apple", "summary": "  "}\n',
     r"train\.jsonl:2: empty target \(field 'summary'\)"),
    ("train.jsonl", GOOD.encode() + b'{"document": "caf\xe9", "summary": "x"}\n',
     r"train\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    ("train.jsonl", GOOD * 2 + '{"document": "apple"}\n', r"train\.jsonl:3 \(record 2\): no field 'summary'"),
], ids=["malformed_jsonl_line", "csv_missing_column", "empty_file", "empty_target", "non_utf8", "missing_field"])
def test_bad_data_file(env, tmp_path, name, content, message):
    data_dir, train_file = data_file(tmp_path, name, content)
    expect_train_error(env, ValueError, message, train_file, data_dir=data_dir)


def test_overlong_example_with_on_overlong_error(env, tmp_path):
    long = json.dumps({"document": " ".join(["apple"] * 20), "summary": "apple"}) + "\n"
    data_dir, train_file = data_file(tmp_path, "train.jsonl", GOOD + long)
    expect_train_error(env, ValueError, r"train\.jsonl:2: example is \d+ tokens, over max_length=96 "
                       r"\(on_overlong='error'\)", train_file, "data.on_overlong=error", data_dir=data_dir)


def test_missing_data_file(env, tmp_path):
    expect_train_error(env, FileNotFoundError, r"nothere\.jsonl: no such file", "data.train_file=nothere.jsonl",
                       data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- config


def test_prompt_template_with_unknown_placeholder(env):
    with pytest.raises(ValueError, match=r"prompt_template: unknown placeholder \{title\}"):
        train_config(env, "data.prompt_template='{title}: {input}'")


def test_unknown_config_key_names_file_key_and_closest(tmp_path):
    (tmp_path / "run.yaml").write_text("optim:\n  lerning_rate: 0.1\n")
    with pytest.raises(config.ConfigError, match=r"run\.yaml: unknown key 'optim\.lerning_rate' "
                                                 r"\(did you mean 'optim\.learning_rate'\?\)"):
        config.load_config(TrainConfig, tmp_path / "run.yaml")


def test_unknown_key_in_an_included_data_preset(tmp_path):
    (tmp_path / "preset.yaml").write_text("train_file: a.jsonl\ntrian_file: b.jsonl\n")
    (tmp_path / "run.yaml").write_text("include: {data: preset.yaml}\n")
    with pytest.raises(config.ConfigError, match=r"unknown key 'data\.trian_file' \(did you mean 'data\.train_file'"):
        config.load_config(TrainConfig, tmp_path / "run.yaml")


def test_wrong_type_in_config(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  steps: ten\n")
    with pytest.raises(config.ConfigError, match=r"run\.yaml: train\.steps: expected an integer, got 'ten'"):
        config.load_config(TrainConfig, tmp_path / "run.yaml")


def test_invalid_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  steps: [1,\n")
    with pytest.raises(config.ConfigError, match=r"run\.yaml: invalid YAML"):
        config.load_config(TrainConfig, tmp_path / "run.yaml")


def test_negative_learning_rate():
    with pytest.raises(config.ConfigError, match=r"optim\.learning_rate: must be positive, got -0\.001"):
        config.load_config(TrainConfig, None, ["optim.learning_rate=-1e-3"])


def test_merge_with_zero_task_loras():
    with pytest.raises(config.ConfigError,
                       match=r"merge\.task_adapters: a merge needs at least one task LoRA, got zero"):
        config.load_config(TrainConfig, None, ["adapter.kind=merge"])


@pytest.mark.parametrize("setting, value, key, bad", [("final_sparsity", "1.0", "final_sparsity", "1.0"),
                                                      ("final_sparsity", "-0.1", "final_sparsity", "-0.1"),
                                                      ("layer_sparsity", "[0.5, 1.5]", "layer_sparsity[1]", "1.5")])
def test_pruning_sparsity_outside_zero_one(setting, value, key, bad):
    # PruneConfig checks itself on construction; the message names the field and the bad value.
    with pytest.raises(ValueError, match=rf"{re.escape(key)}[^\w\[].*must be in \[0, 1\), got {re.escape(bad)}$"):
        config.load_config(TrainConfig, None, ["adapter.kind=merge", "merge.task_adapters=[a]",
                                               "merge.pruning.scope=layer", f"merge.pruning.{setting}={value}"])


# ------------------------------------------------------------------------------------- model and mesh


def test_base_checkpoint_with_a_missing_tensor(env, tmp_path):
    shutil.copytree(env / "model", tmp_path / "model")
    file = SafetensorsFile(tmp_path / "model" / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = {k: np.array(file[k]) for k in file.keys() if k != name}
    write_safetensors(tmp_path / "model" / "model.safetensors", tensors)
    expect_train_error(env, ValueError, rf"model: tensor '{name}' is missing from the checkpoint",
                       f"model.path={tmp_path / 'model'}")


def test_mesh_that_does_not_divide_the_device_count(env):
    expect_train_error(env, ValueError, r"mesh data=3 fsdp=1 tensor=1 needs 3 devices, but 8 are available",
                       "mesh.data=3")


def test_mesh_that_does_not_divide_the_model(env):
    # 8-way tensor parallelism over a feed-forward width of 60
    expect_train_error(env, ValueError, r"proj\['down_proj'\]: dimension 'ffw' of size 60 is not divisible by the 8 "
                       r"shards the mesh \{'data': 1, 'fsdp': 1, 'tensor': 8\}",
                       f"model.path={env / 'other_model'}", "mesh.data=1", "mesh.tensor=8")


# --------------------------------------------------------------------------------------------- adapters


def test_adapter_for_another_base_model(env):
    expect_train_error(env, ValueError, r"lora_other/adapter_model\.safetensors: tensor '.*lora_A\.weight' has shape "
                       r"\(4, 32\), expected \(r, in_features\) = \(4, 64\).*another base model",
                       f"adapter.init_from={env / 'lora_other'}")


def test_adapter_that_does_not_exist(env):
    expect_train_error(env, FileNotFoundError, r"nothere: no such PEFT adapter directory",
                       f"adapter.init_from={env / 'nothere'}")


def test_task_loras_with_different_target_modules(env):
    expect_train_error(env, ValueError, r"merge: task LoRA 1 targets \['k_proj', 'q_proj'\] but task LoRA 0 targets "
                       r"\['q_proj', 'v_proj'\]", "adapter.kind=merge",
                       f"merge.task_adapters=[{env / 'lora_qv'}, {env / 'lora_qk'}]")


def test_peft_adapter_with_unsupported_features(env):
    expect_train_error(env, ValueError, r"lora_dora/adapter_config\.json: 'use_dora': True is not supported",
                       "adapter.kind=merge", f"merge.task_adapters=[{env / 'lora_qv'}, {env / 'lora_dora'}]")


# -------------------------------------------------------------------------------------------------- CLI


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def test_train_py_output_dir_that_is_a_file(tmp_path):
    """The embedded default would write its tiny model under output_dir: the check comes first."""
    out = tmp_path / "out"
    out.write_text("not a directory")
    before = snapshot(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--set", f"output_dir={out}"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: output_dir {out}: exists and is not a directory" in done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(tmp_path) == before


def test_eval_py_on_an_adapter_that_does_not_exist(env):
    out = env / "earlier"
    before = snapshot(out)
    sets = [f"output_dir={out}", f"model_path={env / 'model'}", f"data.data_dir={env / 'task'}",
            "data.eval_file=dev.jsonl", "data.prompt_template='Reverse: {input}\n'", "data.max_length=96",
            "data.max_target_length=16", f"adapters=[{{name: base}}, {{name: mine, path: {env / 'missing_run'}}}]"]
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), *[a for s in sets for a in ("--set", s)]],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"error: adapter 'mine': {env / 'missing_run'} does not exist" in done.stderr
    assert snapshot(out) == before  # the earlier report.md and scores.json are untouched
