"""From token ids to batches: bucketed padding and a resumable, deterministic iterator.

Training batches are right-padded to the smallest ``length_buckets`` entry that holds the longest example
of the global batch (``max_length`` is the implied last bucket), so a few shapes get compiled. The order of
epoch e is ``np.random.default_rng([shuffle_seed, e]).permutation(n)``; the last partial batch of an epoch
is dropped (every step has the same global batch size). The iterator's position is the small dict
``{"epoch", "batch_index", ...}`` that goes into a checkpoint.

Packing (``packing: true``). Each epoch's shuffled examples are placed, first fit, into rows of at most
``pack_length`` tokens (default ``max_length``; an example longer than that gets a row of its own), and
batches are made of rows instead of examples, padded like examples to the bucket of their longest row. A row
carries ``segment_ids`` (1, 2, ... per example, 0 on padding), so attention never crosses examples, and
``positions`` restarting at 0 in each example; the loss stays on each example's own target tokens. A row
also holds at most ``packed_target_tokens`` target tokens, the bound the train step's target-only LM head is
built for (see there). The rows of an epoch depend only on its order, so a restored iterator packs them
again identically. Attention still costs a full causal square per row, so shorter rows (``pack_length``
near a few times the typical example) are cheaper when most examples are short.

Multi-host. Every host tokenises the whole (small) data set and computes the same order, so all hosts agree
on each global batch and its padded length; host p of P returns rows ``[p * B/P, (p + 1) * B/P)`` of it,
ready for ``jax.make_array_from_process_local_data`` when the batch axis is split over hosts in process order.

Example:
    >>> batches = TrainIterator(examples, cfg, pad_token_id(tokenizer))
    >>> batch = next(batches)  # {"input_ids", "attention_mask", "target_mask"}: int32 [B, T]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_merge_jax.data.prompts import TokenizedExample
from lora_merge_jax.data.records import DataConfig


def bucket_length(length: int, buckets: Sequence[int] = (), max_length: int | None = None, *,
                  minimum: int = 16) -> int:
    """The padded length of a sequence of ``length`` tokens, from a small set so that few shapes compile.

    With configured ``buckets`` or a ``max_length``: the smallest of ``buckets``, then ``max_length``, that
    holds it (training and scoring, where the data config lists the lengths). Without either: a geometric
    ladder, ``minimum`` for short sequences, else ``length`` rounded up to a multiple of
    ``max(minimum, 2 ** (bit_length(length - 1) - 3))``, so there are a bounded number of lengths per octave
    and at most a quarter is padding (prompts of any length, for generation).

    Example:
        >>> bucket_length(40, (64, 128), 256), bucket_length(200, (64, 128), 256)
        (64, 256)
        >>> bucket_length(9), bucket_length(100, minimum=64), bucket_length(1100, minimum=64)
        (16, 128, 1280)
    """
    for bucket in buckets:
        if length <= bucket:
            return bucket
    if max_length is not None:
        if length <= max_length:
            return max_length
        raise ValueError(f"a sequence of {length} tokens is longer than max_length={max_length}")
    if length <= minimum:
        return minimum
    step = max(minimum, 1 << max((length - 1).bit_length() - 3, 0))
    return -(-length // step) * step


def pad_batch(sequences: Sequence[np.ndarray], length: int, pad_id: int, *,
              masks: Sequence[np.ndarray] | None = None, side: str = "right") -> dict[str, np.ndarray]:
    """Pads token id sequences to ``[len(sequences), length]`` int32 arrays.

    Returns ``input_ids`` and ``attention_mask`` (1 on real tokens), plus ``target_mask`` when ``masks``
    is given. ``side`` is "right" (training) or "left" (prompts for generation).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    batch = {"input_ids": np.full((len(sequences), length), pad_id, np.int32),
             "attention_mask": np.zeros((len(sequences), length), np.int32)}
    if masks is not None:
        batch["target_mask"] = np.zeros((len(sequences), length), np.int32)
    for row, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        batch["input_ids"][row, span] = ids
        batch["attention_mask"][row, span] = 1
        if masks is not None:
            batch["target_mask"][row, span] = masks[row]
    return batch


