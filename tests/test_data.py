"""The data pipeline: masking, truncation, bucketing, shuffling, resumable iteration, presets, bad inputs."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from lora_merge_jax import config, tiny
from lora_merge_jax.data import batching, prompts
from lora_merge_jax.data import records as data
from lora_merge_jax.data.batching import TrainIterator
from lora_merge_jax.data.prompts import TokenizedExample
from lora_merge_jax.data.records import DataConfig
from tests.conftest import SHARED_DATA

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "data")
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def char_tok():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def byte_tok():
    """One token per UTF-8 byte, so Japanese text tokenises too."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *alphabet])},
                                   merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ masking


def test_target_mask_marks_exactly_target_and_eos(char_tok):
    cfg = DataConfig(prompt_template="S: {input} => ", max_length=64, max_target_length=16)
    ids, mask = prompts.tokenize_example(char_tok, "  ab \r\n", "cd", cfg)
    prompt = ids_of(char_tok, "S: ab => ")  # input stripped, template spaces kept, no BOS from this tokenizer
    np.testing.assert_array_equal(ids, prompt + ids_of(char_tok, "cd") + [EOS])
    np.testing.assert_array_equal(mask, [0] * len(prompt) + [1, 1, 1])
    assert ids.dtype == mask.dtype == np.int32


def test_bos_is_added_when_the_tokenizer_adds_one(char_tok):
    tok = tiny.build_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    cfg = DataConfig(prompt_template="{input}=", max_length=64, max_target_length=16)
    ids, mask = prompts.tokenize_example(tok, "ab", "c", cfg)
    np.testing.assert_array_equal(ids, [BOS, *ids_of(char_tok, "ab="), *ids_of(char_tok, "c"), EOS])
    np.testing.assert_array_equal(mask, [0, 0, 0, 0, 1, 1])


def test_loss_counts_target_tokens_only(char_tok):
    from lora_merge_jax.models import losses

    cfg = DataConfig(prompt_template="{input}:", max_length=32, max_target_length=8, batch_size=2)
    examples = [prompts.tokenize_example(char_tok, doc, summ, cfg) for doc, summ in [("abc", "x"), ("a", "yz")]]
    batch = next(TrainIterator(examples, cfg, PAD))
    logits = np.zeros((*batch["input_ids"].shape, 128), np.float32)
    _, count = losses.token_nll(logits, batch["input_ids"], batch["target_mask"])
    assert int(count) == (1 + 1) + (2 + 1)  # target tokens plus EOS, padding and prompt excluded


def test_chat_template(char_tok):
    tok = tiny.build_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
    cfg = DataConfig(prompt_template="S: {input} => ", use_chat_template=True, max_length=64, max_target_length=16)
    ids, mask = prompts.tokenize_example(tok, "ab", "cd", cfg)
    rendered = tok.apply_chat_template([{"role": "user", "content": "S: ab => "},
                                        {"role": "assistant", "content": "cd"}], tokenize=False)
    assert rendered == "<s>[user]S: ab =>[assistant]cd</s>"
    np.testing.assert_array_equal(ids, ids_of(tok, rendered))
    np.testing.assert_array_equal(mask, [0] * (len(ids) - 3) + [1, 1, 1])
    with pytest.raises(ValueError, match="no chat template"):
        prompts.tokenize_example(char_tok, "ab", "cd", cfg)


# --------------------------------------------------------------------------------------------- truncation


def test_overlong_input_is_truncated_counted_and_target_kept(char_tok):
    cfg = DataConfig(prompt_template="<{input}>", max_length=20, max_target_length=8)
    stats = prompts.DataStats("train")
    ids, mask = prompts.tokenize_example(char_tok, "abcdefghijklmnopqrstuvwxyz", "SUMMARY", cfg, stats=stats)
    assert len(ids) == 20
    assert char_tok.decode(ids[mask == 1]) == "SUMMARY</s>"
    assert char_tok.decode(ids[mask == 0]) == "<abcdefghij>"  # the input lost its end, the template stayed
    assert (stats.inputs_truncated, stats.input_tokens_dropped, stats.targets_truncated) == (1, 16, 0)

    ids, mask = prompts.tokenize_example(char_tok, "ab", "0123456789AB", cfg, stats=stats)
    assert char_tok.decode(ids[mask == 1]) == "01234567</s>" and stats.targets_truncated == 1

    skip = DataConfig(prompt_template="<{input}>", max_length=20, max_target_length=8, on_overlong="skip")
    assert prompts.tokenize_example(char_tok, "x" * 30, "y", skip, stats=stats) is None
    assert stats.skipped_overlong == 1


