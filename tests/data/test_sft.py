"""Instruction-tuning data: loading, template, loss masks, packing, batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fromzero.data.corpora import resolve_corpus
from fromzero.data.sft import (
    IGNORE_INDEX,
    ChatTemplate,
    collate_sft,
    load_sft_examples,
    pack_sft,
    tokenize_sft,
)
from fromzero.data.tokenizers import (
    char_tokenizer_from_chars,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from fromzero.errors import FromzeroError

TEXTS = [
    "Who is there? Nay, answer me: stand, and unfold yourself.",
    "Long live the king! Is it you, Bernardo? He is here.",
    "USER: ASSISTANT: What is the question and the answer?",
]
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHARS = set("".join(TEXTS)) | set("\n") | set(LETTERS)


@pytest.fixture(scope="module")
def char_tok():
    return char_tokenizer_from_chars(CHARS)


@pytest.fixture(scope="module")
def bpe_tok():
    return train_bpe_tokenizer(TEXTS * 5, vocab_size=300)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def pair(i: int) -> dict:
    return {"prompt": f"Who is there {i}?", "response": f"Bernardo {i}."}


def chat(prompt: str, response: str, system: str | None = None) -> dict:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return {"messages": msgs}


# --- loading --------------------------------------------------------------------------------


def test_both_jsonl_formats(tmp_path):
    rows = [
        {"prompt": "Who is there?", "response": "Bernardo.", "system": "Be brief."},
        "",  # blank lines are skipped
        chat("Long live the king!", "Bernardo?"),
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    ]
    f = write_jsonl(tmp_path / "all.jsonl", rows)
    splits = load_sft_examples(str(f), val_fraction=0, test_fraction=0)
    assert splits["val"] == splits["test"] == []
    train = splits["train"]
    assert train[0] == chat("Who is there?", "Bernardo.", system="Be brief.")
    assert train[1] == chat("Long live the king!", "Bernardo?")
    assert [m["role"] for m in train[2]["messages"]] == ["user", "assistant"] * 2


def test_line_separators_inside_json_strings_stay_in_their_row(tmp_path):
    """JSON allows a raw U+2028 / U+2029 / U+0085 inside a string; splitlines() would cut the row
    there and call the file invalid (CRLF files still read)."""
    text = "line\u2028separated\u2029paragraph\x85next"
    f = tmp_path / "odd.jsonl"
    f.write_text(json.dumps({"prompt": text, "response": "ok"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    train = load_sft_examples(str(f), val_fraction=0, test_fraction=0)["train"]
    assert train == [chat(text, "ok")]


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({"prompt": "x"}, "expected"),
        ({"prompt": "x", "response": ""}, "non-empty string"),
        ({"prompt": 3, "response": "y"}, "non-empty string"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "role and content"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, row, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [pair(0), row])
    with pytest.raises(FromzeroError, match=message) as e:
        load_sft_examples(str(f))
    assert f"{f}:2:" in str(e.value)


def test_bad_sources(tmp_path):
    with pytest.raises(FromzeroError, match="not found"):
        load_sft_examples(str(tmp_path / "nope"))
    with pytest.raises(FromzeroError, match="no train.jsonl"):
        load_sft_examples(str(tmp_path))
    with pytest.raises(FromzeroError, match=".jsonl file"):
        load_sft_examples(str(write_jsonl(tmp_path / "data.txt", [pair(0)])))
    with pytest.raises(FromzeroError, match="no examples"):
        load_sft_examples(str(write_jsonl(tmp_path / "empty.jsonl", [""])))
    with pytest.raises(FromzeroError, match="sum to < 1"):
        load_sft_examples(str(write_jsonl(tmp_path / "a.jsonl", [pair(0)])), 0.5, 0.5)


def test_split_determinism(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [pair(i) for i in range(50)])
    a = load_sft_examples(str(f), val_fraction=0.2, test_fraction=0.1, seed=3)
    assert a == load_sft_examples(str(f), val_fraction=0.2, test_fraction=0.1, seed=3)
    assert a != load_sft_examples(str(f), val_fraction=0.2, test_fraction=0.1, seed=4)
    assert [len(a[s]) for s in ("train", "val", "test")] == [35, 10, 5]
    seen = [ex["messages"][0]["content"] for split in a.values() for ex in split]
    assert sorted(seen) == sorted(pair(i)["prompt"] for i in range(50))  # each in one split

    # A folder: given splits are used as they are, a missing one is carved from train.
    d = tmp_path / "folder"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [pair(i) for i in range(20)])
    write_jsonl(d / "test.jsonl", [pair(100)])
    b = load_sft_examples(str(d), val_fraction=0.25, seed=0)
    assert [len(b[s]) for s in ("train", "val", "test")] == [15, 5, 1]
    assert b == load_sft_examples(str(d), val_fraction=0.25, seed=0)


# --- template and masks ---------------------------------------------------------------------


def test_template_render_and_prompt_text():
    t = ChatTemplate()
    msgs = chat("Who is there?", "Bernardo.", system="Be brief.")["messages"]
    segs = t.render(msgs)
    assert [s for s, target in segs if target] == ["Bernardo." + t.turn_end]
    assert "".join(s for s, _ in segs) == (
        "Be brief.\n\n" + t.user_prefix + "Who is there?\n\n" + t.assistant_prefix + "Bernardo.\n\n"
    )
    expected = "Be brief.\n\n" + t.user_prefix + "Who is there?\n\n" + t.assistant_prefix
    assert t.prompt_text(msgs) == expected  # the reference answer is left out
    assert t.prompt_text(msgs[:-1]) == expected
    assert set(t.user_prefix + t.assistant_prefix + t.turn_end) <= set(LETTERS + ": \n")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_labels_mask_everything_but_responses(kind, char_tok, bpe_tok):
    tok = char_tok if kind == "char" else bpe_tok
    t = ChatTemplate()
    examples = [
        chat("Who is there?", "Nay, answer me: stand.", system="Be brief."),
        {"messages": [{"role": "user", "content": "Long live the king!"},
                      {"role": "assistant", "content": "Bernardo?"},
                      {"role": "user", "content": "He."},
                      {"role": "assistant", "content": "You come most carefully."}]},
    ]
    ds = tokenize_sft(examples, tok, t, max_length=512)
    assert len(ds) == 2 and ds.n_dropped == ds.n_truncated == 0
    for ex, (x, y) in zip(examples, ds):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape
        ids = torch.cat([x, y[-1:]])  # the last label is always a target here: eos or turn_end
        target = y != IGNORE_INDEX
        # y is the next token where it is a target ...
        assert torch.equal(y[target], ids[1:][target])
        # ... and the targets decode to exactly the responses + turn_end (+ eos).
        eos = tok.decode([tok.eos_id]) if tok.eos_id is not None else ""
        responses = "".join(m["content"] + t.turn_end + eos
                            for m in ex["messages"] if m["role"] == "assistant")
        assert tok.decode(y[target]) == responses
        # The whole sequence is the rendered text (plus eos after each response).
        assert tok.decode(ids).replace(eos, "") == t.text(ex["messages"])
    assert ds.n_target_tokens == sum(int((y != IGNORE_INDEX).sum()) for _, y in ds)


def test_eos_for_bpe_not_for_char(char_tok, bpe_tok):
    ex = [chat("Who is there?", "Bernardo.")]
    assert bpe_tok.eos_id is not None and char_tok.eos_id is None
    x, y = tokenize_sft(ex, bpe_tok, ChatTemplate(), max_length=256)[0]
    assert y[-1].item() == bpe_tok.eos_id and (y == bpe_tok.eos_id).sum() == 1
    x2, y2 = tokenize_sft(ex, bpe_tok, ChatTemplate(), max_length=256, add_eos=False)[0]
    assert bpe_tok.eos_id not in y2.tolist() and len(y2) == len(y) - 1
    _, yc = tokenize_sft(ex, char_tok, ChatTemplate(), max_length=256)[0]
    assert char_tok.decode(yc[-2:]) == "\n\n"


def test_truncation_and_drop_counts(char_tok):
    t = ChatTemplate()
    short = chat("Who?", "He.")
    long_prompt = chat("Who is there? " * 20, "Bernardo.")  # only prompt survives the cut
    long_answer = chat("Who?", "Long live the king! " * 20)  # cut, but keeps targets
    n_short = len(char_tok.encode(t.text(short["messages"])))
    ds = tokenize_sft([short, long_prompt, long_answer], char_tok, t, max_length=60)
    assert (ds.n_truncated, ds.n_dropped, len(ds)) == (2, 1, 2)
    assert ds.lengths == [n_short - 1, 60]
    assert all(len(x) <= 60 for x, _ in ds)


def test_unknown_character_names_it_and_the_example(char_tok):
    with pytest.raises(FromzeroError, match=r"SFT example 1: .*'\u00e9'"):
        examples = [chat("Who?", "He."), chat("Who?", "Caf\u00e9.")]
        tokenize_sft(examples, char_tok, ChatTemplate(), 64)


# --- packing and batching -------------------------------------------------------------------


def test_packing_keeps_targets(bpe_tok):
    examples = [chat(f"Who is there {i}?", "Nay, answer me. " * (i % 4 + 1)) for i in range(9)]
    ds = tokenize_sft(examples, bpe_tok, ChatTemplate(), max_length=128)
    packed = pack_sft(ds, block_size=16, pad_id=0)
    assert all(len(x) == len(y) == 16 for x, y in packed) and packed.lengths == [16] * len(packed)
    total = sum(ds.lengths)
    assert len(packed) == -(-total // 16)

    def targets(s):
        return Counter(t for _, y in s for t in y.tolist() if t != IGNORE_INDEX)

    assert targets(packed) == targets(ds) and packed.n_target_tokens == ds.n_target_tokens
    # Same token streams, only regrouped; the tail is padding that is never a target.
    flat_x = torch.cat([x for x, _ in packed])
    assert torch.equal(flat_x[:total], torch.cat([x for x, _ in ds]))
    assert (torch.cat([y for _, y in packed])[total:] == IGNORE_INDEX).all()


def test_collate_pads_right():
    batch = [(torch.tensor([1, 2, 3]), torch.tensor([-100, 3, 4])),
             (torch.tensor([5]), torch.tensor([6]))]
    x, y = collate_sft(batch, pad_id=9)
    assert x.tolist() == [[1, 2, 3], [5, 9, 9]]
    assert y.tolist() == [[-100, 3, 4], [6, -100, -100]]
    assert x.dtype == y.dtype == torch.int64


# --- the built-in dataset -------------------------------------------------------------------


def test_shakespeare_dialogue(shakespeare_home, monkeypatch):
    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    splits = load_sft_examples("shakespeare-dialogue")
    sizes = {s: len(v) for s, v in splits.items()}
    assert sizes["train"] > 5000 and sizes["val"] > 500 and sizes["test"] > 500, sizes
    plays = {s: {ex["play"] for ex in v} for s, v in splits.items()}
    assert not (plays["train"] & plays["val"] or plays["train"] & plays["test"]
                or plays["val"] & plays["test"])
    assert len(plays["val"]) == len(plays["test"]) == 6
    for ex in splits["train"][:2000]:
        user, reply = ex["messages"]
        assert (user["role"], reply["role"]) == ("user", "assistant")
        for m in (user, reply):
            assert 20 <= len(m["content"]) <= 400 and "\n\n" not in m["content"]
    assert splits == load_sft_examples("shakespeare-dialogue")  # deterministic
    # The default template and every example encode with a char tokenizer of the corpus.
    tok = train_char_tokenizer(resolve_corpus("shakespeare").iter_chunks())
    every = [ex for v in splits.values() for ex in v]
    ds = tokenize_sft(every, tok, ChatTemplate(), max_length=1024)
    assert len(ds) == len(every) and ds.n_truncated == ds.n_dropped == 0
