"""The generation scheduler: one background thread decodes every running request as one batch.

Requests (:class:`Sequence`) enter a bounded waiting queue (:meth:`GenerationEngine.submit`
raises :class:`QueueFull` rather than grow a backlog). The worker loops: **admit** waiting
sequences into free rows of a :class:`~fromzero.models.layers.RaggedKVCache` (each prompt
prefilled alone into its row, its first token sampled); **decode** one token for every running
row in one forward pass, each at its own position; **retire** finished, cancelled and timed-out
sequences, whose rows are free for the next step (continuous batching). Past the context (only
with ``sliding_window``) a sequence continues as ``GPT.generate`` does: each step recomputes its
last ``block_size`` tokens without a cache.

Log-probabilities are the fp32 ``log_softmax`` of the very logits the worker samples from (a
prompt's from its lone prefill, so batching cannot change them). Greedy decoding gives the same
tokens batched as alone (up to float rounding); each sampled sequence draws from its own seeded
``torch.Generator``. Events go out through each sequence's ``on_event`` (on the worker thread):
text deltas once final (text that may begin a stop string is held back), then the finish reason.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fromzero.inference.chat import _settle  # stop strings as `fromzero chat` cuts them
from fromzero.models.gpt import GPT, sample_next_token

log = logging.getLogger("fromzero.serving")

__all__ = ["SamplingParams", "TokenLogprob", "Event", "Sequence", "QueueFull", "GenerationEngine",
           "LOGPROB_CHUNK"]

LOGPROB_CHUNK = 256
"""Prompt positions whose fp32 log-softmax is taken at once (bounds the memory of scoring a long
prompt over a large vocabulary: 256 x 49152 floats = 48 MiB)."""


class QueueFull(Exception):
    """The waiting queue is full: the request is refused (HTTP 503), never queued unbounded."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded."""

    max_tokens: int  # a stop token counts
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # of this sequence's own random generator (None: a random one)
    stop: tuple[str, ...] = ()  # the text ends before the first occurrence of any (not included)
    stop_ids: frozenset[int] = frozenset()  # token ids that end the text (not included in it)
    logprobs: int | None = None
    """Record each generated token's log-probability and this many most likely alternatives
    (None: record nothing; 0: the token's own only). Of the model's distribution, before
    temperature, top-k and top-p."""
    prompt_logprobs: int | None = None
    """Score the prompt too: every prompt token's log-probability given the tokens before it
    (None for the first), with this many alternatives (None: do not score the prompt). The prompt
    must fit the context."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a sequence with its log-probability (fp32 log-softmax of the model's logits)."""

    token: int
    logprob: float | None  # log p(token | the tokens before it); None for a prompt's first token
    top: tuple[tuple[int, float], ...] = ()  # the most likely (token id, logprob) here, most likely first


@dataclass
class Event:
    """What the worker tells a request: new text, and at the end why it finished."""

    text: str = ""  # newly final text since the previous event
    finish_reason: str | None = None  # stop | length when done; error | timeout | shutdown when dropped
    completion_tokens: int = 0  # tokens generated so far
    error: str | None = None  # for error / timeout / shutdown: what went wrong


