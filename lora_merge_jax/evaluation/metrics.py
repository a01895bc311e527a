"""Summarisation metrics: ROUGE-1/2/L F1, corpus BLEU, and (optionally) BERTScore, for English and Japanese.

ROUGE comes from Google's ``rouge-score`` package and BLEU from ``sacrebleu``, so that numbers are comparable
with published ones; this module only chooses tokenisers and aggregates:

* ROUGE F1 per example is the **maximum over that example's references**, separately for each ROUGE type
  (as the SciTLDR paper evaluates multi-reference TLDRs, and as ``RougeScorer.score_multi`` does); the corpus
  score is the mean over examples, times 100.
* BLEU is sacrebleu's multi-reference ``corpus_bleu`` (examples may have different numbers of references).
* English uses rouge-score's default tokeniser (lower-case ASCII alphanumerics) with the Porter stemmer and
  sacrebleu's ``13a``. rouge-score's default tokeniser deletes every non-ASCII character, which would score
  all Japanese text as empty, so Japanese uses MeCab (``fugashi`` with ``unidic-lite``; surface forms) or
  single characters; punctuation-only tokens are dropped, mirroring the default tokeniser. Japanese BLEU uses
  sacrebleu's ``ja-mecab`` when its extras (mecab-python3 + ipadic) are installed, else the same fugashi
  segmentation with ``tokenize="none"``; ``settings`` records which one ran.

Every choice is returned in ``settings`` so reports can state exactly how the numbers were computed.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
LANGUAGES = ("en", "ja")
ROUGE_TOKENIZERS = ("default", "mecab", "char")
MULTI_REFERENCE_RULE = ("ROUGE: per example and per ROUGE type, the maximum F1 over the example's references, "
                        "then the mean over examples; BLEU: sacrebleu multi-reference corpus BLEU")


def _has_content(token: str) -> bool:
    """True when the token has a letter or digit (drops punctuation, symbols and spaces)."""
    return any(unicodedata.category(c)[0] in "LN" for c in token)


class MecabTokenizer:
    """rouge-score tokenizer: MeCab (fugashi + unidic-lite) surface forms, lower-cased, punctuation dropped.

    Example:
        >>> MecabTokenizer().tokenize("猫が魚を食べた。")
        ['猫', 'が', '魚', 'を', '食べ', 'た']
    """

    def __init__(self) -> None:
        import fugashi

        self._tagger = fugashi.Tagger()

    def segment(self, text: str) -> list[str]:
        """All surface forms, punctuation included (for BLEU)."""
        return [word.surface for word in self._tagger(text)]

    def tokenize(self, text: str) -> list[str]:
        return [t.lower() for t in self.segment(text) if _has_content(t)]


class CharTokenizer:
    """rouge-score tokenizer: one token per letter or digit character, lower-cased.

    Example:
        >>> CharTokenizer().tokenize("猫が 魚。")
        ['猫', 'が', '魚']
    """

    def tokenize(self, text: str) -> list[str]:
        return [c.lower() for c in text if _has_content(c)]


def _rouge_scorer(name: str) -> Any:
    from rouge_score import rouge_scorer

    tokenizer = {"default": None, "mecab": MecabTokenizer, "char": CharTokenizer}[name]
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True,
                                    tokenizer=None if tokenizer is None else tokenizer())


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 rouge_tokenizer: str = "default") -> dict[str, list[float]]:
    """Per-example ROUGE F1 in [0, 1], each the maximum over the example's references.

    Example:
        >>> rouge_scores(["the cat sat"], [["a dog ran", "the cat sat down"]])["rouge1"]
        [0.857...]
    """
    scorer = _rouge_scorer(rouge_tokenizer)
    out: dict[str, list[float]] = {t: [] for t in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references, strict=True):
        per_ref = [scorer.score(ref, prediction) for ref in refs]  # rouge-score's order: (target, prediction)
        for t in ROUGE_TYPES:
            out[t].append(max(s[t].fmeasure for s in per_ref))
    return out


def _japanese_bleu_tokenizer() -> tuple[str, MecabTokenizer | None, str]:
    """('ja-mecab', None, note) when sacrebleu's own MeCab works, else ('none', fugashi tokenizer, note)."""
    from sacrebleu.metrics import BLEU

    try:
        BLEU(tokenize="ja-mecab")
        return "ja-mecab", None, "sacrebleu ja-mecab (MeCab + IPAdic)"
    except (RuntimeError, ImportError, AssertionError):
        return "none", MecabTokenizer(), ("sacrebleu ja-mecab unavailable (needs mecab-python3 + ipadic); "
                                          "pre-segmented with fugashi + unidic-lite, tokenize='none'")


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]],
               language: str = "en") -> tuple[float, dict[str, str]]:
    """Multi-reference corpus BLEU (0-100) with sacrebleu, and a description of how it was computed.

    Example:
        >>> score, info = bleu_score(["the cat sat on the mat"], [["the cat sat on the mat"]])
        >>> score
        100.00000000000004
    """
    import sacrebleu

    presegment = None
    if language == "ja":
        tokenize, presegment, how = _japanese_bleu_tokenizer()
    else:
        tokenize, how = "13a", "sacrebleu 13a"
    if presegment is not None:
        join = lambda text: " ".join(presegment.segment(text))  # noqa: E731
        predictions = [join(p) for p in predictions]
        references = [[join(r) for r in refs] for refs in references]
    streams = [[refs[j] if j < len(refs) else None for refs in references]
               for j in range(max(map(len, references)))]
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize)
    result = metric.corpus_score(list(predictions), streams)
    return float(result.score), {"bleu_tokenizer": how, "bleu_signature": str(metric.get_signature())}


