"""Pretraining a small Llama-architecture base model from scratch: a tokenizer and a full-parameter loop.

The rest of the package only ever trains adapters on a frozen base. Where no pretrained checkpoint can be
had (the benchmark of ``bench/paper_table.py``), this module makes one: ``train_bpe_tokenizer`` trains a
byte-level BPE tokenizer (the ``tokenizers`` package) and wraps it for transformers; ``pack_documents``
concatenates tokenised documents, separated by EOS, into fixed-length rows; ``pretrain`` runs AdamW on
*all* base weights with a step that differentiates the ``Weights`` tree through ``model.apply_model`` and
``losses.token_nll`` (every next token is a target). The result goes through ``pretrained.save_pretrained``
as a real Hugging Face checkpoint, so everything downstream loads it like any other base model.

Example:
    >>> tok = train_bpe_tokenizer(texts, vocab_size=4096)
    >>> rows_NxT = pack_documents([tok(t, add_special_tokens=False)["input_ids"] for t in texts], 256,
    ...                           tok.eos_token_id)
    >>> weights, losses = pretrain(cfg, weights_lib.init_random(cfg, key, mesh=mesh), rows_NxT, steps=1000)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_merge_jax.models import decoder, losses
from lora_merge_jax.models import weights as weights_lib
from lora_merge_jax.models.config import ModelConfig
from lora_merge_jax.tiny import SPECIAL_TOKENS
from lora_merge_jax.training.optim import OptimConfig, make_optimizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``.

    Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS, put in front of every encoded text), ``</s>`` 2 (EOS),
    ``<unk>`` 3 (never produced: byte-level BPE covers every byte).

    Args:
        texts: training text, any language (UTF-8 bytes are the base alphabet).
        vocab_size: final vocabulary size, including the 256 byte tokens and the special tokens.
        min_frequency: a merge needs at least this many occurrences.
    """
    import transformers
    from tokenizers import ByteLevelBPETokenizer, processors

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"byte-level BPE needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend = bpe._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left")


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, eos_id: int, bos_id: int | None = None,
                   seed: int = 0) -> np.ndarray:
    """Documents (token ids) shuffled, joined as ``[BOS] doc EOS`` and cut into rows [N, seq_len].

    The tail that does not fill a row is dropped.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    stream: list[int] = []
    for i in order:
        stream += ([bos_id] if bos_id is not None else []) + list(documents[i]) + [eos_id]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"{len(stream)} tokens do not fill one row of {seq_len}")
    return np.asarray(stream[: rows * seq_len], np.int32).reshape(rows, seq_len)


def make_pretrain_step(cfg: ModelConfig, tx: optax.GradientTransformation, compute_dtype: Any = None
                       ) -> Callable[[weights_lib.Weights, Any, jax.Array], tuple[weights_lib.Weights, Any, jax.Array]]:
    """``step(weights, opt_state, ids_BxT) -> (weights, opt_state, mean NLL)``, jitted with donation."""

    def loss_fn(weights: weights_lib.Weights, ids_BxT: jax.Array) -> jax.Array:
        logits_BxTxV, _ = decoder.apply_model(cfg, weights, ids_BxT, compute_dtype=compute_dtype)
        every_token_BxT = jnp.ones_like(ids_BxT)
        return losses.mean_token_nll(logits_BxTxV, ids_BxT, every_token_BxT)

    def step(weights, opt_state, ids_BxT):
        loss, grads = jax.value_and_grad(loss_fn)(weights, ids_BxT)
        updates, opt_state = tx.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def pretrain(cfg: ModelConfig, weights: weights_lib.Weights, rows_NxT: np.ndarray, *, steps: int, batch_size: int,
             learning_rate: float = 3e-3, warmup: int | None = None, seed: int = 0, compute_dtype: Any = None,
             log: Callable[[str], None] = print, log_every: int = 50) -> tuple[weights_lib.Weights, list[float]]:
    """Trains every base weight on packed rows for ``steps`` AdamW steps (epochs reshuffled by ``seed``).

    Returns:
        (the trained weights, the loss of every step).
    """
    warmup = warmup if warmup is not None else max(steps // 20, 1)
    # AdamW with cosine decay to 10% of the peak; matrices decayed, norm scales (vectors) not.
    tx = make_optimizer(OptimConfig(learning_rate=learning_rate, warmup_steps=warmup, end_learning_rate_ratio=0.1,
                                    weight_decay=0.1, b2=0.95), max(steps, warmup + 1))
    opt_state = tx.init(weights)
    step_fn = make_pretrain_step(cfg, tx, compute_dtype)
    per_epoch = max(len(rows_NxT) // batch_size, 1)
    history: list[float] = []
    pending, t0 = None, time.perf_counter()
    order = None
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        if index == 0:
            order = np.random.default_rng([seed, epoch]).permutation(len(rows_NxT))
        pick = order[index * batch_size:(index + 1) * batch_size]
        if len(pick) < batch_size:  # fewer rows than one batch: repeat them
            pick = np.resize(order, batch_size)
        weights, opt_state, loss = step_fn(weights, opt_state, jnp.asarray(rows_NxT[pick]))
        if pending is not None:  # read one step late: the device is already busy with this step
            history.append(float(pending))
        pending = loss
        if (step + 1) % log_every == 0 or step + 1 == steps:
            rate = (step + 1) * batch_size * rows_NxT.shape[1] / (time.perf_counter() - t0)
            log(f"pretrain step {step + 1}/{steps}: loss {float(loss):.3f} ({rate:,.0f} tokens/s)")
    history.append(float(pending))
    return weights, history