class Sequence:
    """One prompt being continued: its tokens, text, and how to report progress.

    ``stream``: emit text as it becomes final (else one event with all of it at the end).
    ``cancel()`` may be called from any thread; the worker drops the sequence (and frees its row)
    before its next step. ``deadline`` (``time.monotonic()`` seconds) makes the worker drop it on
    its own too, e.g. when the request handler is gone.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], Any],
                 decode: Callable[[list[int]], str], deadline: float | None = None,
                 stream: bool = True) -> None:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.decode = decode
        self.deadline = deadline
        self.stream = stream  # False: one event at the end with the whole text (no deltas)
        self.ids: list[int] = list(prompt_ids)  # prompt + generated (the window of long sequences)
        self.tokens: list[int] = []  # generated tokens that are part of the text
        self.n_generated = 0  # generated tokens, a final stop token included
        self.text = ""  # decoded text of ``tokens``, cut at a stop string once finished
        self.sent = 0  # characters of ``text`` already emitted
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs
        self.logprobs: list[TokenLogprob] = []  # one per token of ``tokens`` (with params.logprobs)
        self.cancelled = False
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a closed event loop or a broken consumer must not stop the worker
            log.debug("dropping an event of a sequence whose consumer is gone", exc_info=True)

    def fail(self, reason: str, message: str) -> None:
        """End the sequence without more text (error, timeout, shutdown)."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self._emit(Event("", reason, self.n_generated, message))

    def finish_prompt_only(self) -> None:
        """End a sequence with ``max_tokens=0`` after its prompt was scored: no text, reason length."""
        if self.finish_reason is None:
            self._finish("length")

    def add_token(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token (and its log-probability): extend the text, detect stops, emit
        what is final."""
        self.n_generated += 1
        self.ids.append(token)
        if token in self.params.stop_ids:
            self._finish("stop")
            return
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if not self.stream and not self.params.stop:
            # Nobody reads partial text and no stop string can end it: decode once, at the end.
            if self.n_generated >= self.params.max_tokens:
                self._finish("length")
            return
        self.text, final, stopped = _settle(self.decode(self.tokens), self.params.stop)
        if stopped or self.n_generated >= self.params.max_tokens:
            self._finish("stop" if stopped else "length", decoded=True)
        elif self.stream and final > self.sent:
            delta, self.sent = self.text[self.sent : final], final
            self._emit(Event(delta, None, self.n_generated))

    def _finish(self, reason: str, decoded: bool = False) -> None:
        if not decoded:
            self.text = self.decode(self.tokens)
        self.finish_reason = reason
        delta, self.sent = self.text[self.sent :], len(self.text)
        self._emit(Event(delta, reason, self.n_generated))


@dataclass
class EngineStats:
    """Counters the engine updates (the HTTP layer exports them as Prometheus metrics)."""

    on_batch: Callable[[int], Any] = lambda n: None
    """Called with the number of sequences of every decoding step (prefills are not counted)."""
    on_tokens: Callable[[int], Any] = lambda n: None
    """Called with the number of tokens generated by a step."""
    steps: int = 0
    max_batch: int = 0
    batch_counts: collections.Counter = field(default_factory=collections.Counter)


class GenerationEngine:
    """Batches concurrent generation requests for one GPT on one background thread."""

    def __init__(self, model: GPT, *, max_batch_size: int = 8, max_queue: int = 64,
                 sliding_window: bool = False, stats: EngineStats | None = None) -> None:
        if max_batch_size <= 0 or max_queue < 0:
            raise ValueError("max_batch_size must be positive and max_queue >= 0")
        self.model = model.eval()
        self.device = model.transformer.ln_f.weight.device  # (wte may be a quantized tensor)
        if self.device.type == "cpu":
            # fp32 one-token steps of 1 or 8 rows read column-major weights faster on CPU (see
            # GPT.use_decode_layout).
            model.use_decode_layout(True)
        self.block_size = model.config.block_size
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.sliding_window = sliding_window
        self.stats = stats or EngineStats()
        self.cache = model.new_ragged_cache(max_batch_size)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cond = threading.Condition()
        self._cached: list[Sequence] = []  # row r of the ragged cache decodes _cached[r]
        self._windowed: list[Sequence] = []  # past the context: the window is recomputed each step
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the client side (any thread) ------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a row."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences being decoded."""
        return len(self._cached) + len(self._windowed)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue ``sequences`` (all or none). Raises QueueFull when they do not fit the queue,
        ValueError for a prompt longer than the context (or, without ``sliding_window``, a prompt
        + max_tokens that does not fit it)."""
        for seq in sequences:
            n, new = len(seq.prompt_ids), seq.params.max_tokens
            if n > self.block_size or (not self.sliding_window and n + new > self.block_size):
                raise ValueError(f"{n} prompt tokens + {new} new tokens do not fit the context of "
                                 f"{self.block_size} tokens")
            if new < 0 or (new == 0 and seq.params.prompt_logprobs is None):
                raise ValueError(f"max_tokens must be >= 1 (or 0 to score the prompt only), got {new}")
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            # Free batch rows take requests at once; beyond them, max_queue may wait.
            free_rows = max(0, self.max_batch_size - self.running)
            if len(self._waiting) + len(sequences) > self.max_queue + free_rows:
                raise QueueFull(f"the queue is full ({len(self._waiting)} waiting, {self.max_queue} allowed)")
            self._waiting.extend(sequences)
            self._cond.notify()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fromzero-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; sequences still queued or running end with finish reason shutdown."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in [*self._waiting, *self._cached, *self._windowed]:
            seq.fail("shutdown", "the server is shutting down")
        self._waiting.clear()

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self.running:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = []
                while self._waiting and self.running + len(admitted) < self.max_batch_size:
                    admitted.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    for seq in admitted:
                        self._prefill(seq)
                    self._retire()
                    if self.running:
                        self._step()
                        self._retire()
            except Exception as e:  # never let one failure stop serving: drop the batch, go on
                log.exception("generation step failed")
                failed = [*self._cached, *self._windowed]
                self._cached.clear()
                self._windowed.clear()
                self.cache.lengths.clear()
                for seq in failed:
                    seq.fail("error", f"generation failed: {type(e).__name__}: {e}")

    def _prefill(self, seq: Sequence) -> None:
        """Run the prompt into a fresh cache row and sample the first token."""
        if seq.cancelled or seq.done:
            return
        if seq.deadline is not None and time.monotonic() > seq.deadline:
            seq.fail("timeout", "the request timed out while waiting for a batch slot")
            return
        p = seq.params
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else secrets.randbits(63)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        ids = torch.tensor([seq.prompt_ids[-self.block_size :]], dtype=torch.long, device=self.device)
        r = self.cache.append_row()
        score = p.prompt_logprobs is not None
        try:
            row = self.cache.row(r)
            # Scoring the prompt needs every position's logits; generating only the last one's.
            logits, _ = self.model(ids, kv_cache=row, last_only=not score)  # (1, T or 1, V)
            self.cache.lengths[r] = row.length
            if score:
                seq.prompt_logprobs = prompt_logprobs(logits[0], ids[0], p.prompt_logprobs or 0)
        except Exception as e:
            self.cache.remove_row(r)
            seq.fail("error", f"prefill failed: {type(e).__name__}: {e}")
            return
        if p.max_tokens == 0:  # scored the prompt; nothing to generate
            self.cache.remove_row(r)
            seq.finish_prompt_only()
            return
        self._cached.append(seq)
        self._accept([seq], logits[:, -1, :])

    def _step(self) -> None:
        """One token for every running sequence."""
        # A row whose cache holds the whole context continues on the recomputed window (as
        # GPT.generate does past block_size: every position shifts, cached keys go stale).
        for r in reversed(range(len(self._cached))):
            if self.cache.lengths[r] >= self.block_size:
                self._windowed.append(self._cached[r])
                self._free_row(r)
        seqs: list[Sequence] = []
        parts: list[torch.Tensor] = []
        if self._cached:
            idx = torch.tensor([[s.ids[-1]] for s in self._cached], dtype=torch.long, device=self.device)
            logits, _ = self.model(idx, kv_cache=self.cache, last_only=True)  # (B, 1, V)
            parts.append(logits[:, -1, :])
            seqs += self._cached
        if self._windowed:
            idx = torch.tensor([s.ids[-self.block_size :] for s in self._windowed], dtype=torch.long,
                               device=self.device)
            logits, _ = self.model(idx, last_only=True)
            parts.append(logits[:, -1, :])
            seqs += self._windowed
        self._record(len(seqs))
        self._accept(seqs, torch.cat(parts) if len(parts) > 1 else parts[0])

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token per row of ``logits`` (B, V) and hand it to its sequence."""
        tokens = logits.argmax(dim=-1).tolist()  # greedy rows (and a placeholder for the others)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature > 0:
                tokens[i] = int(sample_next_token(logits[i : i + 1], p.temperature, p.top_k, p.top_p,
                                                  seq.generator)[0])
        self.stats.on_tokens(len(seqs))
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            if not seq.done:
                n_top = seq.params.logprobs
                seq.add_token(int(token), None if n_top is None else token_logprob(logits[i], int(token), n_top))

    def _retire(self) -> None:
        """Free the rows of finished, cancelled and timed-out sequences."""
        now = time.monotonic()
        for seq in [*self._cached, *self._windowed]:
            if not seq.done and seq.deadline is not None and now > seq.deadline:
                seq.fail("timeout", "the request timed out")
        for r in reversed(range(len(self._cached))):
            seq = self._cached[r]
            if seq.done or seq.cancelled:
                self._free_row(r)
        self._windowed = [s for s in self._windowed if not (s.done or s.cancelled)]

    def _free_row(self, r: int) -> None:
        moved = self.cache.remove_row(r)  # the last row moves into r
        self._cached[r] = self._cached[moved]
        self._cached.pop()

    def _record(self, batch: int) -> None:
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, batch)
        self.stats.batch_counts[batch] += 1
        self.stats.on_batch(batch)


