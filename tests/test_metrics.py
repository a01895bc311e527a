"""Metrics against rouge-score and sacrebleu called directly, hand-checked Japanese, and bad input."""

import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lora_merge_jax.evaluation import metrics

WORDS = ("the model summarises long scientific papers into short texts while running quickly on small "
         "devices and larger clusters with adapters merged by learned coefficients").split()


def _sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(4, 14))
    return " ".join(words).capitalize() + rng.choice([".", "!", ""])


def _corpus(seed: int = 0, n: int = 20) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)], [_sentence(rng) for _ in range(n)]


def test_english_rouge_equals_rouge_score():
    predictions, references = _corpus()
    ours = metrics.compute_metrics(predictions, [[r] for r in references])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(predictions, references)]
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(d[rouge_type].fmeasure for d in direct) / len(direct)
        assert ours[rouge_type] == pytest.approx(expected, abs=1e-9)
        assert 0 < ours[rouge_type] < 100
    assert ours["num_examples"] == 20
    assert "max" in ours["settings"]["multi_reference"]


def test_bleu_equals_sacrebleu_single_and_multi_reference():
    predictions, references = _corpus(seed=1)
    _, second = _corpus(seed=2)
    single = metrics.compute_metrics(predictions, [[r] for r in references])
    assert single["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-9)
    # Multi-reference with a varying count: example i has two references when i is even, one otherwise.
    refs = [[r, s] if i % 2 == 0 else [r] for i, (r, s) in enumerate(zip(references, second))]
    streams = [references, [s if i % 2 == 0 else None for i, s in enumerate(second)]]
    multi = metrics.compute_metrics(predictions, refs)
    assert multi["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score, abs=1e-9)
    assert multi["bleu"] > single["bleu"]


def test_rouge_takes_the_best_reference_per_example():
    prediction = "adapters merged by learned coefficients"
    bad, good = "the model runs on small devices", "adapters merged with learned coefficients"
    alone_bad = metrics.compute_metrics([prediction], [[bad]])
    alone_good = metrics.compute_metrics([prediction], [[good]])
    both = metrics.compute_metrics([prediction], [[bad, good]])
    for rouge_type in ("rouge1", "rouge2", "rougeL"):
        assert both[rouge_type] == alone_good[rouge_type] > alone_bad[rouge_type]
    # rouge1: 4 of 5 unigrams shared (adapters merged learned coefficients) -> F1 = 4/5.
    assert both["rouge1"] == pytest.approx(80.0)


def test_japanese_hand_checked():
    # MeCab (unidic-lite): 猫/が/魚/を/食べ/た vs 猫/は/魚/を/食べ/た; the final 。 is dropped as punctuation.
    #   rouge1: 5 of 6 tokens shared -> P = R = F = 5/6 = 83.33
    #   rouge2: bigrams 魚を, を食べ, 食べた shared, 3 of 5 -> 60.00
    #   rougeL: LCS 猫 魚 を 食べ た = 5 -> 83.33
    #   BLEU (fugashi segmentation, 。 kept, 7 tokens each, BP = 1): n-gram precisions 6/7, 4/6, 3/5, 2/4
    #        (shared: 猫 魚 を 食べ た 。 | 魚を を食べ 食べた た。 | 魚を食べ を食べた 食べた。 | 魚を食べた を食べた。)
    #        -> (6/7 * 4/6 * 3/5 * 2/4) ** (1/4) = 0.6435 -> 64.35
    m = metrics.compute_metrics(["猫が魚を食べた。"], [["猫は魚を食べた。"]], language="ja")
    assert m["rouge1"] == pytest.approx(500 / 6)
    assert m["rouge2"] == pytest.approx(60.0)
    assert m["rougeL"] == pytest.approx(500 / 6)
    assert m["bleu"] == pytest.approx(100 * (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25, abs=1e-6)
    assert "MeCab" in m["settings"]["rouge_tokenizer"]
    # Characters: 猫が魚を食べた vs 猫は魚を食べた share 6 of 7 characters -> 85.71; bigrams 4 of 6 -> 66.67.
    c = metrics.compute_metrics(["猫が魚を食べた。"], [["猫は魚を食べた。"]], language="ja", rouge_tokenizer="char")
    assert c["rouge1"] == pytest.approx(600 / 7)
    assert c["rouge2"] == pytest.approx(400 / 6)
    # rouge-score's own tokenizer drops non-ASCII text entirely: why the Japanese default is MeCab.
    d = metrics.compute_metrics(["猫が魚を食べた。"], [["猫は魚を食べた。"]], language="ja", rouge_tokenizer="default")
    assert d["rouge1"] == 0.0


def test_bertscore_missing_is_a_note_not_a_crash(tmp_path):
    m = metrics.compute_metrics(["a b c"], [["a b d"]], bertscore_model=str(tmp_path / "missing"))
    assert "bertscore_f1" not in m
    assert len(m["notes"]) == 1 and m["notes"][0].startswith("BERTScore skipped")


@pytest.mark.parametrize("predictions, references, message", [
    ([], [], "no predictions"),
    (["a", "b"], [["a"]], "2 predictions but 1 reference lists"),
    (["a", "b"], [["a"], []], "example 1 has no references"),
    (["a"], ["a"], "references[0] is a string"),
    ([None], [["a"]], "predictions[0] is a NoneType"),
])
def test_bad_input_raises(predictions, references, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        metrics.compute_metrics(predictions, references)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="language 'fr'"):
        metrics.compute_metrics(["a"], [["a"]], language="fr")
    with pytest.raises(ValueError, match="rouge_tokenizer 'spaces'"):
        metrics.compute_metrics(["a"], [["a"]], rouge_tokenizer="spaces")
