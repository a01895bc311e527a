"""What a merge run logs: metrics.jsonl pairs each step's loss with the coefficients and sparsity that step
produced, read back against the checkpoint of that same step."""

import json

import jax
import numpy as np

from lora_merge_jax import tiny
from lora_merge_jax.adapters.lora import init_lora
from lora_merge_jax.io.hf import load_pretrained
from lora_merge_jax.io.peft_export import save_peft_adapter
from lora_merge_jax.training.checkpoint import Checkpointer, abstract_like
from lora_merge_jax.training.loop import train
from tests.train_helpers import tiny_train_config

STEPS = 4


def test_logged_coefficients_and_sparsity_are_those_of_the_logged_step(tmp_path, seed):
    model = load_pretrained(tiny.embedded_model(tmp_path / "run"))
    sources = []
    for k in range(2):
        lora = init_lora(model.config, jax.random.key(seed + k), rank=2, target_modules=["q_proj", "v_proj"])
        lora = lora.replace(b={n: jax.random.normal(jax.random.key(seed + 10 + k), v.shape) * 0.1
                               for n, v in lora.b.items()})
        sources.append(save_peft_adapter(lora, tmp_path / f"source{k}", model))
    cfg = tiny_train_config(
        tmp_path / "run", f"train.steps={STEPS}", "train.save_every=1", f"train.keep_checkpoints={STEPS}",
        "adapter.kind=merge", f"merge.task_adapters=[{sources[0]}, {sources[1]}]", "merge.granularity=task_layer",
        "merge.pruning.every=1", "merge.pruning.end_step=3", "merge.pruning.final_sparsity=0.5")
    result = train(cfg, log=lambda *_: None)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, STEPS + 1))

    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", keep=STEPS, async_save=False)
    abstract = abstract_like(result.state, jax.tree.map(lambda x: x.sharding, result.state))
    sparsities = []
    for step in range(1, STEPS + 1):
        state, _, _ = ckpt.restore(abstract, step)
        adapter = state.adapter
        np.testing.assert_allclose(records[step]["coefficients"], np.asarray(adapter.coefficients), atol=1e-5,
                                   err_msg=f"step {step}")
        for name, per_layer in jax.device_get(adapter.sparsity()).items():
            np.testing.assert_allclose(records[step]["sparsity"][name], per_layer, atol=1e-5,
                                       err_msg=f"step {step} {name}")
        sparsities.append(np.mean(records[step]["sparsity"]["q_proj"]))
    ckpt.close()
    assert sparsities[0] < sparsities[-1]  # the schedule moved, so a shift by one step would show
