from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from fromzero.data.corpora import Corpus
from fromzero.data.tokenizers import (
    EOS_TOKEN,
    TextTokenizer,
    build_tokenizer,
    train_bpe_tokenizer,
    train_char_tokenizer,
)
from fromzero.errors import FromzeroError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\r\nSpeak, speak.\t  Ay!\n"

UNICODE_SAMPLES = [
    "",
    "plain ascii",
    " leading and trailing spaces  ",
    "héllo wörld — “quotes” ½ ß ﬁ",
    "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
    "中文字符 日本語 한국어 עברית العربية",
    "\x00\x01\x7f control\r\n\r\n\t\x0b\x0c",
    "combining e\u0301 and zero\u200bwidth",
    "literal <|endoftext|> in text",
    "\n\n\n   \n",
]


# --- char ---------------------------------------------------------------------------------------


def test_char_ids_follow_sorted_characters():
    tok = train_char_tokenizer([TEXT[:20], TEXT[20:]])
    chars = sorted(set(TEXT))
    stoi = {ch: i for i, ch in enumerate(chars)}  # nanoGPT's shakespeare_char/prepare.py
    assert tok.kind == "char"
    assert tok.vocab_size == len(chars)
    assert tok.eos_id is None
    assert tok.encode(TEXT) == [stoi[c] for c in TEXT]
    assert tok.backend.get_vocab() == stoi


def test_char_round_trip_keeps_whitespace_and_newlines():
    tok = train_char_tokenizer([TEXT])
    for s in [TEXT, "\n", " ", "  \n\n \r\n\t", "", "speak speak"]:
        ids = tok.encode(s)
        assert len(ids) == len(s)
        assert tok.decode(ids) == s
    assert tok.decode(np.array(tok.encode("hear"))) == "hear"


def test_char_pre_tokenizer_isolates_every_character():
    tok = train_char_tokenizer([TEXT])
    enc = tok.backend.encode("a \n\r\nA  ")
    assert enc.tokens == ["a", " ", "\n", "\r", "\n", "A", " ", " "]


def test_char_fast_path_matches_rust_tokenizer():
    rng = random.Random(0)
    alphabet = list("abcXYZ \n\r\t.,;!éß€中🎉\x00") + ["\U0010fffd"]
    tok = train_char_tokenizer(["".join(alphabet)])
    for _ in range(20):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        assert tok.encode(s) == tok.backend.encode(s).ids
        assert tok.decode(tok.encode(s)) == s
    batch = ["abc", "", "🎉\n"]
    assert tok.encode_batch(batch) == [tok.encode(s) for s in batch]


def test_char_unknown_characters_error_names_them():
    tok = train_char_tokenizer(["hello world"])
    with pytest.raises(FromzeroError, match=r"^text contains 2 characters not in the tokenizer's vocabulary: 'é', '€'$"):
        tok.encode("héllo €é")
    with pytest.raises(FromzeroError, match=r"1 character not in .*'\\ud800'"):
        tok.encode("hello\ud800")  # a lone surrogate is just another unknown character
    with pytest.raises(FromzeroError, match=r"26 characters .*\(and 16 more\)"):
        tok.encode("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_char_empty_text_is_an_error():
    with pytest.raises(FromzeroError, match="empty text"):
        train_char_tokenizer(["", ""])


def test_char_encoding_is_fast():
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'-\n", np.uint8)
    text = alphabet[rng.integers(0, len(alphabet), 5_000_000)].tobytes().decode("ascii")
    tok = train_char_tokenizer([text])
    start = time.perf_counter()
    ids = tok.encode_array(text)
    elapsed = time.perf_counter() - start
    assert len(ids) == len(text)
    assert elapsed < 2.0, f"char encoding of 5M characters took {elapsed:.2f}s"


# --- bpe ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    corpus = [TEXT * 20, "the quick brown fox jumps over the lazy dog\n" * 50, "héllo wörld 🎉\n" * 10]
    return train_bpe_tokenizer(corpus, 300)


def test_bpe_basics(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 300
    assert bpe.eos_id == bpe.backend.token_to_id(EOS_TOKEN) == 0
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")  # it learnt merges


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trips_random_unicode(bpe):
    rng = random.Random(1)
    for _ in range(50):
        s = "".join(chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF),
                                    rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(0, 60)))
        assert bpe.decode(bpe.encode(s)) == s
    assert bpe.encode_batch(UNICODE_SAMPLES) == [bpe.encode(s) for s in UNICODE_SAMPLES]


def test_bpe_vocab_size_too_small():
    with pytest.raises(FromzeroError, match="at least 257"):
        train_bpe_tokenizer(["abc"], 256)
    with pytest.raises(FromzeroError, match="empty text"):
        train_bpe_tokenizer([""], 300)


# --- files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind, bpe):
    tok = train_char_tokenizer([TEXT]) if kind == "char" else bpe
    path = tok.save(tmp_path / "tok" / "tokenizer.json")
    assert path == tmp_path / "tok" / "tokenizer.json"
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    for loaded in (TextTokenizer.load(path), TextTokenizer.load(path.parent)):
        assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
        assert loaded.encode(TEXT) == tok.encode(TEXT)
    # A plain Hugging Face tokenizers install reads our file and agrees on the ids.
    assert Tokenizer.from_file(str(path)).encode(TEXT).ids == tok.encode(TEXT)
    # Saving into an existing folder writes folder/tokenizer.json.
    assert tok.save(tmp_path / "tok") == path


def test_load_errors(tmp_path):
    with pytest.raises(FromzeroError, match="not found"):
        TextTokenizer.load(tmp_path / "missing.json")
    with pytest.raises(FromzeroError, match="has no tokenizer.json"):
        TextTokenizer.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(FromzeroError, match="not a valid tokenizer.json"):
        TextTokenizer.load(bad)
    bad.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(FromzeroError, match="not a valid tokenizer.json"):
        TextTokenizer.load(bad)


# --- build_tokenizer (the --tokenizer spec) ------------------------------------------------------


def test_build_tokenizer_specs(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(TEXT * 5)
    corpus = Corpus("c", [f])
    char = build_tokenizer("char", corpus)
    assert char.kind == "char" and char.vocab_size == len(set(TEXT))
    bpe = build_tokenizer("bpe:260", corpus)
    assert bpe.kind == "bpe" and bpe.vocab_size == 260
    saved = bpe.save(tmp_path / "out" / "tokenizer.json")
    for spec in (str(saved), str(saved.parent)):
        assert build_tokenizer(spec, corpus).encode(TEXT) == bpe.encode(TEXT)
    # Training text can come from elsewhere (prepare wraps it in a progress bar).
    assert build_tokenizer("char", corpus, chunks=["ab"]).vocab_size == 2


@pytest.mark.parametrize("spec", ["bpe:x", "bpe", "bpe:", "BPE:-3", ""])
def test_build_tokenizer_bad_spec_lists_forms(tmp_path, spec):
    corpus = Corpus("c", [tmp_path])
    with pytest.raises(FromzeroError, match=r"char, bpe:N .*tokenizer\.json"):
        build_tokenizer(spec, corpus)


def test_build_tokenizer_missing_file(tmp_path):
    with pytest.raises(FromzeroError, match=r"tokenizer '.*nope\.json' not found: expected char, bpe:N"):
        build_tokenizer(str(tmp_path / "nope.json"), Corpus("c", []))
    with pytest.raises(FromzeroError, match="at least 257"):
        build_tokenizer("bpe:100", Corpus("c", []))
