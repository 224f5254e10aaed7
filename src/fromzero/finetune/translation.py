"""Train an encoder-decoder Transformer to translate token sequences (task ``translation``).

Data: ``cmudict-g2p`` (built in: spelling -> ARPAbet pronunciation, see
:mod:`fromzero.data.g2p`), or pairs in a ``.tsv`` (``source<TAB>target`` per line) or ``.jsonl``
(``{"source": ..., "target": ...}``) file, or a folder with ``train`` / ``val`` / ``test`` files of
one of those kinds. A source seen several times with different targets has several references
(counted right if the output equals any of them). Sources and targets are read as characters
(``tokens: chars``) or whitespace-separated tokens (``words``); the vocabularies come from the
training split (``<unk>`` for the rest) and are saved with the checkpoint (``vocab.json``).

Model: :class:`fromzero.models.seq2seq.Seq2Seq` from scratch (model.* keys), or ``init_from`` a
fromzero seq2seq checkpoint that continues training with its own vocabulary. A Marian model
converted from Hugging Face (``fromzero convert from-hf``) keeps its SentencePiece tokenizer and
translates with it (:class:`MarianVocab`); fine-tuning one is not supported yet. Loss: token cross-entropy (optional label smoothing), tokens weigh the mean.

Metrics, on val every evaluation (greedy decoding of up to ``eval_limit`` sources) and once on
test with the best weights (beam search, ``num_beams`` and ``length_penalty``): ``wer`` (share of
outputs that equal none of their references: the word error rate of G2P), ``per`` (token edit
distance to the closest reference over its length: the phoneme error rate), and on test chrF and
BLEU (sacrebleu, over tokens joined by spaces) and ``loss``. Try it::

    fromzero finetune --config recipes/g2p-transformer.yaml
    fromzero translate --checkpoint runs/latest/checkpoints/best --text table --text phoneme
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError
from fromzero.finetune.engine import FinetuneConfig, FinetuneTask, run_finetune_task
from fromzero.training.trainer import FitResult, ShuffledEpochs

VOCAB_FILE = "vocab.json"
MARIAN_SOURCE_SPM = "source.spm"  # a converted Marian model's own tokenizer (see MarianVocab)
SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 on both sides
PAD, EOS, UNK = 0, 1, 2
TOKENIZATIONS = ("chars", "words")

Pairs = list[tuple[str, list[str]]]
"""(source, its reference targets)."""


@dataclass
class TranslationConfig(FinetuneConfig):
    """Training a sequence-to-sequence Transformer (translation, grapheme-to-phoneme)."""

    RECIPE_KEYS: ClassVar[dict[str, str]] = {
        "data": "data.source", "stress": "data.stress", "source_tokens": "data.source_tokens",
        "target_tokens": "data.target_tokens", "max_length": "data.max_length", "d_model": "model.d_model",
        "n_head": "model.n_head", "encoder_layers": "model.encoder_layers", "decoder_layers": "model.decoder_layers",
        "ffn_dim": "model.ffn_dim", "activation": "model.activation", "dropout": "model.dropout",
        "attention_dropout": "model.attention_dropout", "activation_dropout": "model.activation_dropout",
        "share_embeddings": "model.share_embeddings"}
    UNUSED_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"method", "unfreeze_top", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"})

    data: str = "cmudict-g2p"
    """cmudict-g2p (built in) | a .tsv / .jsonl file of source-target pairs | a folder with train/val/test files."""
    stress: bool = False
    """cmudict-g2p: keep stress digits (69 phonemes instead of 39)."""
    source_tokens: str = "chars"
    """How sources are split into tokens: chars | words (whitespace-separated)."""
    target_tokens: str = "words"
    """How targets are split into tokens: chars | words (cmudict-g2p: phonemes are words)."""
    max_length: int = 64
    """Longest source or target in tokens (+ end token); longer training pairs are dropped, with a note."""
    d_model: int = 256
    """Width of the encoder and decoder."""
    n_head: int = 4
    """Attention heads (d_model must be divisible by it)."""
    encoder_layers: int = 3
    """Encoder layers."""
    decoder_layers: int = 3
    """Decoder layers."""
    ffn_dim: int = 1024
    """Feed-forward hidden width."""
    activation: str = "relu"
    """Feed-forward activation: relu (Vaswani et al.) | gelu | swish (Marian)."""
    dropout: float = 0.1
    """Dropout on embeddings and sublayer outputs."""
    attention_dropout: float = 0.0
    """Dropout on attention weights."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""
    share_embeddings: bool = False
    """One embedding table for source and target tokens (one joint vocabulary)."""
    label_smoothing: float = 0.1
    """Label smoothing of the training loss (0 = plain cross-entropy)."""
    num_beams: int = 5
    """Beam width of the test decoding (and the default of fromzero translate); 1 = greedy."""
    length_penalty: float = 1.0
    """Beam search: hypotheses score sum(log p) / length ** length_penalty."""
    eval_limit: int = 1000
    """Val sources decoded (greedily) at each evaluation (0 = all)."""
    monitor: str = "val_per"
    """Metric that picks the best weights and drives early stopping: val_per | val_wer | val_loss."""
    epochs: int = 10
    """Maximum passes over the training pairs."""
    batch_size: int = 128
    """Pairs per micro-batch."""
    bucket_by_length: bool = True
    """Batch pairs of similar source + target length (less padding; order from the seed); false: random."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    warmup_ratio: float = 0.05
    """Fraction of the steps with linear warmup from 0 to lr."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    dtype: str = "float32"
    """float32 | auto | bfloat16 | float16."""

    def validate(self) -> None:
        from fromzero.models.seq2seq import ACTIVATIONS

        self.validate_common()
        if self.method != "full":
            raise FromzeroError(f"method {self.method!r} is not supported for translation (full)")
        if not str(self.data).strip():
            raise FromzeroError("data is required: cmudict-g2p or a file / folder of source-target pairs")
        for name in ("source_tokens", "target_tokens"):
            if getattr(self, name) not in TOKENIZATIONS:
                raise FromzeroError(f"{name} must be one of {', '.join(TOKENIZATIONS)}, got {getattr(self, name)!r}")
        for name in ("max_length", "d_model", "n_head", "encoder_layers", "decoder_layers", "ffn_dim", "num_beams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FromzeroError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise FromzeroError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.activation not in ACTIVATIONS:
            raise FromzeroError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FromzeroError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.eval_limit < 0:
            raise FromzeroError(f"eval_limit must be >= 0, got {self.eval_limit}")
        if self.monitor not in ("val_wer", "val_per", "val_loss"):
            raise FromzeroError(f"monitor {self.monitor!r} is not supported (val_wer | val_per | val_loss)")


# ---------------------------------------------------------------------------------------------
# Data


def split_tokens(text: str, how: str) -> list[str]:
    return list(text.strip()) if how == "chars" else text.split()


def _read_pairs_file(path: Path) -> list[tuple[str, str]]:
    """(source, target) rows of one .tsv or .jsonl file; a bad row is a one-line error naming it."""
    rows: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as e:
        raise FromzeroError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                source, target = row["source"], row["target"]
            except (ValueError, KeyError, TypeError):
                raise FromzeroError(f"{path}:{number}: expected a JSON object with source and target") from None
        else:
            source, tab, target = line.partition("\t")
            if not tab:
                raise FromzeroError(f"{path}:{number}: expected source<TAB>target")
        if not isinstance(source, str) or not isinstance(target, str) or not source.strip() or not target.strip():
            raise FromzeroError(f"{path}:{number}: source and target must be non-empty text")
        rows.append((source.strip(), target.strip()))
    return rows


def _group(rows: list[tuple[str, str]]) -> Pairs:
    """Rows with the same source become one source with several references (first-seen order)."""
    grouped: dict[str, list[str]] = {}
    for source, target in rows:
        known = grouped.setdefault(source, [])
        if target not in known:
            known.append(target)
    return list(grouped.items())


def load_pairs(cfg: TranslationConfig) -> dict[str, Pairs]:
    """``{train, val, test}`` pairs of the configured data (a single file: split 85/5/10 by a hash
    of the source, so a source and its references stay in one split)."""
    from fromzero.data import g2p

    if cfg.data == g2p.NAME:
        return {split: [(g2p.spell(word), prons) for word, prons in rows]
                for split, rows in g2p.load_g2p(cfg.stress).items()}
    path = Path(cfg.data).expanduser()
    if path.is_dir():
        splits = {}
        for split in ("train", "val", "test"):
            found = [p for p in (path / f"{split}.tsv", path / f"{split}.jsonl") if p.is_file()]
            if not found:
                raise FromzeroError(f"{path} has no {split}.tsv or {split}.jsonl")
            splits[split] = _group(_read_pairs_file(found[0]))
        return splits
    if not path.is_file() or path.suffix not in (".tsv", ".jsonl"):
        raise FromzeroError(f"data {cfg.data!r} is not cmudict-g2p, a .tsv / .jsonl file or a folder of them")
    splits = {"train": [], "val": [], "test": []}
    for source, targets in _group(_read_pairs_file(path)):
        splits[g2p.split_of(source)].append((source, targets))
    return splits


class Vocab:
    """Token <-> id on each side (ids 0-2 are <pad>, </s>, <unk>), saved as vocab.json."""

    def __init__(self, source: list[str], target: list[str], source_tokens: str, target_tokens: str) -> None:
        self.source, self.target = source, target
        self.source_tokens, self.target_tokens = source_tokens, target_tokens
        self.source_ids = {t: i for i, t in enumerate(source)}
        self.target_ids = {t: i for i, t in enumerate(target)}

    @classmethod
    def build(cls, pairs: Pairs, source_tokens: str, target_tokens: str, joint: bool) -> "Vocab":
        src = sorted({t for s, _ in pairs for t in split_tokens(s, source_tokens)})
        tgt = sorted({t for _, refs in pairs for r in refs for t in split_tokens(r, target_tokens)})
        if joint:
            src = tgt = sorted(set(src) | set(tgt))
        return cls([*SPECIALS, *src], [*SPECIALS, *tgt], source_tokens, target_tokens)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "source_tokens": self.source_tokens,
                "target_tokens": self.target_tokens}

    @classmethod
    def from_file(cls, path: Path) -> "Vocab":
        from fromzero.checkpoint import read_json

        d = read_json(path, "vocabulary")
        try:
            return cls(list(d["source"]), list(d["target"]), d["source_tokens"], d["target_tokens"])
        except (KeyError, TypeError):
            raise FromzeroError(f"{path}: expected source, target, source_tokens and target_tokens") from None

    def encode_source(self, text: str) -> list[int]:
        return [self.source_ids.get(t, UNK) for t in split_tokens(text, self.source_tokens)] + [EOS]

    def encode_target(self, text: str) -> list[int]:
        return [self.target_ids.get(t, UNK) for t in split_tokens(text, self.target_tokens)] + [EOS]

    def decode_target(self, ids: list[int]) -> str:
        tokens = [self.target[i] for i in ids if i not in (PAD, EOS)]
        return ("" if self.target_tokens == "chars" else " ").join(tokens)

    def unknown_source(self, text: str) -> list[str]:
        """The tokens of ``text`` that are not in the source vocabulary (they would read as <unk>)."""
        return sorted({t for t in split_tokens(text, self.source_tokens) if t not in self.source_ids})


