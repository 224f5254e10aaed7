"""Retrieval QA on Shakespeare: who speaks a line, and in which play?

    .venv/bin/python benchmarks/retrieval_qa.py                  # 1,000 questions, 50 answered by SmolLM2
    .venv/bin/python benchmarks/retrieval_qa.py --limit 100      # quick: 100 questions, 10 answered

The protocol is :mod:`fromzero.inference.retrieval_eval`'s docstring: every speech of the built-in
corpus is indexed (``fromzero index shakespeare --chunking speeches``, built once into --index);
1,000 lines drawn (seed 0) from the speeches of the 36 First Folio plays are asked as ``Who speaks
the line "..." and in which play?``. Reported:

* retrieval recall@1/@5/@10 of MiniLM (dense cosine), BM25 and their reciprocal rank fusion;
* "read off the top passage": the top passage's speaker and play as the answer (both right);
* a chat model (SmolLM2-135M-Instruct by default) given the top --chat-top-k passages of
  --chat-retriever, answering --chat-n of the questions (evenly spaced over the 1,000): speaker
  right, play right, both, and whether it cited a passage holding the line; seconds per answer.

Prints a table and writes benchmarks/results/retrieval_qa.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from fromzero.inference.retrieval import (  # noqa: E402
    FUSION_DEPTH,
    Answerer,
    Hit,
    IndexConfig,
    RetrievalIndex,
    build_index,
    reciprocal_rank_fusion,
)
from fromzero.inference.retrieval_eval import (  # noqa: E402
    play_named,
    question_text,
    read_off_right,
    recall_at,
    retrieved_right,
    shakespeare_line_questions,
    speaker_named,
)

KS = (1, 5, 10)


def open_index(path: Path, progress: bool) -> tuple[RetrievalIndex, float | None]:
    """The speeches index at ``path``, built first if missing (returns the build time then)."""
    seconds = None
    if not path.exists():
        t0 = time.perf_counter()
        build_index(["shakespeare"], path, IndexConfig(chunking="speeches"), progress=progress)
        seconds = time.perf_counter() - t0
    index = RetrievalIndex.load(path)
    if index.info["chunking"]["mode"] != "speeches":
        raise SystemExit(f"{path} is not a speeches index; pass another --index")
    return index, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default=str(ROOT / "runs" / "retrieval-qa" / "shakespeare-speeches"),
                        help="speeches index folder (built if missing)")
    parser.add_argument("--n", type=int, default=1000, help="questions for retrieval")
    parser.add_argument("--chat-n", type=int, default=50, help="questions answered by the chat model (0: none)")
    parser.add_argument("--limit", type=int, default=None,
                        help="quick run: this many questions, a tenth of them answered")
    parser.add_argument("--checkpoint", default="smollm2-135m-instruct", help="chat model")
    parser.add_argument("--chat-retriever", default="hybrid", choices=("dense", "bm25", "hybrid"))
    parser.add_argument("--chat-top-k", type=int, default=3, help="passages in the chat model's prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the question draw")
    parser.add_argument("--chat-only", action="store_true",
                        help="retrieve for the --chat-n answered questions only (no recall table)")
    parser.add_argument("--query", default="question", choices=("question", "line"),
                        help="what the retrievers search with: the whole question (as `ask`) or the quoted line")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retrieval_qa.json"))
    args = parser.parse_args()
    if args.limit is not None:
        args.n, args.chat_n = args.limit, min(args.chat_n, max(1, args.limit // 10))
    torch.manual_seed(0)

    index, build_s = open_index(Path(args.index), not args.quiet)
    questions = shakespeare_line_questions(args.n, seed=args.seed)
    picked = [int(i * len(questions) / args.chat_n) for i in range(args.chat_n)] if args.chat_n > 0 else []
    if args.chat_only:
        questions = [questions[i] for i in picked]
        picked = list(range(len(questions)))
    texts = [question_text(q) for q in questions]
    queries = texts if args.query == "question" else [q.line for q in questions]
    depth = max(FUSION_DEPTH, max(KS))

    t0 = time.perf_counter()
    dense = index.dense_rankings(index.embed_queries(queries), depth)
    dense_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.bm25()
    bm25_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse = index.bm25_rankings(queries, depth)
    bm25_s = time.perf_counter() - t0
    fused = [reciprocal_rank_fusion([[i for i, _ in d], [i for i, _ in s]]) for d, s in zip(dense, sparse)]
    rankings = {"MiniLM (dense)": dense, "BM25": sparse, "fused (RRF)": fused}

    retrieval = {}
    for name, ranked in rankings.items():
        chunks = [[index.chunks[i] for i, _ in rows[:max(KS)]] for rows in ranked]
        retrieval[name] = {f"recall@{k}": recall_at(chunks, questions, k) for k in KS}
        retrieval[name]["read_off_top_passage"] = (
            sum(read_off_right(c[0], q) for c, q in zip(chunks, questions)) / len(questions))

    chat: dict = {}
    if picked:
        answerer = Answerer(args.checkpoint, device="cpu", max_new_tokens=args.max_new_tokens,
                            notice=lambda message: None)
        source = {"dense": dense, "bm25": sparse, "hybrid": fused}[args.chat_retriever]
        rows, seconds = [], []
        for n, i in enumerate(picked, start=1):
            q = questions[i]
            hits = [Hit(r, j, index.chunks[j], s) for r, (j, s) in enumerate(source[i][:args.chat_top_k], start=1)]
            t0 = time.perf_counter()
            answer = answerer.answer(texts[i], hits)
            seconds.append(time.perf_counter() - t0)
            rows.append({
                "question": texts[i], "gold": {"speaker": q.speaker, "play": q.play, "citation": f"{q.source}:{q.line_no}"},
                "reply": answer.text, "speaker_right": speaker_named(answer.text, q), "play_right": play_named(answer.text, q),
                "cited": [answer.hits[k - 1].chunk.citation for k in answer.cited],
                "cited_right": any(retrieved_right(answer.hits[k - 1].chunk, q) for k in answer.cited),
                "retrieved_right": any(retrieved_right(h.chunk, q) for h in answer.hits),
                "read_off_right": read_off_right(hits[0].chunk, q),
                "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens,
            })
            if not args.quiet:
                print(f"  [{n}/{len(picked)}] {seconds[-1]:.1f}s  speaker {rows[-1]['speaker_right']!s:5} "
                      f"play {rows[-1]['play_right']!s:5}  {answer.text[:90]!r}", file=sys.stderr, flush=True)
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        chat = {
            "checkpoint": args.checkpoint, "retriever": args.chat_retriever, "top_k": args.chat_top_k, "n": len(rows),
            "speaker_right": mean("speaker_right"), "play_right": mean("play_right"),
            "both_right": sum(r["speaker_right"] and r["play_right"] for r in rows) / len(rows),
            "cited_right": mean("cited_right"), "retrieved_right": mean("retrieved_right"),
            "read_off_right": mean("read_off_right"),
            "seconds_per_answer": sum(seconds) / len(seconds),
            "prompt_tokens_mean": mean("prompt_tokens"), "new_tokens_mean": mean("new_tokens"),
            "rows": rows,
        }

    result = {
        "n_questions": len(questions), "seed": args.seed, "query": args.query, "chat_only": args.chat_only, "index": str(args.index), "index_info": {
            k: index.info[k] for k in ("model", "chunking", "counts")},
        "index_build_seconds": build_s, "dense_backend": index.dense_backend,
        "seconds": {"dense_queries": dense_s, "bm25_build": bm25_build_s, "bm25_queries": bm25_s},
        "retrieval": retrieval, "chat": chat,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    counts = index.info["counts"]
    print(f"index: {counts['chunks']:,} speeches of {counts['documents']} files (MiniLM, dim "
          f"{index.info['model']['dim']}); {len(questions):,} questions (seed {args.seed})")
    print(f"{'retriever':<16}" + "".join(f"{'R@' + str(k):>8}" for k in KS) + f"{'read-off':>10}")
    for name, r in retrieval.items():
        print(f"{name:<16}" + "".join(f"{r[f'recall@{k}']:>8.3f}" for k in KS) + f"{r['read_off_top_passage']:>10.3f}")
    print(f"times: dense {dense_s:.1f} s, BM25 {bm25_s:.1f} s (+{bm25_build_s:.1f} s statistics) for "
          f"{len(questions):,} questions")
    if chat:
        print(f"chat ({chat['checkpoint']}, {chat['retriever']} top-{chat['top_k']}, n={chat['n']}): speaker "
              f"{chat['speaker_right']:.3f}  play {chat['play_right']:.3f}  both {chat['both_right']:.3f}  cited right "
              f"{chat['cited_right']:.3f}  (read-off on these: {chat['read_off_right']:.3f}; "
              f"{chat['seconds_per_answer']:.1f} s/answer)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
