"""Text classification data: loading CSV/JSONL, splits, token ids, bucketed batches, padding."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fromzero.data.classification import (
    EncodedClassificationSet,
    LengthBucketSampler,
    collate_padded,
    encode_texts,
    label_names,
    load_text_classification,
)
from fromzero.errors import FromzeroError

# --- helpers ---------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[tuple], header: str = "text,label", bom: bool = False) -> Path:
    def cell(c) -> str:
        return f'"{c}"' if isinstance(c, str) else str(c)

    lines = [header] + [",".join(cell(c) for c in r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, objs: list, blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(json.dumps(o) for o in objs) + "\n", encoding="utf-8")
    return path


def rows_for(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"text {label} number {i}", label) for label, n in counts.items() for i in range(n)]


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing

    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", ".", "##s"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(FromzeroError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading ---------------------------------------------------------------------------------


def test_csv_with_bom_and_int_labels(tmp_path):
    rows = rows_for({"0": 20, "1": 20})
    path = write_csv(tmp_path / "d.csv", [(t, int(l)) for t, l in rows], bom=True)
    splits = load_text_classification(str(path))
    assert set(splits) == {"train", "val", "test"}
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(rows)
    assert len(splits["test"]) == 4 and len(splits["val"]) == 4
    assert all(isinstance(l, str) for s in splits.values() for _, l in s)


def test_jsonl_columns_blank_lines_and_unicode(tmp_path):
    objs = [{"sentence": f"caf\u00e9 \u2028 {i}", "y": i % 3, "extra": 1} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", objs, blank_lines=True)
    splits = load_text_classification(str(path), text_column="sentence", label_column="y")
    every = splits["train"] + splits["val"] + splits["test"]
    assert sorted(every) == sorted((o["sentence"], str(o["y"])) for o in objs)
    for split in splits.values():
        assert {l for _, l in split} == {"0", "1", "2"}  # stratified


def test_carve_out_is_stratified_and_deterministic(tmp_path):
    rows = rows_for({"big": 80, "mid": 15, "tiny": 5})
    path = write_csv(tmp_path / "d.csv", rows)
    a = load_text_classification(str(path), val_fraction=0.2, test_fraction=0.2, seed=3)
    b = load_text_classification(str(path), val_fraction=0.2, test_fraction=0.2, seed=3)
    c = load_text_classification(str(path), val_fraction=0.2, test_fraction=0.2, seed=4)
    assert a == b and a != c
    assert len(a["test"]) == 20 and len(a["val"]) == 20
    for split in ("train", "val", "test"):
        counts = Counter(l for _, l in a[split])
        assert set(counts) == {"big", "mid", "tiny"}
        assert counts["big"] > counts["mid"] >= counts["tiny"]


def test_class_too_small_to_stratify_stays_in_train(tmp_path):
    rows = rows_for({"a": 30, "b": 30, "rare": 1})
    path = write_csv(tmp_path / "d.csv", rows)
    for seed in range(5):
        splits = load_text_classification(str(path), seed=seed)
        assert "rare" in {l for _, l in splits["train"]}
        assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(rows)


def test_directory_with_all_splits_is_used_as_is(tmp_path):
    train, val = rows_for({"x": 5, "y": 5}), [("v one", "y")]
    test = [("t one", "x"), ("t two", "y")]
    write_csv(tmp_path / "train.csv", train)
    write_jsonl(tmp_path / "val.jsonl", [{"text": t, "label": l} for t, l in val])
    write_csv(tmp_path / "test.csv", test)
    splits = load_text_classification(str(tmp_path))
    assert splits == {"train": train, "val": val, "test": test}


def test_directory_missing_val_carves_it_from_train(tmp_path):
    train = rows_for({"x": 20, "y": 20})
    write_csv(tmp_path / "train.csv", train)
    write_csv(tmp_path / "test.csv", [("t", "x")])
    splits = load_text_classification(str(tmp_path), val_fraction=0.25)
    assert splits["test"] == [("t", "x")]
    assert len(splits["val"]) == 10
    assert sorted(splits["train"] + splits["val"]) == sorted(train)


def test_label_names_sorting():
    assert label_names([("a", "10"), ("b", "2"), ("c", "2"), ("d", "-1")]) == ["-1", "2", "10"]
    assert label_names([("a", "neg"), ("b", "pos"), ("c", "10")]) == ["10", "neg", "pos"]


# --- loading errors --------------------------------------------------------------------------


def test_not_found_and_unsupported(tmp_path):
    assert "not found" in error_of(load_text_classification, str(tmp_path / "nope.csv"))
    assert "not found" in error_of(load_text_classification, str(tmp_path / "nowhere"))
    (tmp_path / "d.txt").write_text("hello\n")
    msg = error_of(load_text_classification, str(tmp_path / "d.txt"))
    assert "d.txt" in msg and "unsupported" in msg
    (tmp_path / "empty").mkdir()
    assert "train" in error_of(load_text_classification, str(tmp_path / "empty"))


def test_missing_column_suggests_closest(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("hi", "a"), ("yo", "b")], header="text,labels")
    msg = error_of(load_text_classification, str(path))
    assert "d.csv" in msg and "'label'" in msg and "'labels'" in msg and "did you mean" in msg
    path = write_jsonl(tmp_path / "d.jsonl", [{"txt": "hi", "label": "a"}])
    msg = error_of(load_text_classification, str(path))
    assert "d.jsonl:1" in msg and "'text'" in msg and "'txt'" in msg


@pytest.mark.parametrize("line, words", [
    ('{"text": "a", "label": ', ["invalid JSON", "line 3"]),
    ('["a", "b"]', ["d.jsonl:3", "object"]),
    ('{"text": "a", "label": true}', ["d.jsonl:3", "label"]),
    ('{"text": "a", "label": null}', ["d.jsonl:3", "label"]),
    ('{"text": "   ", "label": "x"}', ["d.jsonl:3", "text"]),
    ('{"text": 5, "label": "x"}', ["d.jsonl:3", "text"]),
])
def test_bad_jsonl_rows(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n' + line + "\n")
    msg = error_of(load_text_classification, str(path))
    assert "d.jsonl" in msg
    for word in words:
        assert word in msg


def test_bad_csv_rows(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x"), ("  ", "y")])
    assert "d.csv:3" in error_of(load_text_classification, str(path))
    path = write_csv(tmp_path / "e.csv", [("a", "x"), ("b", "")])
    assert "e.csv:3" in error_of(load_text_classification, str(path))


def test_single_class_and_empty_file(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows_for({"only": 10}))
    msg = error_of(load_text_classification, str(path))
    assert "d.csv" in msg and "single class 'only'" in msg and "at least 2" in msg
    path = write_csv(tmp_path / "e.csv", [])
    assert "e.csv" in error_of(load_text_classification, str(path))


def test_label_unknown_to_train(tmp_path):
    write_csv(tmp_path / "train.csv", rows_for({"x": 5, "y": 5}))
    write_csv(tmp_path / "val.csv", [("v", "x")])
    write_csv(tmp_path / "test.csv", [("t", "x"), ("u", "zebra")])
    msg = error_of(load_text_classification, str(tmp_path))
    assert "test.csv" in msg and "'zebra'" in msg


def test_empty_split(tmp_path):
    write_csv(tmp_path / "train.csv", rows_for({"x": 5, "y": 5}))
    write_csv(tmp_path / "val.csv", [])
    assert "val.csv" in error_of(load_text_classification, str(tmp_path))
    path = write_csv(tmp_path / "tiny.csv", [("a", "x"), ("b", "y"), ("c", "y")])
    assert "tiny.csv" in error_of(load_text_classification, str(path))  # nothing left to carve


# --- token ids -------------------------------------------------------------------------------


def test_encode_truncates_keeping_sep_and_counts():
    tok = tiny_tokenizer()
    tok.enable_truncation(max_length=100)
    texts = ["the cat sat", "the cat sat on the mat", "a dog", "the dogs ran on a mat ."]
    ids, n_cut = encode_texts(tok, texts, max_length=5)
    assert n_cut == 2
    assert [len(a) for a in ids] == [5, 5, 4, 5]
    assert all(a.dtype == np.int64 and a[0] == 2 and a[-1] == 3 for a in ids)
    assert ids[0].tolist() == [2, 4, 5, 6, 3]
    assert ids[1].tolist() == [2, 4, 5, 6, 3]  # "the cat sat" + [SEP]
    assert tok.truncation["max_length"] == 100  # caller's settings restored
    ids, n_cut = encode_texts(tok, texts, max_length=50)
    assert n_cut == 0 and [len(a) for a in ids] == [5, 8, 4, 10]
    with pytest.raises(FromzeroError):
        encode_texts(tok, texts, max_length=1)


def test_encode_ignores_and_restores_the_callers_settings():
    tok = tiny_tokenizer()
    tok.enable_padding(pad_id=0, length=12)
    ids, n_cut = encode_texts(tok, ["the cat sat on the mat", "a dog"], max_length=6)
    assert [a.tolist() for a in ids] == [[2, 4, 5, 6, 7, 3], [2, 9, 10, 3]] and n_cut == 1
    assert tok.truncation is None and tok.padding["length"] == 12
    assert len(tok.encode("a dog").ids) == 12


# --- sampler ---------------------------------------------------------------------------------


def test_sampler_covers_every_index_and_buckets_by_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(1000)]
    sampler = LengthBucketSampler(lengths, batch_size=16, shuffle=True, seed=1,
                                  bucket_size_multiplier=10)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 63
    assert sorted(i for b in batches for i in b) == list(range(1000))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    order = list(range(1000))
    rng.shuffle(order)
    random_batches = [order[i:i + 16] for i in range(0, 1000, 16)]
    random_spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b)
                             for b in random_batches])
    assert spread < random_spread / 5


def test_sampler_epochs_are_deterministic_and_differ():
    lengths = list(range(100))
    a = LengthBucketSampler(lengths, batch_size=8, shuffle=True, seed=7)
    b = LengthBucketSampler(lengths, batch_size=8, shuffle=True, seed=7)
    first = list(a)
    assert first == list(b) == list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(LengthBucketSampler(lengths, 8, shuffle=True, seed=8)) != first


def test_sampler_drop_last_and_no_shuffle():
    lengths = [3, 9, 1, 7, 5, 2, 8]
    sampler = LengthBucketSampler(lengths, batch_size=3, shuffle=True, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and all(len(b) == 3 for b in batches)
    ordered = list(LengthBucketSampler(lengths, batch_size=3, shuffle=False))
    assert ordered == [[1, 6, 3], [4, 0, 5], [2]]
    assert len(LengthBucketSampler(lengths, batch_size=3, shuffle=False)) == 3


# --- padding ---------------------------------------------------------------------------------


def test_collate_pads_to_multiple():
    seqs = [np.array([2, 5, 3]), np.array([2, 5, 6, 7, 8, 9, 10, 11, 12, 3])]
    batch = collate_padded(seqs, [1, 0], pad_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"][0].tolist() == [2, 5, 3] + [0] * 13
    assert batch["attention_mask"].sum(1).tolist() == [3, 10]
    assert batch["attention_mask"][0, 3:].sum() == 0
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.int64
    batch = collate_padded(seqs, None, pad_id=99, pad_to_multiple_of=1)
    assert "labels" not in batch and batch["input_ids"].shape == (2, 10)
    assert batch["input_ids"][0, 3:].tolist() == [99] * 7


def test_dataset_in_a_dataloader():
    tok = tiny_tokenizer()
    texts = ["the cat", "a dog ran on the mat", "the cat sat", "dogs", "a mat ."]
    ids, _ = encode_texts(tok, texts, max_length=16)
    ds = EncodedClassificationSet(ids, [0, 1, 0, 1, 1])
    assert len(ds) == 5 and ds.lengths == [len(a) for a in ids]
    loader = DataLoader(ds, batch_sampler=LengthBucketSampler(ds.lengths, 2, shuffle=False),
                        collate_fn=ds.collator(pad_id=0, pad_to_multiple_of=4))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["input_ids"].shape[1] == 8  # longest is 8 ids
    assert sorted(l for b in batches for l in b["labels"].tolist()) == [0, 0, 1, 1, 1]


# --- the built-in dataset --------------------------------------------------------------------


def test_shakespeare_genre(shakespeare_home, monkeypatch):
    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    splits = load_text_classification("shakespeare-genre")
    assert label_names(splits["train"]) == ["comedy", "history", "tragedy"]
    for split in ("train", "val", "test"):
        assert {l for _, l in splits[split]} == {"comedy", "history", "tragedy"}
    assert len(splits["train"]) > len(splits["val"]) > 0 and len(splits["test"]) > 0
    assert not {t for t, _ in splits["train"]} & {t for t, _ in splits["test"]}
