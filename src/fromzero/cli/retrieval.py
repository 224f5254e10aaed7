"""``fromzero index`` and ``fromzero ask``: retrieval over a user's documents, answers that cite them."""

from __future__ import annotations

import argparse
from pathlib import Path

from fromzero.cli import _OWN_DEFAULT, _add_parser
from fromzero.errors import FromzeroError

_INDEX_CONFIG = "fromzero.inference.retrieval:IndexConfig"


def _add_index(sub: argparse._SubParsersAction) -> None:
    from fromzero.options import config_fields  # reads the source: no torch import for --help

    ix = _add_parser(
        sub, "index", "index documents for retrieval: passages with line numbers, MiniLM embeddings, BM25",
        func=_cmd_index,
        description="Read text files and folders (a folder: its .txt, .md, .markdown, .rst and .text files; "
        "a file: whatever its name;\n`shakespeare`: the built-in corpus), cut them into passages that "
        "remember their file and lines, embed\nevery passage with a sentence encoder (all-MiniLM-L6-v2 by "
        "default) and write the index folder:\nchunks.jsonl, embeddings.safetensors, info.json (encoder, "
        "chunking, counts, sha256 of every source).\n`fromzero ask` searches it (dense, BM25 or both fused) "
        "and answers with a chat model.\n\nexamples:\n  fromzero index notes/ README.md --out my-index\n"
        "  fromzero index shakespeare --chunking speeches --out shakespeare-index",
    )
    ix.add_argument("docs", nargs="+", metavar="DOCS", help="text files, folders, or shakespeare")
    ix.add_argument("--out", required=True, help="the index folder to write")
    for name, default, doc in config_fields(_INDEX_CONFIG):
        ix.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(default), default=default,
                        help=doc)
    ix.add_argument("--force", action="store_true", help="replace an existing index folder")
    ix.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_ask(sub: argparse._SubParsersAction) -> None:
    ask = _add_parser(
        sub, "ask", "answer a question from an index with a chat model, citing the passages (file:lines)",
        func=_cmd_ask,
        description="Retrieve the passages of an index (`fromzero index`) that best match the question and, "
        "with --checkpoint, give\nthem numbered to a chat model, which answers from them and cites them as "
        "[n]; the answer is printed,\nthen the passages it cites (file:lines). Without --checkpoint: the "
        "retrieved passages only.\nRetrievers: dense (cosine similarity of MiniLM embeddings; faiss when "
        "installed), bm25, hybrid (both,\nby reciprocal rank fusion).\n\nexamples:\n"
        "  fromzero ask --index my-index 'How do I reset the cache?'\n  fromzero ask --index shakespeare-index --checkpoint smollm2-135m-instruct "
        "\"Who says 'To be, or not to be'?\"",
    )
    ask.add_argument("question", help="the question")
    ask.add_argument("--index", required=True, help="index folder written by `fromzero index`")
    ask.add_argument("--checkpoint", default=None,
                     help="chat model that answers (a checkpoint directory with a chat template, a .gguf "
                     "file, or smollm2-135m-instruct); without it, print the retrieved passages (default: "
                     "none)" + _OWN_DEFAULT)
    ask.add_argument("--retriever", default="hybrid", choices=("dense", "bm25", "hybrid"),
                     help="how to search")
    ask.add_argument("--top-k", type=int, default=5, help="passages to retrieve (and give the chat model)")
    ask.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    ask.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    ask.add_argument("--seed", type=int, default=1337, help="random seed (with --temperature > 0)")
    ask.add_argument("--chat-template", metavar="FILE", default=None,
                     help="a Jinja chat template instead of the checkpoint's own (default: the checkpoint's)"
                     + _OWN_DEFAULT)
    ask.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")


def _cmd_index(args: argparse.Namespace) -> int:
    from fromzero.inference.retrieval import IndexConfig, build_index

    cfg = IndexConfig(chunking=args.chunking, words=args.words, overlap=args.overlap, model=args.model,
                      batch_size=args.batch_size, device=args.device)
    info = build_index(args.docs, Path(args.out), cfg, force=args.force, progress=not args.quiet)
    counts = info["counts"]
    print(f"indexed {counts['chunks']:,} passages ({counts['words']:,} words) from {counts['documents']:,} "
          f"documents -> {args.out} (chunking {args.chunking}, encoder {args.model}, "
          f"dim {info['model']['dim']})")
    empty = [s["path"] for s in info["sources"] if not s["chunks"]]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        print(f"note: no passages from {shown}")
    if counts["truncated_chunks"]:
        print(f"note: {counts['truncated_chunks']:,} passages are longer than the encoder's "
              f"{info['model']['max_tokens']} tokens and were embedded from their start (lower --words)")
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from fromzero.inference.retrieval import Answerer, RetrievalIndex, passage_block

    if args.top_k < 1:
        raise FromzeroError("--top-k must be >= 1")
    if not args.question.strip():
        raise FromzeroError("the question is empty")
    if args.checkpoint is None and args.chat_template:
        raise FromzeroError("--chat-template goes with --checkpoint")
    index = RetrievalIndex.load(args.index)
    # the chat model is loaded (and checked) before searching: a bad checkpoint fails fast
    answerer = (Answerer(args.checkpoint, args.chat_template, args.device, args.max_new_tokens,
                         args.temperature, args.seed) if args.checkpoint else None)
    hits = index.search([args.question], args.retriever, args.top_k)[0]
    if answerer is None:
        for hit in hits:
            print(f"{passage_block(hit.rank, hit.chunk)}\n({args.retriever} score {hit.score:.4f})\n")
        return 0
    answer = answerer.answer(args.question, hits)
    print(answer.text)
    print()
    if answer.cited:
        print("sources:")
        for n in answer.cited:
            print(f"  [{n}] {answer.hits[n - 1].chunk.citation}")
    else:
        print("sources: the answer cites no passage; it was given:")
        for n, hit in enumerate(answer.hits, start=1):
            print(f"  [{n}] {hit.chunk.citation}")
    return 0


# verb -> the function that adds its parser (cli.build_parser calls them in --help order)
PARSERS = {"index": _add_index, "ask": _add_ask}
