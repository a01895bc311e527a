"""From records to token ids: prompt formatting and tokenisation with the loss on targets only.

The prompt template holds ``{input}`` exactly once (plus record fields named in ``prompt_fields``). It is
rendered with a marker in place of the input, inside the tokenizer's chat template when
``use_chat_template`` is set, and encoded in pieces: text before the input, the input, text after. An
overlong example thus loses tokens from the end of its input only, never template text or target, and
nothing is re-tokenised. Tokens do not merge across piece boundaries, and train and eval prompts come from
the same pieces, so the model is prompted exactly as it was trained. Every truncation and skip is counted
in a ``DataStats``, which the caller logs. ``max_examples`` (the low-resource setting) takes the first N
usable examples of a ``subset_seed`` shuffle, so for one seed the 50-example subset is a prefix of the
100-example one.

Example:
    >>> examples, stats = build_train_examples(cfg, tokenizer)
    >>> examples[0].input_ids, examples[0].target_mask     # int32 [T] each
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from lora_merge_jax.data.records import DataConfig, normalise_text, read_records

_INPUT_MARK, _TARGET_MARK = "\ue000INPUT\ue000", "\ue000TARGET\ue000"
_CHUNK = 256  # records tokenised per tokenizer call


class TokenizedExample(NamedTuple):
    """A training example: token ids and a 1-on-target mask (summary tokens and end tokens)."""

    input_ids: np.ndarray  # int32 [T]
    target_mask: np.ndarray  # int32 [T]


class EvalExample(NamedTuple):
    """An evaluation example: the prompt to generate from and every reference summary."""

    prompt_ids: np.ndarray  # int32 [T]
    references: tuple[str, ...]
    source: str


@dataclasses.dataclass
class DataStats:
    """What happened to one split on its way to token ids; log it with ``str(stats)``."""

    split: str
    records_read: int = 0  # records in the file or hub split
    examples: int = 0  # examples kept
    inputs_truncated: int = 0  # examples whose input was cut to fit max_length
    input_tokens_dropped: int = 0  # input tokens cut, over all examples
    targets_truncated: int = 0  # summaries cut to max_target_length
    skipped_overlong: int = 0  # examples dropped by on_overlong="skip"

    def __str__(self) -> str:
        return (f"{self.split}: {self.records_read} records read, {self.examples} examples kept; "
                f"{self.inputs_truncated} inputs truncated ({self.input_tokens_dropped} tokens dropped), "
                f"{self.targets_truncated} targets truncated, {self.skipped_overlong} skipped as too long")


# ------------------------------------------------------------------------------------------ tokenisation


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (padding is masked out anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


class PromptFormat:
    """Token pieces around the input and after the target, for one tokenizer and config (cached).

    ``pieces(fields)`` gives ``(before, after, end)``: an example is ``before + input + after + target +
    end``. Without a chat template ``before`` starts with the special tokens the tokenizer puts in front
    of a text (BOS, if any) and ``end`` is EOS. With one, both come from the rendered conversation.
    """

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        if cfg.use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template is set but the tokenizer has no chat template "
                             "(tokenizer.chat_template is empty); set use_chat_template: false")
        if not cfg.use_chat_template and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end the target with")
        with_special = tokenizer("x")["input_ids"]
        plain = tokenizer("x", add_special_tokens=False)["input_ids"]
        self.start_ids = [] if cfg.use_chat_template else list(with_special[:with_special.index(plain[0])])
        self._cache: dict[tuple[tuple[str, str], ...], tuple[list[int], list[int], list[int]]] = {}

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Data text to ids; special-token strings in the data are not read as special tokens."""
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _encode_markup(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def pieces(self, fields: Mapping[str, str]) -> tuple[list[int], list[int], list[int]]:
        """(before, after, end) token ids for a record whose prompt fields are ``fields``."""
        key = tuple(sorted(fields.items()))
        if key not in self._cache:
            prompt = self.cfg.prompt_template.format(input=_INPUT_MARK, **fields)
            if self.cfg.use_chat_template:
                rendered = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": _TARGET_MARK}],
                    tokenize=False)
                if rendered.count(_INPUT_MARK) != 1 or rendered.count(_TARGET_MARK) != 1 or (
                        rendered.index(_INPUT_MARK) > rendered.index(_TARGET_MARK)):
                    raise ValueError("the chat template does not render the user and assistant messages once each")
                before, rest = rendered.split(_INPUT_MARK)
                after, end = rest.split(_TARGET_MARK)
                end_ids = self._encode_markup(end.rstrip()) or [self.tokenizer.eos_token_id]
                if None in end_ids:
                    raise ValueError("the chat template ends the assistant turn with nothing and there is no EOS")
                self._cache[key] = (self._encode_markup(before), self._encode_markup(after), end_ids)
            else:
                before, after = prompt.split(_INPUT_MARK)
                self._cache[key] = (self.start_ids + self._encode_markup(before), self._encode_markup(after),
                                    [self.tokenizer.eos_token_id])
        return self._cache[key]


def _fit_input(input_ids: list[int], budget: int, cfg: DataConfig, stats: DataStats, where: str) -> list[int] | None:
    """The input cut to ``budget`` tokens as on_overlong says; None when the example is skipped."""
    if len(input_ids) <= budget:
        return input_ids
    if cfg.on_overlong == "error":
        raise ValueError(f"{where}: example is {len(input_ids) - budget + cfg.max_length} tokens, over "
                         f"max_length={cfg.max_length} (on_overlong='error')")
    if cfg.on_overlong == "skip":
        stats.skipped_overlong += 1
        return None
    if budget < 1:
        raise ValueError(f"{where}: prompt template, prompt fields and target leave no room for the input in "
                         f"max_length={cfg.max_length}; raise max_length or lower max_target_length")
    stats.inputs_truncated += 1
    stats.input_tokens_dropped += len(input_ids) - budget
    return input_ids[:budget]


