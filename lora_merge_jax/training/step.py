"""The training state and the pure, jitted train step.

``TrainState`` holds exactly what a checkpoint must: the trainable adapter fields, the frozen adapter
fields (LoRA scales, merge masks), the optimizer state, the step, the RNG key, counters of skipped
non-finite steps and any method-specific statistics (pruning scores). The base weights are *not* in it:
the step takes them as a separate, non-donated argument and differentiates ``trainable`` alone, so no
gradient buffer of a base weight's size exists in the compiled program.

``make_train_step`` returns ``step(state, weights, batch) -> (state, metrics)``; batches carry a leading
micro-batch axis [M, B, T] for gradient accumulation (M = 1 without accumulation). Gradients of the summed
token NLL are accumulated over micro-batches and divided by the total number of target tokens, so M
micro-batches give the same update as one batch of M*B examples.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.transforms import MaskedNode
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_merge_jax import sharding
from lora_merge_jax.adapters import common
from lora_merge_jax.merge.adaptive import MergedLoraAdapter
from lora_merge_jax.merge.pruning import FactorScores
from lora_merge_jax.models import decoder, losses
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import ModelConfig

Array = jax.Array
PostUpdate = Callable[["TrainState", Any, optax.GradientTransformation], "TrainState"]


@struct.dataclass
class TrainState:
    """Everything that changes during training (and nothing else)."""

    step: Array  # int32 scalar: batches consumed (steps taken, skipped ones included)
    trainable: Any  # adapter with only its trainable fields set
    frozen: Any  # the same adapter type with the complementary fields (scales, masks)
    opt_state: Any
    rng: Array  # uint32[2] raw key for dropout
    skipped: Array  # int32: non-finite steps skipped in total
    skipped_in_a_row: Array  # int32: consecutive non-finite steps
    extra: Any = None  # method-specific state, e.g. pruning statistics

    @property
    def adapter(self) -> Any:
        return common.combine(self.trainable, self.frozen)


def run_keys(seed: int) -> dict[str, Array]:
    """A run's random keys, split by purpose from its one root key ``jax.random.key(seed)``.

    ``init``: the adapter's initial factors; ``dropout``: the train state's dropout stream. Adding a purpose
    later must not change these two, so new ones are folded in rather than split off.
    """
    init, dropout = jax.random.split(jax.random.key(seed))
    return {"init": init, "dropout": dropout}


def init_state(adapter: Any, optimizer: optax.GradientTransformation, seed: int,
               trainable_fields: tuple[str, ...] | None = None, extra: Any = None) -> TrainState:
    """A step-0 state for ``adapter`` (optimizer state built for the trainable fields only); its dropout
    stream is ``run_keys(seed)["dropout"]``."""
    trainable, frozen = common.split(adapter, trainable_fields)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=optimizer.init(trainable),
        rng=jax.random.key_data(run_keys(seed)["dropout"]), skipped=jnp.zeros((), jnp.int32),
        skipped_in_a_row=jnp.zeros((), jnp.int32), extra=extra,
    )


def state_shardings(state: TrainState, cfg: ModelConfig, mesh: Mesh,
                    optimizer: optax.GradientTransformation) -> TrainState:
    """Shardings of a train state: the adapter follows its logical axes, every optimizer moment follows the
    parameter it belongs to (found by ``optax.tree_utils.tree_map_params``, not by name), pruning statistics
    follow the factors they score, and everything else (step, counts, keys) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    adapter_sh = common.shardings(state.adapter, cfg, mesh)
    trained = [f.name for f in dataclasses.fields(state.trainable) if getattr(state.trainable, f.name) is not None
               and f.metadata.get("pytree_node", True)]
    trainable_sh, frozen_sh = common.split(adapter_sh, trained)
    # A parameter-shaped part of the state holds MaskedNode (no array) where a partition or mask leaves a
    # parameter out (optax.partition's groups): kept as it is.
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda moment, shard: moment if isinstance(moment, MaskedNode) else shard, state.opt_state,
        trainable_sh, transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, MaskedNode))

    def extra(node: Any) -> Any:
        if isinstance(node, FactorScores):
            return FactorScores(a=adapter_sh.a, b=adapter_sh.b)
        return replicated

    extra_sh = jax.tree.map(extra, state.extra, is_leaf=lambda x: isinstance(x, FactorScores))
    return state.replace(step=replicated, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh,
                         rng=replicated, skipped=replicated, skipped_in_a_row=replicated, extra=extra_sh)