def token_logprob(logits: torch.Tensor, token: int, n_top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` (V,) and the ``n_top`` most likely tokens (fp32)."""
    lp = logits.float().log_softmax(dim=-1)
    top = lp.topk(min(n_top, lp.numel())) if n_top > 0 else None
    return TokenLogprob(token, float(lp[token]),
                        () if top is None else tuple(zip(top.indices.tolist(), top.values.tolist())))


def prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, n_top: int) -> list[TokenLogprob]:
    """Every prompt token's log-probability given the ones before it (None for the first) and the
    ``n_top`` most likely tokens at its position. ``logits``: (T, V) of the prompt ``ids`` (T,).

    fp32 log-softmax, :data:`LOGPROB_CHUNK` positions at a time.
    """
    out = [TokenLogprob(int(ids[0]), None, ())]
    for start in range(0, ids.numel() - 1, LOGPROB_CHUNK):
        end = min(start + LOGPROB_CHUNK, ids.numel() - 1)
        lp = logits[start:end].float().log_softmax(dim=-1)  # predicts tokens start+1 .. end
        targets = ids[start + 1 : end + 1]
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        if n_top > 0:
            top = lp.topk(min(n_top, lp.size(-1)), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            tops = [()] * (end - start)
        out += [TokenLogprob(t, c, k) for t, c, k in zip(targets.tolist(), chosen, tops)]
    return out