def pad_packed(rows: Sequence[Sequence[TokenizedExample]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows of several examples each, right-padded to ``length``: ``pad_batch``'s arrays plus ``segment_ids``
    (example k of a row is k + 1, padding 0) and ``positions`` (restarting at 0 in each example)."""
    batch = {"input_ids": np.full((len(rows), length), pad_id, np.int32)}
    for key in ("attention_mask", "target_mask", "segment_ids", "positions"):
        batch[key] = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, example in enumerate(row, 1):
            span = slice(start, start + len(example.input_ids))
            batch["input_ids"][r, span] = example.input_ids
            batch["attention_mask"][r, span] = 1
            batch["target_mask"][r, span] = example.target_mask
            batch["segment_ids"][r, span] = k
            batch["positions"][r, span] = np.arange(len(example.input_ids))
            start = span.stop
    return batch


def pack(order: Sequence[int], lengths: np.ndarray, targets: np.ndarray, max_length: int,
         max_targets: int) -> list[list[int]]:
    """First-fit packing of examples, taken in ``order``, into rows of at most ``max_length`` tokens and
    ``max_targets`` target tokens (an example over either fills a row alone); returns each row's example
    indices, rows in order of creation."""
    rows: list[list[int]] = []
    room, target_room = [], []  # per row: tokens and target tokens still free
    for i in order:
        n, m = int(lengths[i]), int(targets[i])
        for r in range(len(rows)):
            if room[r] >= n and target_room[r] >= m:
                rows[r].append(int(i))
                room[r] -= n
                target_room[r] -= m
                break
        else:
            rows.append([int(i)])
            room.append(max_length - n)
            target_room.append(max_targets - m)
    return rows


def _host_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if not 0 <= process_index < process_count or batch_size % process_count:
        raise ValueError(f"need 0 <= process_index ({process_index}) < process_count ({process_count}) and "
                         f"batch_size ({batch_size}) divisible by process_count")
    per_host = batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class TrainIterator:
    """Endless (or ``num_epochs``-long) iterator of padded training batches that can resume exactly.

    Args:
        examples: the tokenised training set, identical on every host.
        cfg: supplies batch_size (global), shuffle_seed, length_buckets, max_length.
        pad_id: the padding token id, e.g. ``pad_token_id(tokenizer)``.
        process_index: this host's index; it gets rows [p * B/P, (p + 1) * B/P) of each global batch.
        process_count: the number of hosts P; must divide batch_size.
        num_epochs: stop after this many epochs; None runs forever.

    Example:
        >>> it = TrainIterator(examples, cfg, pad_id)
        >>> batch = next(it); saved = it.state()   # goes into the checkpoint
        >>> resumed = TrainIterator(examples, cfg, pad_id); resumed.restore(saved)
    """

    def __init__(self, examples: Sequence[TokenizedExample], cfg: DataConfig, pad_id: int, *,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
        if len(examples) < cfg.batch_size:
            raise ValueError(f"{len(examples)} training examples cannot fill one batch of {cfg.batch_size}")
        self.examples, self.cfg, self.pad_id, self.num_epochs = examples, cfg, pad_id, num_epochs
        self._rows = _host_rows(cfg.batch_size, process_index, process_count)
        self._lengths = np.array([len(e.input_ids) for e in examples])
        self._targets = np.array([int(e.target_mask.sum()) for e in examples])
        self._epoch, self._batch_index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)
        self._packed_epoch, self._packed = -1, []  # the packed rows of one epoch, made on demand

    @property
    def pack_length(self) -> int:
        """The tokens a packed row holds (``pack_length``, default ``max_length``)."""
        return self.cfg.pack_length or self.cfg.max_length

    @property
    def packed_target_tokens(self) -> int:
        """The most target tokens a packed row may hold: twice what a full row holds on average (the data's
        share of target tokens), never less than the longest single target. The LM head runs on this many
        positions per row, so a loose bound costs compute; a tight one leaves rows shorter."""
        share = self._targets.sum() / max(int(self._lengths.sum()), 1)
        expected = 2 * int(np.ceil(self.pack_length * share))
        return max(int(self._targets.max(initial=0)), min(self.pack_length, expected))

    @property
    def max_target_tokens(self) -> int:
        """A bound on the target tokens of any row this iterator yields (``make_train_step``'s bound)."""
        return self.packed_target_tokens if self.cfg.packing else int(self._targets.max(initial=0))

    def steps_in_epoch(self, epoch: int) -> int:
        """Full global batches of ``epoch`` (the last partial batch is dropped); with packing, of rows."""
        units = len(self._epoch_rows(epoch)) if self.cfg.packing else len(self.examples)
        return units // self.cfg.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches of the current epoch."""
        return self.steps_in_epoch(self._epoch)

    def _identity(self) -> dict[str, int]:
        return {"shuffle_seed": self.cfg.shuffle_seed, "num_examples": len(self.examples),
                "batch_size": self.cfg.batch_size, "packing": int(self.cfg.packing),
                "pack_length": self.pack_length if self.cfg.packing else 0}

    def state(self) -> dict[str, int]:
        """The position of the next batch, plus what it is only valid for; plain ints, for checkpoints."""
        return {"epoch": self._epoch, "batch_index": self._batch_index, **self._identity()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from a ``state()``; refuses one saved for a different data set, seed or batch size."""
        packed = int(state.get("packing", 0))  # states saved before packing existed have neither key
        older = {"packing": 0, "pack_length": self.cfg.max_length if packed else 0}  # nor this one, before pack_length
        for key, value in self._identity().items():
            saved = int(state[key]) if key in state or key not in older else older[key]
            if saved != value:
                raise ValueError(f"iterator state has {key}={saved}, this iterator has {value}")
        steps = self.steps_in_epoch(int(state["epoch"]))
        if not 0 <= int(state["batch_index"]) <= steps:
            raise ValueError(f"iterator state batch_index={state['batch_index']} is outside 0..{steps}")
        self._epoch, self._batch_index = int(state["epoch"]), int(state["batch_index"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of ``epoch``, the same on every host and after every restore."""
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.cfg.shuffle_seed, epoch])
            self._order_epoch, self._order = epoch, rng.permutation(len(self.examples))
        return self._order

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch != self._packed_epoch:
            self._packed_epoch = epoch
            self._packed = pack(self.epoch_order(epoch), self._lengths, self._targets, self.pack_length,
                                self.packed_target_tokens)
        return self._packed

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch_index >= self.steps_per_epoch:
            self._epoch, self._batch_index = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        size, index = self.cfg.batch_size, self._batch_index
        self._batch_index += 1
        if self.cfg.packing:
            rows = self._epoch_rows(self._epoch)[index * size:(index + 1) * size]
            length = bucket_length(max(int(self._lengths[r].sum()) for r in rows), self.cfg.length_buckets,
                                   self.cfg.max_length)
            return pad_packed([[self.examples[i] for i in r] for r in rows[self._rows]], length, self.pad_id)
        rows = self.epoch_order(self._epoch)[index * size:(index + 1) * size]
        length = bucket_length(int(self._lengths[rows].max()), self.cfg.length_buckets, self.cfg.max_length)
        local = [self.examples[i] for i in rows[self._rows]]
        return pad_batch([e.input_ids for e in local], length, self.pad_id, masks=[e.target_mask for e in local])
