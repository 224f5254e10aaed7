"""Retrieval over a user's documents: an index on disk, three ways to search it, answers that cite.

``fromzero index DOCS... --out INDEX`` (:func:`build_index`) reads the documents and cuts them
into passages (:mod:`fromzero.data.chunking`), embeds every passage with a sentence encoder
(all-MiniLM-L6-v2, built in, by default: the toolkit's own BERT with mean pooling and L2
normalisation, :func:`~fromzero.models.bert.embed_texts`), and writes the folder::

    INDEX/chunks.jsonl             one passage per line: source, start_line, end_line, text
                                   (+ heading, speaker)
    INDEX/embeddings.safetensors   "embeddings": (passages, dim) float32, unit length
    INDEX/info.json                kind, format, the encoder (name, sha256 of its weights, dim,
                                   max tokens), the chunking, counts, each source's sha256

It is written into a temporary folder and renamed into place, and an existing INDEX is replaced
only with ``force`` (and only if it is an index: another folder is never replaced).

:class:`RetrievalIndex` searches it three ways (:data:`RETRIEVERS`):

* ``dense``: exact cosine similarity of the question's embedding with every passage's (one matrix
  product in torch; with ``faiss-cpu`` installed, faiss's exact inner-product index, the same
  ranking). The question is embedded with the same encoder, checked by the sha256 of its weights.
* ``bm25``: Okapi BM25 (``rank-bm25``, k1 1.5, b 0.75) over lower-cased ``\\w+`` words, its
  statistics computed from chunks.jsonl when the index is opened.
* ``hybrid``: reciprocal rank fusion (Cormack et al. 2009) of the two: a passage scores
  ``sum 1 / (60 + rank)`` over the dense and BM25 rankings (their top :data:`FUSION_DEPTH` each).

:class:`Answerer` puts the top passages, numbered, into a chat model's prompt with the question
and asks it to answer from them and cite them as ``[n]``; :func:`cited_numbers` reads the
citations back.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fromzero.data.chunking import Chunk, ChunkingConfig, chunk_documents, read_documents
from fromzero.errors import FromzeroError

__all__ = ["IndexConfig", "build_index", "RetrievalIndex", "Hit", "RETRIEVERS", "bm25_tokens",
           "reciprocal_rank_fusion", "Answerer", "rag_messages", "cited_numbers", "resolve_encoder"]

INDEX_KIND = "fromzero-retrieval-index"
INDEX_FORMAT = 1
CHUNKS_FILE = "chunks.jsonl"
EMBEDDINGS_FILE = "embeddings.safetensors"
INFO_FILE = "info.json"
DEFAULT_ENCODER = "all-MiniLM-L6-v2"
RETRIEVERS = ("dense", "bm25", "hybrid")
RRF_K = 60
FUSION_DEPTH = 100
_TOKEN = re.compile(r"\w+")


@dataclass
class IndexConfig:
    """How ``fromzero index`` builds an index."""

    chunking: str = "words"
    """words (windows of --words words, --overlap shared) | paragraphs (blank-line blocks joined up to
    --words) | speeches (plays: one passage per speech, long ones cut into windows)."""
    words: int = 150
    """Longest passage in words (all-MiniLM-L6-v2 reads 256 tokens, about 150-190 English words)."""
    overlap: int = 30
    """Words shared by consecutive windows of one text."""
    model: str = DEFAULT_ENCODER
    """Sentence encoder: all-MiniLM-L6-v2 (built in) or a fromzero-bert checkpoint directory."""
    batch_size: int = 64
    """Passages per forward pass of the encoder."""
    device: str = "auto"
    """auto | cpu | cuda | mps."""

    def chunking_config(self) -> ChunkingConfig:
        return ChunkingConfig(mode=self.chunking, words=self.words, overlap=self.overlap)


def resolve_encoder(model: str) -> Path:
    """The checkpoint directory of the encoder ``model`` (built-in names converted once)."""
    from fromzero.finetune.text import resolve_checkpoint

    return resolve_checkpoint(model)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Encoder:
    """A sentence encoder loaded once: texts -> unit-length float32 vectors."""

    def __init__(self, model: str, device: str = "cpu") -> None:
        from fromzero.checkpoint import CONFIG_FILE, load_model, read_json
        from fromzero.devices import resolve_device
        from fromzero.models.bert import Bert, BertConfig, encoder_limit, load_encoder_tokenizer

        self.name = model
        self.directory = resolve_encoder(model)
        raw = read_json(self.directory / CONFIG_FILE, "model config")
        if raw.get("model_type") != "fromzero-bert":
            raise FromzeroError(f"{model} holds a {raw.get('model_type')!r} model; the index needs a "
                                "sentence encoder (a fromzero-bert checkpoint such as all-MiniLM-L6-v2)")
        self.config = BertConfig.from_dict(raw)
        self.tokenizer = load_encoder_tokenizer(self.directory, self.config)
        self.max_tokens = encoder_limit(self.directory, self.config)
        self.model = load_model(self.directory, resolve_device(device))
        assert isinstance(self.model, Bert)
        self.sha256 = _sha256_file(self.directory / "model.safetensors")

    def embed(self, texts: Sequence[str], batch_size: int = 64,
              on_batch: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
        """(len(texts), dim) float32 unit vectors, and how many texts were cut at max_tokens.

        Texts are sorted by length and embedded ``batch_size`` at a time (each batch padded to
        its longest), so similar lengths share a batch."""
        from fromzero.models.bert import embed_texts

        if batch_size <= 0:
            raise FromzeroError("batch size must be positive")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        truncated = sum(1 for e in encodings if e.overflowing)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids), reverse=True)
        out = torch.empty(len(texts), self.config.hidden_size, dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            vectors = embed_texts(self.model, self.tokenizer, self.config, [texts[i] for i in rows],
                                  normalize=True, batch_size=batch_size, where=f"{self.name} tokenizer",
                                  encodings=[encodings[i] for i in rows])
            out[rows] = torch.tensor(vectors, dtype=torch.float32)
            if on_batch is not None:
                on_batch(len(rows))
        return out, truncated


def _progress(enabled: bool, label: str) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


def _check_out(out: Path, force: bool) -> None:
    """Refuse to replace anything without ``force``, and anything but an index with it."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise FromzeroError(f"{out} already exists; pass --force to replace it")
    if not out.is_dir() or _read_info(out, quiet=True) is None:
        raise FromzeroError(f"{out} exists and is not a fromzero index; --force replaces only an index "
                            "folder")


