from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import fromzero
from fromzero.data.text import load_meta, load_split, prepare_dataset, sample_batch, token_dtype
from fromzero.data.tokenizers import EOS_TOKEN, TextTokenizer, train_char_tokenizer
from fromzero.errors import FromzeroError

LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "",
    "  And by opposing end them. — Ay, ‘tis so. 🎭",
]


def text_of(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(LINES) + rng.choice(["\n", "\n", "\n\n", "\r\n", " \n"]) for _ in range(n_lines))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def read_bin(out: Path, split: str, dtype: str = "uint16") -> np.ndarray:
    return np.fromfile(out / f"{split}.bin", dtype=dtype)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# --- dtype --------------------------------------------------------------------------------------


def test_token_dtype():
    assert token_dtype(65) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_char_train_is_head_val_is_tail(tmp_path):
    text = text_of(200)
    corpus = write(tmp_path / "corpus.txt", text)
    out = tmp_path / "data"
    meta = prepare_dataset(str(corpus), "char", out, progress=False, chunk_chars=97)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    n = len(text)
    split = int(n * 0.9)  # nanoGPT's split
    assert meta["vocab_size"] == len(set(text))
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == split and meta["val_tokens"] == n - split
    assert meta["tokenizer"] == "char" and meta["eos_id"] is None
    assert meta["corpus"] == {"specs": [str(corpus)], "files": 1, "chars": n,
                              "train_chars": split, "val_chars": n - split}
    assert meta["val_fraction"] == 0.1
    assert meta["fromzero_version"] == fromzero.__version__
    assert meta["created"].endswith("+00:00")
    tok = TextTokenizer.load(out)
    train, val = read_bin(out, "train"), read_bin(out, "val")
    assert (out / "train.bin").stat().st_size == 2 * split
    assert tok.decode(train) == text[:split]
    assert tok.decode(val) == text[split:]
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert train[:50].tolist() == [stoi[c] for c in text[:50]]
    assert siblings(out) == ["corpus.txt", "data"]  # no temp folder left behind


def test_prepare_bpe_multi_file_inserts_eos_and_matches_whole_encoding(tmp_path):
    texts = [text_of(120, seed) for seed in range(3)]
    files = [write(tmp_path / "docs" / f"{i}.txt", t) for i, t in enumerate(texts)]
    write(tmp_path / "docs" / "3_empty.txt", "")  # empty files add no eos
    out = tmp_path / "data"
    meta = prepare_dataset(str(tmp_path / "docs"), "bpe:300", out, val_fraction=0.2,
                           progress=False, chunk_chars=50)
    tok = TextTokenizer.load(out / "tokenizer.json")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300 and meta["eos_id"] == tok.eos_id
    assert meta["corpus"]["files"] == 4
    train, val = read_bin(out, "train"), read_bin(out, "val")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    full = "".join(texts)
    split = int(len(full) * 0.8)
    assert split > len(texts[0]) + len(texts[1])  # the split falls inside the last file
    ids = np.concatenate([train, val]).tolist()
    assert ids.count(tok.eos_id) == 2  # between files, not after the last one
    assert tok.decode(ids) == EOS_TOKEN.join(texts)
    assert tok.decode(val) == full[split:]
    # Chunking (50 chars) and the safe newline cuts did not change tokenization: the ids are
    # exactly those of encoding each file whole, except for the cut at the train/val split.
    eos = [tok.eos_id]
    a, b = len(texts[0]) + len(texts[1]), split
    expected = (tok.encode(texts[0]) + eos + tok.encode(texts[1]) + eos
                + tok.encode(full[a:b]) + tok.encode(full[b:]))
    assert ids == expected


