"""Bad checkpoints give one clear error that names the path or tensor."""

import json
import shutil

import jax
import numpy as np
import pytest

import lora_merge_jax as lmj
from lora_merge_jax.io.safetensors import SafetensorsFile, write_safetensors
from lora_merge_jax.sharding import MeshConfig, make_mesh


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such checkpoint directory"):
        lmj.load_pretrained(tmp_path / "nope")


def test_checkpoint_without_safetensors(llama_checkpoint, tmp_path):
    shutil.copy(llama_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*never loaded"):
        lmj.load_pretrained(tmp_path)


def test_unsupported_model_type(llama_checkpoint, tmp_path):
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        lmj.load_pretrained(tmp_path / "m")


def _rewrite(directory, edit):
    file = SafetensorsFile(directory / "model.safetensors")
    tensors = {k: np.array(file[k]) for k in file.keys()}
    edit(tensors)
    write_safetensors(directory / "model.safetensors", tensors)


def test_tensor_of_wrong_shape(llama_checkpoint, tmp_path):
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(tmp_path / "m", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape \(95, 64\), expected \(96, 64\)"):
        lmj.load_pretrained(tmp_path / "m")


def test_missing_tensor(llama_checkpoint, tmp_path):
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"tensor '{name}' is missing"):
        lmj.load_pretrained(tmp_path / "m")


def test_truncated_safetensors(llama_checkpoint, tmp_path):
    shutil.copytree(llama_checkpoint, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors: truncated"):
        lmj.load_pretrained(tmp_path / "m")


def test_mesh_that_does_not_divide_the_model(llama_checkpoint):
    mesh = make_mesh(MeshConfig(data=2, tensor=3), devices=jax.devices()[:6])
    with pytest.raises(ValueError, match=r"embed_VxD: dimension 'vocab' of size 128 is not divisible by the 3 shards"):
        lmj.load_pretrained(llama_checkpoint, mesh=mesh)


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="mesh data=3 fsdp=1 tensor=1 needs 3 devices, but 8 are available"):
        make_mesh(MeshConfig(data=3))