class MarianVocab:
    """The SentencePiece tokenizer a converted Marian model came with (``source.spm``,
    ``target.spm`` and Marian's ``vocab.json`` piece -> id table, carried over by ``convert
    from-hf``), read by transformers' ``MarianTokenizer``: real opus-mt weights translate with the
    very tokenization they were trained with. Same interface as :class:`Vocab`."""

    source_tokens = target_tokens = "words"  # how evaluation splits texts into tokens (wer / per)

    def __init__(self, directory: Path) -> None:
        try:
            from transformers import MarianTokenizer

            self.tokenizer = MarianTokenizer.from_pretrained(str(directory))
        except ImportError as e:
            raise FromzeroError(f"{directory} holds a Marian SentencePiece tokenizer, which needs the "
                                f"sentencepiece package ({e}): pip install sentencepiece") from None
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise FromzeroError(f"{directory}: cannot read its Marian tokenizer files: {e}") from None

    def encode_source(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]  # pieces then </s>

    def decode_target(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # with target.spm

    def unknown_source(self, text: str) -> list[str]:
        """Pieces that map to <unk> (SentencePiece splits any text, but not every character is known)."""
        unk = self.tokenizer.unk_token_id
        pieces = self.tokenizer.tokenize(text)
        return sorted({p for p, i in zip(pieces, self.tokenizer.convert_tokens_to_ids(pieces)) if i == unk})


def pad_batch(rows: list[list[int]], pad_id: int = PAD) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_pairs(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(source ids, target ids) rows -> two right-padded (B, S) and (B, T) batches."""
    return pad_batch([s for s, _ in rows]), pad_batch([t for _, t in rows])


def training_batches(rows: list[tuple[list[int], list[int]]], batch_size: int, seed: int,
                     bucketed: bool = True) -> tuple[Any, int]:
    """``(epoch -> batches, batches per epoch)`` of the training pairs.

    bucketed: :class:`~fromzero.data.classification.LengthBucketSampler` over source + target
    length: the pairs are shuffled, cut into chunks of 50 batches, each chunk sorted by length and
    cut into batches, and the order of all batches shuffled. Words of 3 and of 15 letters then
    rarely share a batch, so about half of each step is no longer padding. The order depends on
    ``seed + epoch`` only, so a resumed run draws the same batches. Otherwise: a DataLoader
    shuffled by one generator for the whole run (a ShuffledEpochs, whose state the loop saves).
    """
    from torch.utils.data import DataLoader

    if bucketed:
        from fromzero.data.classification import LengthBucketSampler

        sampler = LengthBucketSampler([len(s) + len(t) for s, t in rows], batch_size, shuffle=True, seed=seed)
        loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collate_pairs)

        def epoch_batches(epoch: int) -> Any:
            sampler.set_epoch(epoch)
            return iter(loader)

        return epoch_batches, len(sampler)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=collate_pairs)
    return ShuffledEpochs(loader, generator), math.ceil(len(rows) / batch_size)


def translate_batch(model: nn.Module, vocab: Vocab, sources: list[str], device: torch.device, num_beams: int = 1,
                    length_penalty: float = 1.0, batch_size: int = 256, max_new_tokens: int | None = None,
                    strict: bool = False) -> list[str]:
    """Decode each source text into its target text. strict: a source with tokens outside the
    model's vocabulary is a one-line error (else they read as <unk>, as in evaluation)."""
    if strict:
        for text in sources:
            unknown = vocab.unknown_source(text)
            if unknown or not text.strip():
                raise FromzeroError(f"cannot translate {text!r}: " + (
                    f"{', '.join(map(repr, unknown))} not in the model's source vocabulary" if unknown else "empty"))
    was_training = model.training
    model.eval()
    limit = max_new_tokens or model.config.max_positions - 1
    out: list[str] = []
    for s in range(0, len(sources), batch_size):
        src = pad_batch([vocab.encode_source(t) for t in sources[s:s + batch_size]], model.config.pad_id).to(device)
        generated = model.generate(src, max_new_tokens=limit, num_beams=num_beams, length_penalty=length_penalty)
        out.extend(vocab.decode_target(ids) for ids in generated)
    model.train(was_training)
    return out


def score_translations(outputs: list[str], pairs: Pairs, vocab: Vocab, corpus_scores: bool = False) -> dict[str, float]:
    """wer / per of outputs against their references (and chrF, BLEU with ``corpus_scores``)."""
    from fromzero.evaluation.metrics import pronunciation_error_rates

    how = vocab.target_tokens
    metrics = pronunciation_error_rates([split_tokens(o, how) for o in outputs],
                                        [[split_tokens(r, how) for r in refs] for _, refs in pairs])
    if corpus_scores:
        import sacrebleu

        spaced = [" ".join(split_tokens(o, how)) for o in outputs]
        width = max(len(refs) for _, refs in pairs)
        streams = [[" ".join(split_tokens(refs[min(i, len(refs) - 1)], how)) for _, refs in pairs]
                   for i in range(width)]
        metrics["chrf"] = sacrebleu.corpus_chrf(spaced, streams).score
        metrics["bleu"] = sacrebleu.corpus_bleu(spaced, streams, tokenize="none").score
    return metrics


# ---------------------------------------------------------------------------------------------
# The run


def finetune_translation(cfg: TranslationConfig, resume: bool = False) -> dict[str, Any]:
    """Train, keep the best val weights, decode test with beam search, write the run directory."""
    return run_finetune_task(TranslationTask, cfg, resume)


class TranslationTask(FinetuneTask):
    """One sequence-to-sequence training run (see :class:`fromzero.finetune.engine.FinetuneTask`)."""

    name = "translation"
    weight_by = "tokens"

    def __init__(self, cfg: TranslationConfig, ctx: Any, device: torch.device, dtype: str) -> None:
        from fromzero.models.seq2seq import Seq2Seq, Seq2SeqConfig

        self.cfg, self.ctx, self.device, self.dtype = cfg, ctx, device, dtype
        self.monitor, self.higher_is_better = cfg.monitor, False
        self.pairs = load_pairs(cfg)
        if not self.pairs["train"] or not self.pairs["val"] or not self.pairs["test"]:
            raise FromzeroError("translation needs pairs in train, val and test: got "
                                + ", ".join(f"{len(v)} {k}" for k, v in self.pairs.items()))
        torch.manual_seed(cfg.seed)
        if cfg.init_from:
            from fromzero.checkpoint import load_model

            model = load_model(cfg.init_from)
            if not isinstance(model, Seq2Seq):
                raise FromzeroError(f"init_from {cfg.init_from} is not a seq2seq checkpoint")
            if (Path(cfg.init_from) / MARIAN_SOURCE_SPM).is_file():
                raise FromzeroError(f"init_from {cfg.init_from}: fine-tuning a converted Marian model with its "
                                    "SentencePiece tokenizer is not supported yet (translate and evaluate are)")
            self.vocab = Vocab.from_file(Path(cfg.init_from) / VOCAB_FILE)
        else:
            self.vocab = Vocab.build(self.pairs["train"], cfg.source_tokens, cfg.target_tokens, cfg.share_embeddings)
            target_vocab = 0 if cfg.share_embeddings else len(self.vocab.target)
            model = Seq2Seq(Seq2SeqConfig(
                src_vocab_size=len(self.vocab.source), tgt_vocab_size=target_vocab,
                d_model=cfg.d_model, n_head=cfg.n_head, encoder_layers=cfg.encoder_layers,
                decoder_layers=cfg.decoder_layers, ffn_dim=cfg.ffn_dim, activation=cfg.activation, dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                max_positions=cfg.max_length + 1, share_embeddings=cfg.share_embeddings, pad_id=PAD, eos_id=EOS,
                decoder_start_id=PAD))
        self.model = model.to(device)
        self.train_rows = self._encode(self.pairs["train"], drop_long=True)
        self.val_rows = self._encode(self.pairs["val"])
        # Outputs stop at eos; an untrained model may never say it: decode at most a few tokens
        # more than the longest training target (saved with the checkpoint for translate).
        longest = max(len(t) for _, t in self.train_rows)
        self.max_new_tokens = min(self.model.config.max_positions - 1, longest + 4)

    def _encode(self, pairs: Pairs, drop_long: bool = False) -> list[tuple[list[int], list[int]]]:
        """(source ids, target ids) per training pair: one row per reference."""
        limit = self.model.config.max_positions
        rows = [(self.vocab.encode_source(s), self.vocab.encode_target(t)) for s, refs in pairs for t in refs]
        kept = [r for r in rows if len(r[0]) <= limit and len(r[1]) <= limit]
        if len(kept) < len(rows) and drop_long:
            print(f"note: {len(rows) - len(kept)} of {len(rows)} training pairs are longer than {limit - 1} "
                  "tokens and are left out (raise data.max_length to keep them)")
        return kept if drop_long else rows

    def start(self, run_dir: Path) -> None:
        from fromzero.finetune.methods import count_parameters

        _, total = count_parameters(self.model)
        print(f"translation: {len(self.train_rows):,} training pairs, {len(self.pairs['val']):,} val and "
              f"{len(self.pairs['test']):,} test sources; vocabularies {len(self.vocab.source)} / "
              f"{len(self.vocab.target)}; {total:,} parameters; device {self.device}, {self.dtype}")

    def batches(self) -> tuple[Any, int]:
        return training_batches(self.train_rows, self.cfg.batch_size, self.cfg.seed, self.cfg.bucket_by_length)

    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        src, tgt = (t.to(self.device, non_blocking=True) for t in batch)
        loss, tokens = self.model.loss(src, tgt, label_smoothing=self.cfg.label_smoothing, forward=net)
        return loss, len(src), tokens

    @torch.no_grad()
    def _mean_loss(self, rows: list[tuple[list[int], list[int]]]) -> float:
        total = count = 0.0
        for s in range(0, len(rows), 256):
            chunk = rows[s:s + 256]
            loss, tokens = self.model.loss(pad_batch([r[0] for r in chunk]).to(self.device),
                                           pad_batch([r[1] for r in chunk]).to(self.device))
            total, count = total + loss.item() * tokens, count + tokens
        return total / max(count, 1)

    def _decode_metrics(self, pairs: Pairs, num_beams: int, corpus_scores: bool = False) -> dict[str, float]:
        with self.autocast():
            outputs = translate_batch(self.model, self.vocab, [s for s, _ in pairs], self.device, num_beams,
                                      self.cfg.length_penalty, max_new_tokens=self.max_new_tokens)
        return score_translations(outputs, pairs, self.vocab, corpus_scores)

    def evaluate(self, _: nn.Module) -> dict[str, Any]:
        was_training = self.model.training
        self.model.eval()
        limit = self.cfg.eval_limit or len(self.pairs["val"])
        metrics = {"loss": self._mean_loss(self.val_rows), **self._decode_metrics(self.pairs["val"][:limit], 1)}
        self.model.train(was_training)
        return metrics

    def _save(self, directory: Path, info: dict[str, Any]) -> None:
        from fromzero.checkpoint import (MODEL_FILE, atomic_directory, model_state_for_saving,
                                         write_checkpoint_files, write_safetensors)

        with atomic_directory(directory) as tmp:
            write_safetensors(model_state_for_saving(self.model), tmp / MODEL_FILE)
            write_checkpoint_files(tmp, self.model.config.to_dict(), None, {
                "task": "translation", "data": self.cfg.data, "num_beams": self.cfg.num_beams,
                "length_penalty": self.cfg.length_penalty, "max_new_tokens": self.max_new_tokens, **info})
            (tmp / VOCAB_FILE).write_text(json.dumps(self.vocab.to_json()) + "\n", encoding="utf-8")

    def save_best(self, info: dict[str, Any]) -> None:
        self._save(self.best_dir, {"best_step": info["best_step"], "best_epoch": info["best_epoch"],
                                   "val": info["val"]})

    def test(self) -> dict[str, Any]:
        self.model.eval()
        rows = self._encode(self.pairs["test"])
        return {"loss": self._mean_loss(rows), **self._decode_metrics(self.pairs["test"], self.cfg.num_beams, True)}

    def finish(self, fit: FitResult, test: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        from fromzero.evaluation.metrics import write_metrics_json

        summary = self.summary(fit, test, num_beams=self.cfg.num_beams)
        self._save(self.best_dir, {"best_step": fit.best_step, "best_epoch": fit.best_epoch, "val": fit.best_metrics,
                                   "test": test})
        write_metrics_json(summary, self.run_dir / "metrics.json")
        print(f"done: test wer {test['wer']:.4f} per {test['per']:.4f} chrF {test['chrf']:.1f} "
              f"BLEU {test['bleu']:.1f} ({test['words']:,} sources, {self.cfg.num_beams} beams); "
              f"best {self.monitor} {fit.best_metrics.get(self.monitor.removeprefix('val_'), float('nan')):.4f} "
              f"at step {fit.best_step}; checkpoint {self.best_dir}")
        return summary


def load_translator(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Vocab, dict]:
    """(model, vocabulary, info) of a translation checkpoint directory."""
    from fromzero.checkpoint import INFO_FILE, load_model, read_json
    from fromzero.models.seq2seq import Seq2Seq

    directory = Path(directory).expanduser()
    model = load_model(directory, device)
    if not isinstance(model, Seq2Seq):
        raise FromzeroError(f"{directory} is not a seq2seq checkpoint")
    info = read_json(directory / INFO_FILE, "checkpoint info") if (directory / INFO_FILE).is_file() else {}
    if (directory / MARIAN_SOURCE_SPM).is_file():
        return model, MarianVocab(directory), info
    if not (directory / VOCAB_FILE).is_file():
        raise FromzeroError(f"{directory} has no {VOCAB_FILE} (a converted model needs its vocabulary: its "
                            f"{MARIAN_SOURCE_SPM} + {VOCAB_FILE} from Hugging Face, or fromzero's token lists)")
    return model, Vocab.from_file(directory / VOCAB_FILE), info


def evaluate_translator(directory: str | Path, run: dict[str, Any], data: str | None = None, split: str = "test",
                        batch_size: int = 256, device: str = "auto", limit: int = 0) -> dict[str, Any]:
    """``fromzero evaluate`` on a translation checkpoint: decode one split of ``data`` (default: the
    data of the run that made it, ``run`` = its flattened config) the way the run's test decoding
    did (the checkpoint's beam width, length penalty and output limit), and score it: wer, per,
    chrF, BLEU. ``limit``: only the first N sources (0 = all)."""
    from dataclasses import replace

    from fromzero.devices import resolve_device

    if split not in ("train", "val", "test"):
        raise FromzeroError(f"split must be train, val or test, got {split!r}")
    torch_device = resolve_device(device)
    model, vocab, info = load_translator(directory, torch_device)
    settings = {k: run[k] for k in ("data", "stress", "source_tokens", "target_tokens") if k in run}
    if not data and "data" not in settings:
        raise FromzeroError(f"{directory}: no --data given and no run config names the data it was trained on")
    cfg = replace(TranslationConfig(), **settings, **({"data": data} if data else {}))
    pairs = load_pairs(cfg)[split]
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise FromzeroError(f"{cfg.data} has no {split} pairs")
    beams = int(info.get("num_beams", 1))
    outputs = translate_batch(model, vocab, [s for s, _ in pairs], torch_device, beams,
                              float(info.get("length_penalty", 1.0)), batch_size, info.get("max_new_tokens"))
    metrics = score_translations(outputs, pairs, vocab, corpus_scores=True)
    return {"task": "translation", "data": str(cfg.data), "split": split, "examples": len(pairs),
            "num_beams": beams, **{k: round(v, 6) for k, v in metrics.items()}}