def build_index(specs: Sequence[str], out: str | Path, cfg: IndexConfig | None = None, force: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Read, chunk and embed the documents ``specs`` into the index folder ``out``; returns its info.

    FromzeroError (nothing written) for an existing ``out`` without ``force``, unreadable
    documents, bad settings, or documents without text (an empty index)."""
    from fromzero.checkpoint import atomic_directory, atomic_write_text, write_safetensors

    cfg = cfg or IndexConfig()
    out = Path(out)
    chunking = cfg.chunking_config()
    chunking.validate()
    if cfg.batch_size <= 0:
        raise FromzeroError(f"batch size must be positive, got {cfg.batch_size}")
    _check_out(out, force)
    documents = read_documents(list(specs))
    chunks = chunk_documents(documents, chunking)
    if not chunks:
        what = "speeches" if chunking.mode == "speeches" else "text"
        raise FromzeroError(f"no {what} found in {', '.join(specs)}: the index would be empty")
    encoder = Encoder(cfg.model, cfg.device)
    with _progress(progress, f"embedding {len(chunks):,} passages") as bar:
        task = bar.add_task("embed", total=len(chunks))
        embeddings, truncated = encoder.embed([c.search_text() for c in chunks], cfg.batch_size,
                                              on_batch=lambda n: bar.advance(task, n))
    per_source: dict[str, int] = {}
    for c in chunks:
        per_source[c.source] = per_source.get(c.source, 0) + 1
    info = {
        "kind": INDEX_KIND, "format": INDEX_FORMAT,
        "model": {"name": cfg.model, "sha256": encoder.sha256, "dim": int(embeddings.shape[1]),
                  "max_tokens": encoder.max_tokens, "pooling": "mean", "normalized": True},
        "chunking": asdict(chunking),
        "counts": {"documents": len(documents), "chunks": len(chunks),
                   "words": sum(len(c.search_text().split()) for c in chunks), "truncated_chunks": truncated},
        "sources": [{"path": d.path, "sha256": d.sha256, "bytes": d.size, "chunks": per_source.get(d.path, 0)}
                    for d in documents],
    }
    with atomic_directory(out) as tmp:
        lines = "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in chunks)
        (tmp / CHUNKS_FILE).write_text(lines, encoding="utf-8")
        write_safetensors({"embeddings": embeddings.contiguous()}, tmp / EMBEDDINGS_FILE)
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


def _read_info(directory: Path, quiet: bool = False) -> dict[str, Any] | None:
    path = directory / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if quiet:
            return None
        raise FromzeroError(f"{directory} is not an index (no {INFO_FILE}); build one with "
                            "`fromzero index`") from None
    except (OSError, ValueError) as e:
        if quiet:
            return None
        raise FromzeroError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(info, dict) or info.get("kind") != INDEX_KIND:
        if quiet:
            return None
        raise FromzeroError(f"{directory} is not a fromzero index ({INFO_FILE} has no kind {INDEX_KIND!r})")
    return info


def bm25_tokens(text: str) -> list[str]:
    """What BM25 matches: lower-cased runs of letters, digits and underscores."""
    return _TOKEN.findall(text.lower())


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """(item, score) by fused score, best first: score = sum over rankings of 1 / (k + rank), rank
    from 1. Ties go to the item ranked best in any list, then the lower item id."""
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
            best[item] = min(best.get(item, rank), rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], best[kv[0]], kv[0]))


@dataclass
class Hit:
    """One retrieved passage."""

    rank: int
    """1 = best."""
    id: int
    """Its line in chunks.jsonl, from 0."""
    chunk: Chunk
    score: float
    """Cosine similarity (dense), BM25 score, or fused RRF score."""


@dataclass
class RetrievalIndex:
    """An index folder opened for search (:meth:`load`)."""

    directory: Path
    info: dict[str, Any]
    chunks: list[Chunk]
    embeddings: torch.Tensor
    device: str = "cpu"
    _encoder: Encoder | None = field(default=None, repr=False)
    _bm25: Any = field(default=None, repr=False)
    _faiss: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> "RetrievalIndex":
        """Open ``directory``, checking that its three files agree (FromzeroError if not)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FromzeroError(f"index folder not found: {directory}")
        info = _read_info(directory)
        assert info is not None
        if not isinstance(info.get("format"), int) or info["format"] > INDEX_FORMAT:
            raise FromzeroError(f"{directory} is an index of format {info.get('format')!r}; this fromzero "
                                f"reads format {INDEX_FORMAT} and older: upgrade it or rebuild the index")
        try:
            text = (directory / CHUNKS_FILE).read_text(encoding="utf-8")
        except OSError as e:
            raise FromzeroError(f"cannot read {directory / CHUNKS_FILE}: {e.strerror or e}") from None
        chunks = []
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{directory / CHUNKS_FILE}:{n}"
            try:
                raw = json.loads(line)
            except ValueError as e:
                raise FromzeroError(f"{where}: not valid JSON ({e})") from None
            chunks.append(Chunk.from_dict(raw, where))
        try:
            tensors = load_file(str(directory / EMBEDDINGS_FILE))
        except (OSError, SafetensorError) as e:
            raise FromzeroError(f"cannot read {directory / EMBEDDINGS_FILE}: {e}") from None
        embeddings = tensors.get("embeddings")
        counts, model = info.get("counts") or {}, info.get("model") or {}
        if embeddings is None or embeddings.ndim != 2:
            raise FromzeroError(f"{directory / EMBEDDINGS_FILE} holds no 2-D 'embeddings' tensor")
        rows, dim = embeddings.shape
        if not (len(chunks) == rows == counts.get("chunks")) or dim != model.get("dim"):
            raise FromzeroError(
                f"{directory} is inconsistent: {len(chunks)} chunks, {rows} embeddings of dimension {dim}, "
                f"info.json says {counts.get('chunks')} of dimension {model.get('dim')}; "
                "rebuild it with `fromzero index`")
        if not chunks:
            raise FromzeroError(f"{directory} holds no passages")
        return cls(directory, info, chunks, embeddings.float(), device)

    # -- dense -----------------------------------------------------------------------------------

    @property
    def dense_backend(self) -> str:
        """faiss (exact inner product) when faiss-cpu is installed, else torch."""
        import importlib.util

        return "faiss" if importlib.util.find_spec("faiss") is not None else "torch"

    def encoder(self) -> Encoder:
        """The index's encoder, loaded once and checked to be the one that embedded the passages."""
        if self._encoder is None:
            model = self.info["model"]
            encoder = Encoder(model["name"], self.device)
            if encoder.sha256 != model.get("sha256"):
                raise FromzeroError(f"the encoder {model['name']} is not the one that built {self.directory} "
                                    "(the sha256 of its weights differs); rebuild the index")
            self._encoder = encoder
        return self._encoder

    def embed_queries(self, queries: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.encoder().embed(list(queries), batch_size)[0]

    def dense_rankings(self, query_vectors: torch.Tensor, depth: int) -> list[list[tuple[int, float]]]:
        """Per query, the ``depth`` passages of highest cosine similarity: [(id, similarity)]."""
        depth = min(depth, len(self.chunks))
        if self.dense_backend == "faiss":
            import faiss

            if self._faiss is None:
                self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
                self._faiss.add(self.embeddings.numpy())
            scores, ids = self._faiss.search(query_vectors.float().numpy(), depth)
            return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0]
                    for row_i, row_s in zip(ids, scores)]
        out = []
        for start in range(0, len(query_vectors), 256):
            sims = query_vectors[start:start + 256].float() @ self.embeddings.T  # (Q, N)
            values, ids = sims.topk(depth, dim=1)
            out += [list(zip(map(int, i), map(float, v))) for i, v in zip(ids.tolist(), values.tolist())]
        return out

    # -- BM25 --------------------------------------------------------------------------------------

    def bm25(self) -> Any:
        if self._bm25 is None:
            from rank_bm25 import BM25Okapi

            corpus = [bm25_tokens(c.search_text()) for c in self.chunks]
            if not any(corpus):
                raise FromzeroError(f"{self.directory}: no passage has a word BM25 can match")
            self._bm25 = BM25Okapi(corpus)
        return self._bm25

    def bm25_rankings(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        """Per query, the ``depth`` passages of highest BM25 score (ties: earlier passage first)."""
        import numpy as np

        bm25 = self.bm25()
        depth = min(depth, len(self.chunks))
        out = []
        for q in queries:
            scores = bm25.get_scores(bm25_tokens(q))
            order = np.argsort(-scores, kind="stable")[:depth]
            out.append([(int(i), float(scores[i])) for i in order])
        return out

    # -- all three -------------------------------------------------------------------------------

    def search(self, queries: Sequence[str], retriever: str = "hybrid", top_k: int = 5) -> list[list[Hit]]:
        """The ``top_k`` passages for each query by ``retriever`` (dense | bm25 | hybrid)."""
        if retriever not in RETRIEVERS:
            raise FromzeroError(f"unknown retriever {retriever!r} (choose from {', '.join(RETRIEVERS)})")
        if top_k < 1:
            raise FromzeroError(f"top-k must be >= 1, got {top_k}")
        queries = list(queries)
        if any(not q.strip() for q in queries):
            raise FromzeroError("the question is empty")
        if retriever == "dense":
            ranked = self.dense_rankings(self.embed_queries(queries), top_k)
        elif retriever == "bm25":
            ranked = self.bm25_rankings(queries, top_k)
        else:
            depth = max(FUSION_DEPTH, top_k)
            dense = self.dense_rankings(self.embed_queries(queries), depth)
            sparse = self.bm25_rankings(queries, depth)
            ranked = [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in s]])[:top_k]
                      for d, s in zip(dense, sparse)]
        return [[Hit(r, i, self.chunks[i], s) for r, (i, s) in enumerate(rows[:top_k], start=1)]
                for rows in ranked]


