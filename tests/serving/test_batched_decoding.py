"""Batched decoding of prompts of different lengths equals decoding each alone.

Model level: ``GPT.forward`` with a ``RaggedKVCache`` (rows at their own positions, joining and
leaving between steps) gives the logits and greedy tokens of ``GPT.generate`` on each prompt
alone, for learned positions and for RoPE + grouped-query attention.
Engine level: ``GenerationEngine`` (continuous batching, stop tokens and strings, sliding window
past the context, seeded sampling) without HTTP.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest
import torch

from fromzero.data.tokenizers import TextTokenizer
from fromzero.inference.chat import _holdback
from fromzero.serving.engine import Event, GenerationEngine, QueueFull, SamplingParams, Sequence
from fromzero.checkpoint import load_model

PROMPTS = ["hello", "a", "The cat sat on the mat.", "Who is there?", "xy", "Nay, answer me: stand"]


@pytest.fixture(params=["learned", "rope"])
def model_and_tokenizer(request, gpt_ckpt: Path, rope_ckpt: Path):
    ckpt = gpt_ckpt if request.param == "learned" else rope_ckpt
    return load_model(ckpt, "cpu"), TextTokenizer.load(ckpt)


def alone(model, ids: list[int], n: int, eos: list[int] | None = None) -> list[int]:
    out = model.generate(torch.tensor([ids]), n, temperature=0, eos_id=eos)[0, len(ids):].tolist()
    model.use_decode_layout(False)  # generate() may switch layouts; compare on the default one
    return out


@torch.no_grad()
def test_ragged_cache_rows_join_and_leave_and_match_single_sequences(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    n_new = [9, 4, 8, 6, 9, 5]  # rows finish at different steps: rows move (compaction)
    expected = [alone(model, ids, n) for ids, n in zip(prompts, n_new)]
    assert len({tuple(e) for e in expected}) == len(expected)  # varied outputs: the check means something

    cache = model.new_ragged_cache(4)  # fewer rows than prompts: later ones wait for a free row
    outs: list[list[int]] = [[] for _ in prompts]
    rows: list[int] = []  # prompt index of each cache row
    waiting = list(range(len(prompts)))
    max_rows = 0
    while waiting or rows:
        if waiting and cache.rows < cache.max_rows:  # one new row per step joins the running batch
            i = waiting.pop(0)
            r = cache.append_row()
            row = cache.row(r)
            logits, _ = model(torch.tensor([prompts[i]]), kv_cache=row, last_only=True)
            cache.lengths[r] = row.length
            single, _ = model(torch.tensor([prompts[i]]))
            torch.testing.assert_close(logits[0, -1], single[0, -1])
            outs[i].append(int(logits[0, -1].argmax()))
            rows.append(i)
        for r in reversed(range(len(rows))):  # retire finished rows
            if len(outs[rows[r]]) >= n_new[rows[r]]:
                moved = cache.remove_row(r)
                rows[r] = rows[moved]
                rows.pop()
        if not rows:
            continue
        max_rows = max(max_rows, len(rows))
        idx = torch.tensor([[outs[i][-1]] for i in rows])
        logits, _ = model(idx, kv_cache=cache, last_only=True)
        # Each row's logits equal a full forward pass over that sequence alone.
        for r, i in enumerate(rows):
            full, _ = model(torch.tensor([prompts[i] + outs[i]]))
            torch.testing.assert_close(logits[r, -1], full[0, -1], atol=1e-5, rtol=1e-5)
            outs[i].append(int(logits[r, -1].argmax()))
    assert max_rows == 4
    assert [o[: len(e)] for o, e in zip(outs, expected)] == expected


def test_ragged_cache_rejects_a_wrong_batch_and_overflow(gpt_ckpt: Path):
    model = load_model(gpt_ckpt, "cpu")
    cache = model.new_ragged_cache(2)
    cache.append_row()
    with pytest.raises(ValueError, match="ragged cache with 1 rows"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    cache.lengths[0] = model.config.block_size
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    cache.append_row()
    with pytest.raises(ValueError, match="full"):
        cache.append_row()


# ---------------------------------------------------------------------------------------------
# Engine


class Collector:
    """Events of one sequence, delivered from the worker thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def result(self, timeout: float = 30) -> tuple[str, str, int, list[Event]]:
        got, text = [], ""
        while True:
            event = self.events.get(timeout=timeout)
            got.append(event)
            text += event.text
            if event.finish_reason is not None:
                return text, event.finish_reason, event.completion_tokens, got


def run_engine(model, tok, jobs: list[tuple[list[int], SamplingParams]], **kw) -> tuple[list, GenerationEngine]:
    engine = GenerationEngine(model, **kw)
    collectors = [Collector() for _ in jobs]
    seqs = [Sequence(ids, p, c, tok.decode) for (ids, p), c in zip(jobs, collectors)]
    engine.submit(seqs)  # all at once, before the worker starts: they share the first batches
    engine.start()
    try:
        return [c.result() for c in collectors], engine
    finally:
        engine.stop()