# ------------------------------------------------------------------------------------------------ batching


def fake_examples(lengths):
    return [TokenizedExample(np.arange(10, 10 + n, dtype=np.int32), (np.arange(n) >= n // 2).astype(np.int32))
            for n in lengths]


def test_bucket_padding():
    assert [batching.bucket_length(n, (8, 16), 32) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    cfg = DataConfig(max_length=32, max_target_length=4, length_buckets=(8, 16), batch_size=2)
    examples = fake_examples([5, 7, 9, 3, 20, 30])
    it = TrainIterator(examples, cfg, pad_id=PAD, num_epochs=1)
    for step, batch in enumerate(it):
        rows = it.epoch_order(0)[2 * step:2 * step + 2]
        longest = max(len(examples[i].input_ids) for i in rows)
        assert batch["input_ids"].shape == (2, batching.bucket_length(longest, (8, 16), 32))
        for row, i in enumerate(rows):
            n = len(examples[i].input_ids)
            np.testing.assert_array_equal(batch["input_ids"][row, :n], examples[i].input_ids)
            np.testing.assert_array_equal(batch["target_mask"][row, :n], examples[i].target_mask)
            assert (batch["input_ids"][row, n:] == PAD).all() and not batch["target_mask"][row, n:].any()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert step == 2


def epoch_rows(seed, epoch, n=20):
    cfg = DataConfig(max_length=64, max_target_length=4, batch_size=4, shuffle_seed=seed)
    return TrainIterator(fake_examples([3] * n), cfg, PAD).epoch_order(epoch).tolist()


def test_shuffling_is_deterministic():
    assert epoch_rows(0, 0) == epoch_rows(0, 0) == np.random.default_rng([0, 0]).permutation(20).tolist()
    assert epoch_rows(0, 0) != epoch_rows(1, 0)
    assert epoch_rows(0, 0) != epoch_rows(0, 1)
    assert sorted(epoch_rows(0, 1)) == list(range(20))


def test_iterator_state_round_trip():
    cfg = DataConfig(max_length=64, max_target_length=4, length_buckets=(8, 16, 32), batch_size=4)
    examples = fake_examples(np.random.default_rng(0).integers(2, 40, size=22))  # 5 batches/epoch, 2 dropped
    it = TrainIterator(examples, cfg, PAD)
    for _ in range(7):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state()))  # plain ints, checkpoint-ready
    assert (state["epoch"], state["batch_index"]) == (1, 2)
    expected = [next(it) for _ in range(6)]
    resumed = TrainIterator(examples, cfg, PAD)
    resumed.restore(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(ValueError, match="shuffle_seed=0, this iterator has 5"):
        TrainIterator(examples, DataConfig(max_length=64, max_target_length=4, batch_size=4, shuffle_seed=5),
                      PAD).restore(state)


def test_hosts_read_disjoint_slices_of_the_global_batch():
    cfg = DataConfig(max_length=64, max_target_length=4, batch_size=4, length_buckets=(8, 16))
    examples = fake_examples(np.random.default_rng(1).integers(2, 40, size=12))
    whole = TrainIterator(examples, cfg, PAD)
    hosts = [TrainIterator(examples, cfg, PAD, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        want, parts = next(whole), [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([p["input_ids"] for p in parts]), want["input_ids"])
    with pytest.raises(ValueError, match="divisible by process_count"):
        TrainIterator(examples, cfg, PAD, process_count=3)


# ------------------------------------------------------------------------------------------- real data

# The real data sets live in ../shared/data (present in CI, not shipped with the project). Without them these
# tests skip; the small-file tests below still run every preset's parsing on files of the same schemas.
requires_shared_data = pytest.mark.skipif(
    not os.path.isdir(SHARED_DATA),
    reason=f"needs {os.path.normpath(SHARED_DATA)} (the real summarisation data, present in CI; see "
           "configs/data/*.yaml for where to get each set); the preset parsing is also tested on small files")

PRESETS = {  # preset: (train records, eval records)
    "scitldr": (1992, 619), "xscitldr_ja": (1607, 200), "xscitldr_en_ja": (1607, 200), "mts_dialog": (1201, 100)}


@requires_shared_data
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_and_batch(preset, byte_tok):
    path = os.path.join(CONFIGS, f"{preset}.yaml")
    assert config.load_config(DataConfig, path).data_dir == "data"
    cfg = config.load_config(DataConfig, path, [f"data_dir={os.path.abspath(SHARED_DATA)}", "max_examples=12",
                                                "max_eval_examples=6", "batch_size=4"])
    train, train_stats = prompts.build_train_examples(cfg, byte_tok)
    evals, eval_stats = prompts.build_eval_examples(cfg, byte_tok)
    assert (train_stats.records_read, eval_stats.records_read) == PRESETS[preset]
    assert len(train) == 12 and len(evals) == 6
    batch = next(TrainIterator(train, cfg, prompts.pad_token_id(byte_tok)))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in (*cfg.length_buckets, cfg.max_length)
    assert (batch["target_mask"].sum(axis=1) > 1).all()
    first = data.read_records(cfg, "eval")[0]
    prompt = byte_tok.decode(evals[0].prompt_ids)
    assert first.input[:40] in prompt and evals[0].references == first.targets
    if preset == "xscitldr_ja":  # the input is line 0 of val.target: Japanese
        with open(os.path.join(SHARED_DATA, "xscitldr_ja", "val.target"), encoding="utf-8") as f:
            assert prompt.count(f.readline().strip()[:30]) == 1
    if preset == "scitldr":
        assert max(len(e.references) for e in evals) > 1  # dev has several TLDRs per paper
    if preset == "mts_dialog":
        assert f"Write the {data.read_records(cfg, 'eval')[0].fields['section_header']} section" in prompt


@requires_shared_data
def test_multiline_csv_parses(byte_tok):
    for name, field, count in [("mts_dialog/MTS-Dialog-TrainingSet.csv", "dialogue", 1201),
                               ("aci_bench/train.csv", "dialogue", 67)]:
        cfg = DataConfig(data_dir=os.path.abspath(SHARED_DATA), train_file=name, input_field=field,
                         target_field="section_text" if "mts" in name else "note")
        records = data.read_records(cfg, "train")
        with open(os.path.join(SHARED_DATA, name), encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(records) == count == len(rows)
        assert records[-1].input == data.normalise_text(rows[-1][field]) and "\n" in records[0].input
        assert "\r" not in records[0].input


# ------------------------------------------------------------------ presets on small files of the real schemas
# Files written here in each real data set's layout (../shared/data/README.md), read through the real presets.

_SCITLDR_TRAIN = [  # SciTLDR: source a list of sentences, target a list (1 summary in train, 1-4 in dev)
    {"source": ["We study adaptive merging of LoRA adapters.", "It learns one coefficient per task and layer."],
     "source_labels": [0, 1], "rouge_scores": [0.31], "paper_id": "abc123",
     "target": ["Adaptive LoRA merging with learned coefficients."], "title": "Adaptive merging"},
    {"source": ["Pruning removes half of the merged factors.", "Quality stays the same.", "Code is released."],
     "source_labels": [1, 0, 0], "rouge_scores": [0.4, 0.1, 0.05], "paper_id": "def456",
     "target": ["Half the merged factors can be pruned."], "title": "Pruning merged adapters"},
    {"source": ["  Leading and trailing spaces are stripped.  ", "Sentences join with one space."],
     "source_labels": [0, 0], "rouge_scores": [], "paper_id": "ghi789",
     "target": ["Whitespace is normalised."], "title": "Normalisation"},
]
_SCITLDR_DEV = [
    {"source": ["A dev abstract in two sentences.", "The second sentence."], "source_labels": [1, 0],
     "rouge_scores": [0.5, 0.2], "paper_id": "dev1",
     "target": ["First reference TLDR.", "Second reference TLDR.", "Third reference TLDR."], "title": "Dev one"},
    {"source": ["Another dev abstract."], "source_labels": [1], "rouge_scores": [0.7], "paper_id": "dev2",
     "target": ["Only one reference."], "title": "Dev two"},
]
# X-SciTLDR ja: {split}.jsonl {"source": English abstract, "target": [Japanese TLDR]}; line i of {split}.source
# is record i's English abstract, of {split}.target its Japanese translation. Rows: (English, TLDR, Japanese).
_XSCITLDR = {
    "train": [("We merge adapters adaptively.", "アダプタを適応的に統合する。", "アダプタを適応的に統合する手法。"),
              ("Pruning keeps quality.", "枝刈りしても品質は保たれる。", "統合した因子の半分を枝刈りする。"),
              ("Tiny models train fast.", "小さなモデルは速く学習する。", "小さなモデルで実験を行う。")],
    "eval": [("A validation abstract.", "検証用の要約。", "検証用の論文要旨である。"),
             ("Second validation abstract.", "二つ目の要約。", "二つ目の論文要旨である。")],
}
_MTS_ROWS = {  # MTS-Dialog: ID, section_header, section_text (the summary), dialogue (the input)
    "train": [("0", "GENHX", 'The patient is a 26-year-old female, referred for "low back" pain.',
               ["Doctor: When did your pain begin? ", "Patient: About eight years ago, after a fall.",
                "Doctor: Any injury? ", " Patient: Yes, I fell in an A B C store."]),
              ("1", "FAM/SOCHX", "Father: hypertension.\nMother: diabetes, type 2.",
               ["Doctor: Any family history?", "Patient: My dad has high blood pressure, my mom diabetes."]),
              ("2", "ROS", "None", ["Doctor: Any chest pain?", "Patient: No."])],
    "eval": [("0", "ASSESSMENT", "Low back pain, improving.",
              ["Doctor: How is the pain today?", 'Patient: Better, thanks, "much" better.']),
             ("1", "PLAN", "Continue physical therapy,\ntwice a week.",
              ["Doctor: Keep up the exercises.", "Patient: Okay."])],
}


def _jsonl(rows):
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)  # no final newline, as the real files


def _csv_field(text):
    return '"' + text.replace('"', '""') + '"'


def _write_preset_files(preset, cfg, root):
    """Small files of the preset's real schema at the preset's file names under ``root``; returns, per split,
    the expected (input, targets, prompt fields) of each record."""
    files = {}
    if preset == "scitldr":
        files[cfg.train_file], files[cfg.eval_file] = _jsonl(_SCITLDR_TRAIN), _jsonl(_SCITLDR_DEV)
        expected = {split: [(" ".join(s.strip() for s in r["source"]), tuple(r["target"]), {}) for r in rows]
                    for split, rows in (("train", _SCITLDR_TRAIN), ("eval", _SCITLDR_DEV))}
    elif preset in ("xscitldr_ja", "xscitldr_en_ja"):
        expected = {}
        for split, jsonl_file in (("train", cfg.train_file), ("eval", cfg.eval_file)):
            rows, stem = _XSCITLDR[split], jsonl_file.removesuffix(".jsonl")
            files[jsonl_file] = _jsonl([{"source": en, "target": [tldr]} for en, tldr, _ in rows])
            files[stem + ".source"] = "\n".join(en for en, _, _ in rows)  # no final newline, as the real files
            files[stem + ".target"] = "\n".join(ja for _, _, ja in rows) + "\n"
            japanese_input = preset == "xscitldr_ja"
            expected[split] = [(ja if japanese_input else en, (tldr,), {}) for en, tldr, ja in rows]
        if preset == "xscitldr_ja":  # the inputs come from the .target files written above
            assert (cfg.input_field, cfg.train_input_lines_file, cfg.eval_input_lines_file) == (
                None, "xscitldr_ja/train.target", "xscitldr_ja/val.target")
        assert (cfg.train_file, cfg.eval_file) == ("xscitldr_ja/train.jsonl", "xscitldr_ja/val.jsonl")
    else:  # mts_dialog: CRLF row ends; CRLF inside the training set's dialogues, LF inside validation's
        expected = {}
        for split, name, eol, final in (("train", cfg.train_file, "\r\n", "\r\n"),
                                        ("eval", cfg.eval_file, "\n", "")):  # validation: no final newline
            lines = ["ID,section_header,section_text,dialogue"]
            lines += [",".join([i, header, _csv_field(text), _csv_field(eol.join(turns))])
                      for i, header, text, turns in _MTS_ROWS[split]]
            files[name] = "\r\n".join(lines) + final
            expected[split] = [("\n".join(turns).strip(), (text,), {"section_header": header})
                               for _, header, text, turns in _MTS_ROWS[split]]
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return expected


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_parse_small_files_of_the_real_schemas(preset, byte_tok, tmp_path):
    """Each preset on its data set's schema: record count, the joined input, every reference kept for
    evaluation, the first target trained on, prompt fields, multi-line CSV fields intact; then a batch."""
    path = os.path.join(CONFIGS, f"{preset}.yaml")
    cfg = config.load_config(DataConfig, path, [f"data_dir={tmp_path}", "batch_size=2"])
    expected = _write_preset_files(preset, cfg, tmp_path)
    for split in ("train", "eval"):
        records = data.read_records(cfg, split)
        assert [(r.input, r.targets, dict(r.fields)) for r in records] == expected[split], split

    train, train_stats = prompts.build_train_examples(cfg, byte_tok)  # no max_examples: file order
    evals, eval_stats = prompts.build_eval_examples(cfg, byte_tok)
    assert (train_stats.records_read, eval_stats.records_read) == (len(expected["train"]), len(expected["eval"]))
    assert len(train) == len(expected["train"]) and len(evals) == len(expected["eval"])
    assert train_stats.inputs_truncated == eval_stats.inputs_truncated == train_stats.targets_truncated == 0
    for example, (text, targets, fields) in zip(train, expected["train"]):
        prompt = cfg.prompt_template.format(input=text, **fields)
        assert byte_tok.decode(example.input_ids[example.target_mask == 0]) == prompt
        assert byte_tok.decode(example.input_ids[example.target_mask == 1]) == targets[0] + "</s>"
    for example, (text, targets, fields) in zip(evals, expected["eval"]):
        assert byte_tok.decode(example.prompt_ids) == cfg.prompt_template.format(input=text, **fields)
        assert example.references == targets  # all of them: scitldr's first dev record has 3
    if preset == "scitldr":
        assert max(len(e.references) for e in evals) == 3
    if preset == "mts_dialog":  # a quoted field spanning lines, CRLF read as LF; "None" stays text
        records = data.read_records(cfg, "train")
        assert records[0].input.count("\n") == 3 and "\r" not in records[0].input
        assert records[1].targets == ("Father: hypertension.\nMother: diabetes, type 2.",)
        assert records[2].targets == ("None",)
    if preset == "xscitldr_ja":  # the input is the Japanese abstract, not the English source
        assert byte_tok.decode(evals[0].prompt_ids).count(_XSCITLDR["eval"][0][0]) == 0

    it = TrainIterator(train, cfg, prompts.pad_token_id(byte_tok))
    batch, rows = next(it), it.epoch_order(0)[:2]
    longest = max(len(train[i].input_ids) for i in rows)
    assert batch["input_ids"].shape == (2, batching.bucket_length(longest, cfg.length_buckets, cfg.max_length))
    for row, i in enumerate(rows):
        np.testing.assert_array_equal(batch["input_ids"][row, :len(train[i].input_ids)], train[i].input_ids)
        np.testing.assert_array_equal(batch["target_mask"][row, :len(train[i].input_ids)], train[i].target_mask)


def test_subsets_are_nested_and_seeded(tmp_path, char_tok):
    tiny.make_tiny_task(tmp_path, train_size=40, dev_size=4)

    def subset(n, seed):
        cfg = DataConfig(data_dir=str(tmp_path), train_file="train.jsonl", prompt_template="{input}=",
                         max_length=64, max_target_length=40, max_examples=n, subset_seed=seed)
        return [e.input_ids.tolist() for e in prompts.build_train_examples(cfg, char_tok)[0]]

    assert subset(10, 0) == subset(20, 0)[:10]
    assert subset(10, 0) != subset(10, 1)


# ------------------------------------------------------------------------------------------- bad inputs


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return DataConfig(data_dir=str(tmp_path), train_file=name, max_length=32, max_target_length=8)


GOOD = '{"document": "abc", "summary": "c"}\n'


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", GOOD + '{"document": "x", "summary": }\n', r"bad\.jsonl:2: malformed JSON line"),
    ("field.jsonl", GOOD * 2 + '{"document": "x"}\n', r"field\.jsonl:3 \(record 2\): no field 'summary'"),
    ("empty.jsonl", "\n  \n", r"empty\.jsonl: file is empty"),
    ("blank.jsonl", GOOD + '{"document": "x", "summary": "  "}\n', r"blank\.jsonl:2: empty target"),
    ("latin.jsonl", GOOD.encode() + b'{"document": "caf\xe9", "summary": "x"}\n', r"latin\.jsonl:2: not valid UTF-8"),
    ("cols.csv", "document,abstract\nabc,c\n", r"cols\.csv:1: no column 'summary'"),
    ("multi.csv", 'document,summary\n"a\nb\nc",ok\n"d\ne", \n', r"multi\.csv:5: empty target"),
    ("ragged.csv", "document,summary\nabc,c,extra\n", r"ragged\.csv:2: record has 3 fields"),
])
def test_bad_files_name_file_and_line(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        data.read_records(write(tmp_path, name, content), "train")


def test_overlong_error_names_the_record(tmp_path, char_tok):
    cfg = write(tmp_path, "long.jsonl", GOOD + json.dumps({"document": "x" * 50, "summary": "y"}) + "\n")
    cfg = dataclasses.replace(cfg, on_overlong="error", prompt_template="{input}=")
    with pytest.raises(ValueError, match=r"long\.jsonl:2: example is 53 tokens, over max_length=32"):
        prompts.build_train_examples(cfg, char_tok)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown placeholder \{title\}"):
        DataConfig(prompt_template="{title}: {input}")
    with pytest.raises(ValueError, match=r"bogus"):
        config.from_dict(DataConfig, {"bogus": 1})
    with pytest.raises(ValueError, match="on_overlong must be one of"):
        DataConfig(on_overlong="drop")
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        data.read_records(DataConfig(data_dir=str(tmp_path), train_file="nothere.jsonl"), "train")
    cfg = write(tmp_path, "recs.jsonl", GOOD * 3)
    (tmp_path / "lines.txt").write_text("one\ntwo\n\n")
    cfg = dataclasses.replace(cfg, input_field=None, train_input_lines_file="lines.txt")
    with pytest.raises(ValueError, match=r"lines\.txt: 2 lines, but .*recs\.jsonl has 3 records"):
        data.read_records(cfg, "train")


def test_parquet_json_array_and_hub(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"document": ["a b", "c"], "summary": [["x", "y"], ["z"]]}), tmp_path / "t.parquet")
    (tmp_path / "t.json").write_text(json.dumps([{"document": "a", "summary": "b"}, {"document": "c"}], indent=1))
    records = data.read_records(DataConfig(data_dir=str(tmp_path), train_file="t.parquet"), "train")
    assert [(r.input, r.targets) for r in records] == [("a b", ("x", "y")), ("c", ("z",))]
    with pytest.raises(ValueError, match=r"t\.json: record 1: no field 'summary'"):
        data.read_records(DataConfig(data_dir=str(tmp_path), train_file="t.json"), "train")

    def fake_load_dataset(name, config, split):
        assert (name, config, split) == ("org/set", "Abstract", "validation")
        return datasets.Dataset.from_dict({"source": [["s1.", "s2."]], "target": [["t1", ""]]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(hub_name="org/set", hub_config="Abstract", input_field="source", target_field="target")
    with pytest.raises(ValueError, match=r"org/set\[validation\] row 0: empty target"):
        data.read_records(cfg, "eval")