def _bertscore(predictions: Sequence[str], references: Sequence[Sequence[str]], model_path: str,
               language: str) -> tuple[float | None, str | None]:
    """Mean BERTScore F1 x 100 from a local model directory, or (None, reason) when it cannot run offline."""
    try:
        import bert_score
    except ImportError:
        return None, "BERTScore skipped: the bert_score package is not installed (pip install bert-score)"
    config = Path(model_path) / "config.json"
    if not config.exists():
        return None, f"BERTScore skipped: {config} not found; bertscore_model must be a local model directory"
    layers = json.loads(config.read_text()).get("num_hidden_layers")
    try:
        _, _, f1 = bert_score.score(list(predictions), [list(r) for r in references], model_type=str(model_path),
                                    num_layers=layers, lang=language)
    except Exception as e:  # noqa: BLE001 -- any failure of an optional metric becomes a note, not a crash
        return None, f"BERTScore skipped: {type(e).__name__}: {e}"
    return float(f1.mean()) * 100, None


def _validate(predictions: Sequence[str], references: Sequence[Sequence[str]], language: str,
              rouge_tokenizer: str) -> None:
    if language not in LANGUAGES:
        raise ValueError(f"language '{language}' is not supported; supported: {LANGUAGES}")
    if rouge_tokenizer not in ROUGE_TOKENIZERS:
        raise ValueError(f"rouge_tokenizer '{rouge_tokenizer}' is not one of {ROUGE_TOKENIZERS}")
    if len(predictions) == 0:
        raise ValueError("no predictions: metrics need at least one example")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; "
                         "references[i] must hold the references of predictions[i]")
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise ValueError(f"predictions[{i}] is a {type(prediction).__name__}, expected a string")
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string; pass a list of reference strings per example")
        if len(refs) == 0:
            raise ValueError(f"example {i} has no references")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must contain only strings")


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]], language: str = "en",
                    rouge_tokenizer: str | None = None, bertscore_model: str | None = None) -> dict[str, Any]:
    """Corpus ROUGE-1/2/L F1 and BLEU (all x 100), optionally BERTScore, with a record of the settings.

    Args:
        predictions: one generated summary per example.
        references: per example, one or more reference summaries.
        language: "en" or "ja"; picks default tokenisers.
        rouge_tokenizer: "default" (rouge-score's, English), "mecab" (fugashi/unidic-lite) or "char";
            default "default" for English and "mecab" for Japanese.
        bertscore_model: local model directory for BERTScore; None skips it.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``, ``bleu`` (floats, 0-100), ``num_examples``, ``settings`` (how every
        number was computed, for reports), ``notes`` (list of strings, e.g. why BERTScore was skipped), and
        ``bertscore_f1`` when it ran.

    Raises:
        ValueError: on no predictions, a length mismatch, an example without references, or bad options.

    Example:
        >>> m = compute_metrics(["the cat sat on the mat"], [["a cat sat on a mat", "the cat is on the mat"]])
        >>> round(m["rouge1"], 1), m["num_examples"]
        (83.3, 1)
    """
    rouge_tokenizer = rouge_tokenizer or ("mecab" if language == "ja" else "default")
    _validate(predictions, references, language, rouge_tokenizer)
    per_example = rouge_scores(predictions, references, rouge_tokenizer)
    bleu, bleu_settings = bleu_score(predictions, references, language)
    from importlib.metadata import version

    settings = {
        "language": language,
        "rouge": f"rouge-score {version('rouge-score')} RougeScorer({list(ROUGE_TYPES)}), F1",
        "rouge_tokenizer": {
            "default": "rouge-score default (lower-cased ASCII alphanumerics, Porter stemmer)",
            "mecab": "MeCab via fugashi + unidic-lite, surface forms, lower-cased, punctuation dropped",
            "char": "characters (letters and digits), lower-cased",
        }[rouge_tokenizer],
        "multi_reference": MULTI_REFERENCE_RULE,
        "scale": "x100; corpus score = mean over examples",
        "bleu": f"sacrebleu {version('sacrebleu')} corpus_bleu",
        **bleu_settings,
    }
    result: dict[str, Any] = {t: 100.0 * sum(v) / len(v) for t, v in per_example.items()}
    result.update(bleu=bleu, num_examples=len(predictions), settings=settings, notes=[])
    if bertscore_model is not None:
        f1, note = _bertscore(predictions, references, bertscore_model, language)
        if f1 is None:
            result["notes"].append(note)
        else:
            result["bertscore_f1"] = f1
            settings["bertscore"] = f"bert_score with {bertscore_model}, last layer, F1 (max over references)"
    return result