def test_prepare_with_tokenizer_file(tmp_path):
    text = text_of(50)
    corpus = write(tmp_path / "c.txt", text)
    tok_file = train_char_tokenizer([text + "XYZ"]).save(tmp_path / "tok.json")
    meta = prepare_dataset(str(corpus), str(tok_file), tmp_path / "d", progress=False)
    assert meta["vocab_size"] == len(set(text + "XYZ"))
    assert meta["tokenizer_spec"] == str(tok_file)
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    # A char tokenizer that lacks some corpus characters fails cleanly, leaving nothing behind.
    small = train_char_tokenizer(["To be"]).save(tmp_path / "small.json")
    with pytest.raises(FromzeroError, match="not in the tokenizer's vocabulary"):
        prepare_dataset(str(corpus), str(small), tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()
    assert siblings(tmp_path / "e") == ["c.txt", "d", "small.json", "tok.json"]


def test_prepare_with_progress_bars(tmp_path, capsys):
    corpus = write(tmp_path / "c.txt", text_of(50))
    prepare_dataset(str(corpus), "bpe:270", tmp_path / "d", progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err
    assert load_split(tmp_path / "d", "val").dtype == np.uint16


def test_refuses_to_overwrite_without_force_and_force_replaces(tmp_path):
    corpus = write(tmp_path / "c.txt", text_of(40))
    out = tmp_path / "d"
    prepare_dataset(str(corpus), "char", out, progress=False)
    before = (out / "meta.json").read_text()
    with pytest.raises(FromzeroError, match=r"exists; pass --force to overwrite"):
        prepare_dataset(str(corpus), "bpe:270", out, progress=False)
    assert (out / "meta.json").read_text() == before  # untouched
    meta = prepare_dataset(str(corpus), "bpe:270", out, force=True, progress=False)
    assert meta["tokenizer"] == "bpe"
    assert load_meta(out) == meta
    assert siblings(out) == ["c.txt", "d"]


@pytest.mark.parametrize("spec", ["char", "bpe:270"])
def test_force_keeps_old_data_when_new_prepare_fails(tmp_path, spec):
    corpus = write(tmp_path / "c.txt", text_of(40))
    out = tmp_path / "d"
    prepare_dataset(str(corpus), "char", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.txt").write_bytes(b"fine\n" * 10 + b"\xff")
    with pytest.raises(FromzeroError, match=r"bad\.txt is not valid UTF-8.*byte offset 50"):
        prepare_dataset([str(corpus), str(tmp_path / "bad.txt")], spec, out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(out) == ["bad.txt", "c.txt", "d"]


def test_force_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    corpus = write(tmp_path / "c.txt", text_of(40))
    precious = tmp_path / "precious"
    write(precious / "thesis.tex", "do not delete")
    with pytest.raises(FromzeroError, match="not a fromzero data folder"):
        prepare_dataset(str(corpus), "char", precious, force=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_existing_empty_folder_is_fine_and_file_is_not(tmp_path):
    corpus = write(tmp_path / "c.txt", text_of(40))
    (tmp_path / "empty").mkdir()
    prepare_dataset(str(corpus), "char", tmp_path / "empty", progress=False)
    assert (tmp_path / "empty" / "train.bin").is_file()
    with pytest.raises(FromzeroError, match="not a folder"):
        prepare_dataset(str(corpus), "char", corpus, progress=False)


def test_too_small_corpus_and_bad_val_fraction(tmp_path):
    corpus = write(tmp_path / "c.txt", "tiny")
    # int(n * (1 - f)) < n always leaves some validation text; the train split can be empty.
    with pytest.raises(FromzeroError, match="is too small: 4 characters leave an empty train split"):
        prepare_dataset(str(corpus), "char", tmp_path / "d", val_fraction=0.8, progress=False)
    assert not (tmp_path / "d").exists()
    for bad in (0, 1, 1.5, -0.1, "0.1"):
        with pytest.raises(FromzeroError, match="val_fraction"):
            prepare_dataset(str(corpus), "char", tmp_path / "d", val_fraction=bad, progress=False)
    with pytest.raises(FromzeroError, match="is empty"):
        prepare_dataset(str(write(tmp_path / "e.txt", "")), "char", tmp_path / "d", progress=False)


def test_bpe_encoder_without_safe_cuts_still_round_trips():
    from fromzero.data.text import _BpeEncoder
    from fromzero.data.tokenizers import train_bpe_tokenizer

    text = ("one long line without any newline at all, " * 40 + "\n  \n" * 30) * 3
    tok = train_bpe_tokenizer([text], 280)
    encoder = _BpeEncoder(tok, max_carry=100)  # forces cuts where no safe cut exists
    ids: list[int] = []
    for i in range(0, len(text), 37):
        part = encoder.feed(text[i:i + 37])
        assert len(encoder.carry) <= 100 + 37
        ids += part.tolist()
    ids += encoder.flush().tolist()
    assert tok.decode(ids) == text


# --- load_split -----------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path) -> Path:
    corpus = write(tmp_path / "c.txt", text_of(100))
    prepare_dataset(str(corpus), "char", tmp_path / "data", progress=False)
    return tmp_path / "data"


def test_load_split(prepared):
    meta = load_meta(prepared)
    for split in ("train", "val"):
        data = load_split(prepared, split)
        assert isinstance(data, np.memmap)
        assert data.dtype == np.uint16 and len(data) == meta[f"{split}_tokens"]
        assert np.array_equal(data, read_bin(prepared, split))
    with pytest.raises(FromzeroError, match="unknown split 'test'"):
        load_split(prepared, "test")


def test_load_split_errors(prepared, tmp_path):
    with pytest.raises(FromzeroError, match="does not exist.*fromzero data prepare"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(FromzeroError, match="no meta.json.*fromzero data prepare"):
        load_split(tmp_path, "train")
    (prepared / "val.bin").unlink()
    with pytest.raises(FromzeroError, match="no val.bin.*fromzero data prepare"):
        load_split(prepared, "val")
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(FromzeroError, match="corrupt"):
        load_split(prepared, "train")
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "dtype": "float32"}))
    with pytest.raises(FromzeroError, match="bad fields: dtype 'float32'"):
        load_split(prepared, "train")
    (prepared / "meta.json").write_text("{not json")
    with pytest.raises(FromzeroError, match="unreadable"):
        load_split(prepared, "train")


# --- sample_batch ---------------------------------------------------------------------------------


def test_sample_batch_shapes_shift_and_offsets():
    data = np.arange(1000, dtype=np.uint16)  # token i == position i, so windows are readable
    g = torch.Generator().manual_seed(0)
    x, y = sample_batch(data, batch_size=8, block_size=16, generator=g)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))
    # The offsets are exactly torch.randint(len - block, (B,)) drawn from the generator.
    expected = torch.randint(1000 - 16, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], expected)


def test_sample_batch_is_deterministic_given_generator_state(prepared):
    data = load_split(prepared, "train")
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    first = sample_batch(data, 4, 32, g)
    second = sample_batch(data, 4, 32, g)
    assert not torch.equal(first[0], second[0])  # the generator moved on
    g.set_state(state)
    again = sample_batch(data, 4, 32, g)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    offsets = torch.randint(len(data) - 32, (4,), generator=torch.Generator().manual_seed(123))
    for b, o in enumerate(offsets.tolist()):
        assert first[0][b].tolist() == data[o:o + 32].astype(np.int64).tolist()
        assert first[1][b].tolist() == data[o + 1:o + 33].astype(np.int64).tolist()


def test_sample_batch_block_too_long():
    data = np.arange(10, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(FromzeroError, match=r"block_size 10 is longer than the data \(10 tokens\)"):
        sample_batch(data, 2, 10, g)
    x, y = sample_batch(data, 2, 9, g)  # the longest block that fits: only offset 0
    assert x[0].tolist() == list(range(9)) and y[0].tolist() == list(range(1, 10))