# ---------------------------------------------------------------------------------------------
# Answering with a chat model

SYSTEM_PROMPT = ("You answer questions using only the numbered passages the user gives you. Cite every "
                 "passage you use by its number in square brackets, like [1]. If the passages do not answer "
                 "the question, say that you do not know.")


def passage_block(number: int, chunk: Chunk) -> str:
    """How a passage appears in the prompt: ``[n] file, lines a-b:`` then its text."""
    lines = (f"line {chunk.start_line}" if chunk.start_line == chunk.end_line
             else f"lines {chunk.start_line}-{chunk.end_line}")
    return f"[{number}] {chunk.source}, {lines}:\n{chunk.search_text()}"


def rag_messages(question: str, chunks: Sequence[Chunk]) -> list[dict]:
    """The chat messages that ask ``question`` about the numbered ``chunks``."""
    passages = "\n\n".join(passage_block(n, c) for n, c in enumerate(chunks, start=1))
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Passages:\n\n{passages}\n\nQuestion: {question}"}]


def cited_numbers(reply: str, n: int) -> list[int]:
    """The passage numbers 1..n the reply cites as [k] or [k, m] (in order of first citation)."""
    found: list[int] = []
    for group in re.findall(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]", reply):
        for k in map(int, re.split(r"\s*[,;]\s*", group)):
            if 1 <= k <= n and k not in found:
                found.append(k)
    return found