def _train_example(fmt: PromptFormat, fields: Mapping[str, str], input_ids: list[int], target_ids: list[int],
                   stats: DataStats, where: str) -> TokenizedExample | None:
    cfg = fmt.cfg
    before, after, end = fmt.pieces(fields)
    if len(target_ids) > cfg.max_target_length:
        stats.targets_truncated += 1
        target_ids = target_ids[:cfg.max_target_length]
    budget = cfg.max_length - len(before) - len(after) - len(target_ids) - len(end)
    fitted = _fit_input(list(input_ids), budget, cfg, stats, where)
    if fitted is None:
        return None
    prompt = before + fitted + after
    ids = np.asarray(prompt + list(target_ids) + end, np.int32)
    mask = np.zeros(len(ids), np.int32)
    mask[len(prompt):] = 1
    return TokenizedExample(ids, mask)


def tokenize_example(tokenizer: Any, input_text: str, target: str, cfg: DataConfig, *,
                     fields: Mapping[str, str] | None = None, stats: DataStats | None = None,
                     prompt_format: PromptFormat | None = None, source: str = "example") -> TokenizedExample | None:
    """Token ids and target mask of one training example: [BOS] prompt target EOS.

    The mask is 1 on the target tokens and the end token(s). A target over ``max_target_length`` is cut;
    an example over ``max_length`` has its input cut (or is skipped, or raises) per ``cfg.on_overlong``.

    Args:
        tokenizer: a transformers tokenizer.
        input_text: the document, placed at ``{input}`` of ``cfg.prompt_template``.
        target: the summary.
        cfg: the data config.
        fields: values of ``cfg.prompt_fields``.
        stats: counts truncations and skips when given.
        prompt_format: a ``PromptFormat(tokenizer, cfg)`` to reuse across calls.
        source: where the example came from, for messages.

    Returns:
        ``TokenizedExample(input_ids, target_mask)``, or None when skipped (``on_overlong="skip"``).

    Example:
        >>> ids, mask = tokenize_example(tok, "a b c", "c b a", DataConfig(prompt_template="{input}="))
    """
    fmt = prompt_format or PromptFormat(tokenizer, cfg)
    input_ids, target_ids = fmt.encode([normalise_text(input_text), normalise_text(target)])
    return _train_example(fmt, fields or {}, input_ids, target_ids, stats or DataStats("example"), source)


def build_train_examples(cfg: DataConfig, tokenizer: Any) -> tuple[list[TokenizedExample], DataStats]:
    """Reads, validates and tokenises the training split (first target of each record).

    With ``max_examples`` the records are shuffled with ``subset_seed`` and the first ``max_examples``
    usable ones kept, in that order; without it all examples are kept in file order.
    """
    records = read_records(cfg, "train")
    stats = DataStats("train", records_read=len(records))
    fmt = PromptFormat(tokenizer, cfg)
    order = (np.arange(len(records)) if cfg.max_examples is None
             else np.random.default_rng(cfg.subset_seed).permutation(len(records)))
    limit = cfg.max_examples or len(records)
    examples: list[TokenizedExample] = []
    for start in range(0, len(order), _CHUNK):
        if len(examples) == limit:
            break
        chunk = [records[i] for i in order[start:start + _CHUNK]]
        inputs, targets = fmt.encode([r.input for r in chunk]), fmt.encode([r.targets[0] for r in chunk])
        for record, input_ids, target_ids in zip(chunk, inputs, targets):
            if len(examples) == limit:
                break
            example = _train_example(fmt, record.fields, input_ids, target_ids, stats, record.source)
            if example is not None:
                examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def build_eval_examples(cfg: DataConfig, tokenizer: Any) -> tuple[list[EvalExample], DataStats]:
    """Reads and tokenises the evaluation split: prompt ids for generation and all references.

    A prompt is cut so that it plus ``max_target_length`` generated tokens and the end tokens fit in
    ``max_length``. With ``max_eval_examples`` the first N usable records in file order are kept.
    """
    records = read_records(cfg, "eval")
    stats = DataStats("eval", records_read=len(records))
    fmt = PromptFormat(tokenizer, cfg)
    limit = cfg.max_eval_examples or len(records)
    examples: list[EvalExample] = []
    for start in range(0, len(records), _CHUNK):
        if len(examples) == limit:
            break
        chunk = records[start:start + _CHUNK]
        for record, input_ids in zip(chunk, fmt.encode([r.input for r in chunk])):
            if len(examples) == limit:
                break
            before, after, end = fmt.pieces(record.fields)
            budget = cfg.max_length - len(before) - len(after) - cfg.max_target_length - len(end)
            fitted = _fit_input(list(input_ids), budget, cfg, stats, record.source)
            if fitted is not None:
                examples.append(EvalExample(np.asarray(before + fitted + after, np.int32), record.targets,
                                            record.source))
    stats.examples = len(examples)
    return examples, stats


# --------------------------------------------------------------------------------------------- batching


def max_target_tokens(examples: Sequence[TokenizedExample]) -> int:
    """The most target tokens (summary and end tokens) of any example: a bound for
    ``train_step.make_train_step(max_target_tokens=...)``."""
    return max((int(e.target_mask.sum()) for e in examples), default=0)