def test_engine_greedy_batch_equals_each_prompt_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    n_new = [12, 3, 7, 12, 1, 9]
    expected = [tok.decode(alone(model, ids, n)) for ids, n in zip(prompts, n_new)]
    results, engine = run_engine(model, tok, [(ids, SamplingParams(max_tokens=n, temperature=0))
                                             for ids, n in zip(prompts, n_new)], max_batch_size=4)
    assert [r[0] for r in results] == expected
    assert [(r[1], r[2]) for r in results] == [("length", n) for n in n_new]
    assert engine.stats.max_batch == 4  # the batch really was shared (and capped at max_batch_size)
    assert engine.running == 0 and engine.cache.rows == 0  # every row freed


def test_engine_stop_token_and_stop_strings(gpt_ckpt: Path):
    model, tok = load_model(gpt_ckpt, "cpu"), TextTokenizer.load(gpt_ckpt)
    ids = tok.encode("hello")
    free = alone(model, ids, 12)
    text = tok.decode(free)
    stop_tok = free[4]
    first = free.index(stop_tok)
    stop_str = text[5:7]
    cut = text.index(stop_str)
    results, _ = run_engine(model, tok, [
        (ids, SamplingParams(max_tokens=12, temperature=0, stop_ids=frozenset({stop_tok}))),
        (ids, SamplingParams(max_tokens=12, temperature=0, stop=("@@", stop_str))),
    ])
    assert results[0][:3] == (tok.decode(free[:first]), "stop", first + 1)  # the stop token counts, not shown
    assert results[1][:2] == (text[:cut], "stop")
    # No event ever showed text past the stop string (held back while it could be one).
    assert "".join(e.text for e in results[1][3]) == text[:cut]


def test_holdback_keeps_possible_stop_starts_and_partial_characters():
    assert _holdback("abc\n", ("\n\n",)) == 1
    assert _holdback("abc", ("\n\n",)) == 0
    assert _holdback("the en", ("end.", "xx")) == 2
    assert _holdback("caf\ufffd", ()) == 1


def test_engine_sliding_window_matches_generate_past_the_context(gpt_ckpt: Path):
    model, tok = load_model(gpt_ckpt, "cpu"), TextTokenizer.load(gpt_ckpt)
    block = model.config.block_size
    prompts = [tok.encode("The cat sat on the mat."), tok.encode("hi")]
    n = block + 8  # both cross the context: the recomputed-window path, batched
    expected = [tok.decode(alone(model, ids, n)) for ids in prompts]
    results, _ = run_engine(model, tok, [(ids, SamplingParams(max_tokens=n, temperature=0)) for ids in prompts],
                            sliding_window=True)
    assert [r[0] for r in results] == expected


def test_engine_seeded_sampling_is_the_same_batched_or_alone(gpt_ckpt: Path):
    model, tok = load_model(gpt_ckpt, "cpu"), TextTokenizer.load(gpt_ckpt)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    ids = tok.encode("hello")
    (alone_result,), _ = run_engine(model, tok, [(ids, p)])
    batched, _ = run_engine(model, tok, [(tok.encode("abc"), SamplingParams(max_tokens=10, temperature=0.8, seed=1)),
                                         (ids, p), (ids, SamplingParams(max_tokens=10, temperature=1.0, seed=8))])
    assert batched[1][0] == alone_result[0]
    assert batched[2][0] != alone_result[0]  # another seed, another text


def test_engine_queue_is_bounded_and_cancel_frees_the_row(gpt_ckpt: Path):
    model, tok = load_model(gpt_ckpt, "cpu"), TextTokenizer.load(gpt_ckpt)
    engine = GenerationEngine(model, max_batch_size=1, max_queue=2, sliding_window=True)
    ids = tok.encode("hi")
    gate = threading.Event()
    long = Collector()

    def on_event(event: Event) -> None:
        gate.set()
        long(event)

    seqs = [Sequence(ids, SamplingParams(max_tokens=100000, temperature=0), on_event, tok.decode)]
    seqs += [Sequence(ids, SamplingParams(max_tokens=3, temperature=0), c, tok.decode) for c in (Collector(),)]
    engine.submit(seqs)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit([Sequence(ids, SamplingParams(max_tokens=1), Collector(), tok.decode)] * 2)
    engine.start()
    try:
        assert gate.wait(30)
        seqs[0].cancel()
        text, reason, n, _ = seqs[1].on_event.result()  # the waiting one gets the freed row
        assert (reason, n) == ("length", 3)
        deadline = time.monotonic() + 10  # its row is freed right after its last event
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seqs[0].n_generated < 100000 and engine.running == 0 and engine.cache.rows == 0
    finally:
        engine.stop()


def test_engine_refuses_what_does_not_fit_the_context(gpt_ckpt: Path):
    model, tok = load_model(gpt_ckpt, "cpu"), TextTokenizer.load(gpt_ckpt)
    block = model.config.block_size
    ids = tok.encode("x" * (block - 4))
    for sliding, params, ok in ((False, SamplingParams(max_tokens=4), True), (False, SamplingParams(max_tokens=5), False),
                                (True, SamplingParams(max_tokens=500), True)):
        engine = GenerationEngine(model, sliding_window=sliding)
        seq = Sequence(ids, params, Collector(), tok.decode)
        if ok:
            engine.submit([seq])
        else:
            with pytest.raises(ValueError, match=f"do not fit the context of {block} tokens"):
                engine.submit([seq])
    with pytest.raises(ValueError, match="do not fit"):
        GenerationEngine(model, sliding_window=True).submit(
            [Sequence(ids + ids, SamplingParams(max_tokens=1), Collector(), tok.decode)])