def _finite(tree: Any) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, *, compute_dtype: Any = None,
                    remat: bool = False, post_update: PostUpdate | None = None,
                    max_target_tokens: int | None = None) -> Callable:
    """Builds the pure train step ``step(state, weights, batch) -> (state, metrics)`` (not yet jitted).

    Args:
        cfg: the base model's architecture.
        optimizer: from ``optim.make_optimizer``.
        compute_dtype: activations' dtype (the adapter and optimizer stay float32).
        remat: recompute layer activations in the backward pass.
        post_update: ``f(state, grads, optimizer) -> state`` run after each applied update (pruning masks).
        max_target_tokens: a bound on the target tokens of every row (``prompts.max_target_tokens``); the
            LM head then runs on that many positions per row instead of all T. The same loss and gradients;
            ``jit_train_step`` rejects a batch that breaks the bound.
    """

    def summed_nll(trainable: Any, frozen: Any, weights: weights_lib.Weights, micro: dict, rng: Array):
        adapter = common.combine(trainable, frozen)
        ids_BxT, target_BxT = micro["input_ids"], micro["target_mask"]
        selective = max_target_tokens is not None and max_target_tokens < ids_BxT.shape[1] - 1
        out, _ = decoder.apply_model(
            cfg, weights, ids_BxT, deltas=adapter.deltas(cfg), dropout=adapter.dropout,
            dropout_rng=rng if adapter.dropout > 0 else None, attention_mask_BxS=micro["attention_mask"],
            positions_BxT=micro.get("positions"), segment_ids_BxT=micro.get("segment_ids"),
            compute_dtype=compute_dtype, remat=remat, return_hidden=selective, frozen_weights=True,
        )
        if not selective:
            return losses.token_nll(out, ids_BxT, target_BxT)
        return losses.target_token_nll(out, ids_BxT, target_BxT, max_target_tokens,
                                       functools.partial(decoder.lm_logits, weights))

    grad_fn = jax.value_and_grad(summed_nll, has_aux=True)

    def step(state: TrainState, weights: weights_lib.Weights, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        num_micro = batch["input_ids"].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state.trainable)

        def accumulate(carry, inputs):
            grads_acc, total_acc, count_acc = carry
            micro, index = inputs
            (total, count), grads = grad_fn(state.trainable, state.frozen, weights, micro,
                                            jax.random.fold_in(step_rng, index))
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, total_acc + total, count_acc + count), None

        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, (batch, jnp.arange(num_micro)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = total / denom

        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(loss) & _finite(grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        # The step counts every batch, skipped or not, so it always matches the data position.
        updated = state.replace(trainable=keep(trainable, state.trainable), opt_state=keep(opt_state, state.opt_state),
                                step=state.step + 1)
        if post_update is not None:
            after = post_update(updated, grads, optimizer)
            updated = jax.tree.map(lambda n, o: jnp.where(finite, n, o), after, updated)
        new_state = updated.replace(
            rng=rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        )
        metrics = {
            "loss": loss, "target_tokens": count, "grad_norm": optax.tree_utils.tree_norm(grads),
            "finite": finite, "skipped": new_state.skipped, "skipped_in_a_row": new_state.skipped_in_a_row,
        }
        if isinstance(new_state.frozen, MergedLoraAdapter):
            # The merge's state after this step, returned with its loss so that the log pairs them (and the
            # host never reads the state itself, which the next step has already been given).
            adapter = new_state.adapter
            metrics["coefficients"] = adapter.coefficients
            metrics["sparsity"] = adapter.sparsity()
        return new_state, metrics

    step.max_target_tokens = max_target_tokens  # type: ignore[attr-defined]  # checked by jit_train_step
    step.optimizer = optimizer  # type: ignore[attr-defined]  # its state's shardings follow the parameters
    return step


def jit_train_step(step: Callable, state: TrainState, weights: weights_lib.Weights, cfg: ModelConfig,
                   mesh: Mesh, batch_size: int) -> Callable:
    """Jits ``step`` once with explicit shardings and the state donated.

    Returns ``train_step(state, batch) -> (state, metrics)`` with the base weights bound as an argument
    (not a compile-time constant).
    """
    state_sh = state_shardings(state, cfg, mesh, step.optimizer)
    weight_sh = jax.tree.map(lambda x: x.sharding, weights)
    batch_axes = sharding.batch_sharding(mesh, batch_size, ndim=3, leading=1)  # [micro-batches, B, T]
    replicated = NamedSharding(mesh, PartitionSpec())

    def step_on_mesh(state, weights, batch):
        # Traced with the mesh set, so that the model pins its activations to the batch axes
        # (model._constrain); without it XLA gathered the logits of the whole global batch onto every device.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, weights, batch)

    jitted = jax.jit(
        step_on_mesh,
        in_shardings=(state_sh, weight_sh, batch_axes),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )

    bound = getattr(step, "max_target_tokens", None)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if bound is not None:
            _check_target_bound(batch["target_mask"], bound)
        return jitted(state, weights, batch)

    train_step.jitted = jitted  # type: ignore[attr-defined]
    train_step.batch_sharding = batch_axes  # type: ignore[attr-defined]
    train_step.state_shardings = state_sh  # type: ignore[attr-defined]
    return train_step


def _check_target_bound(target_mask: Any, bound: int) -> None:
    """Raises when a row of this host's part of ``target_mask`` [A, B, T] has more than ``bound`` target
    tokens (the step built for the bound would leave the rest out of the loss)."""
    shards = target_mask.addressable_shards if isinstance(target_mask, jax.Array) else [target_mask]
    for shard in shards:
        most = losses.most_targets(getattr(shard, "data", shard))
        if most > bound:
            raise ValueError(f"a batch row has {most} target tokens, over the max_target_tokens={bound} that the "
                             "train step was built with; build it with a larger bound (prompts.max_target_tokens)")