@dataclass
class Answer:
    """A chat model's answer to a question about retrieved passages."""

    text: str
    hits: list[Hit]
    """The passages in the prompt, numbered from 1 (the lowest-ranked may have been left out to fit)."""
    cited: list[int]
    """The numbers of the passages the answer cites."""
    prompt_tokens: int = 0
    new_tokens: int = 0


class Answerer:
    """A chat checkpoint loaded once, answering questions about passages (greedy by default)."""

    def __init__(self, checkpoint: str | Path, chat_template: str | Path | None = None, device: str = "auto",
                 max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 1337,
                 notice: Callable[[str], None] | None = None) -> None:
        from fromzero.checkpoint import load_model
        from fromzero.devices import resolve_device
        from fromzero.inference.chat import load_chat_format
        from fromzero.models.gpt import GPT

        if max_new_tokens < 1:
            raise FromzeroError("--max-new-tokens must be positive")
        if temperature < 0:
            raise FromzeroError("--temperature must be >= 0 (0 = greedy)")
        from fromzero.models.builtin import resolve_model

        checkpoint = resolve_model(checkpoint)  # a built-in name or a .gguf file works too
        self.chat = load_chat_format(checkpoint, chat_template)  # before the weights: fail fast
        self.device = resolve_device(device)
        self.model = load_model(checkpoint, self.device)
        if not isinstance(self.model, GPT):
            raise FromzeroError(f"ask needs a chat model (a GPT); {checkpoint} holds a "
                                f"{type(self.model).__name__}")
        self.model.eval()
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.notice = notice or (lambda message: print(message, file=sys.stderr, flush=True))

    def prompt(self, question: str, hits: list[Hit]) -> tuple[list[int], list[Hit]]:
        """Prompt ids and the passages in it: the lowest-ranked are left out until the prompt leaves
        max_new_tokens of the model's context free."""
        room = self.model.config.block_size - self.max_new_tokens
        kept = list(hits)
        while True:
            ids = self.chat.prompt_ids(rag_messages(question, [h.chunk for h in kept]))
            if len(ids) <= room:
                break
            if len(kept) <= 1:
                raise FromzeroError(
                    f"the question with its best passage needs {len(ids)} tokens, more than the {room} the "
                    f"model's context leaves (block_size {self.model.config.block_size} - --max-new-tokens "
                    f"{self.max_new_tokens}); index shorter passages (--words) or lower --max-new-tokens")
            kept.pop()
        if len(kept) < len(hits):
            self.notice(f"(kept the best {len(kept)} of {len(hits)} passages to fit the model's context)")
        return ids, kept

    def answer(self, question: str, hits: list[Hit]) -> Answer:
        ids, kept = self.prompt(question, hits)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.model.generate(idx, self.max_new_tokens, temperature=self.temperature,
                                      eos_id=list(self.chat.stop_ids), generator=generator, use_cache=True,
                                      lookup_tokens=8 if self.temperature == 0 else None)
        new = out[0, len(ids):].tolist()
        text = self.chat.reply_text(new).strip()
        return Answer(text, kept, cited_numbers(text, len(kept)), len(ids), len(new))
