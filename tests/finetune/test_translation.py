"""The translation task (a seq2seq Transformer trained by the shared loop): a tiny run on a TSV
of a toy "language" learns it, writes the run directory and a checkpoint that translates;
exact resume; bad input is a one-line error before anything is written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fromzero.errors import FromzeroError
from fromzero.finetune.translation import (TranslationConfig, finetune_translation, load_translator,
                                           translate_batch)

from .resume import assert_resume_is_exact

LETTERS = "abcdefgh"


def toy_language(path: Path, n: int = 600, seed: int = 0) -> Path:
    """Words of 3-6 letters -> their letters reversed and upper-cased, space-separated (a
    'pronunciation' with a different alphabet and order); a few words get two references."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        lines.append(f"{word}\t{' '.join(word[::-1].upper())}")
        if rng.random() < 0.05:
            lines.append(f"{word}\t{' '.join(word.upper())}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(data: Path, out: Path, **overrides: object) -> TranslationConfig:
    fields = dict(data=str(data), out_dir=str(out), d_model=64, n_head=4, encoder_layers=2, decoder_layers=2,
                  ffn_dim=128, dropout=0.0, epochs=12, batch_size=16, lr=2e-3, eval_limit=0, num_beams=3,
                  progress=False, seed=0)
    return TranslationConfig(**{**fields, **overrides})


@pytest.mark.slow
def test_tiny_run_learns_and_its_checkpoint_translates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = toy_language(tmp_path / "toy.tsv")
    summary = finetune_translation(tiny_config(data, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] / 2
    test = summary["test"]
    assert test["per"] < 0.05 and test["wer"] < 0.2 and test["chrf"] > 90 and test["bleu"] > 80
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["wer"] == test["wer"]
    model, vocab, info = load_translator(tmp_path / "run" / "checkpoints" / "best")
    assert info["task"] == "translation" and info["num_beams"] == 3
    outputs = translate_batch(model, vocab, ["abcd", "hgfe"], "cpu", num_beams=3)
    assert outputs == ["D C B A", "E F G H"]
    # the command: one JSON line per input, the checkpoint's beam width unless --beams
    from fromzero.cli import main

    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best"), "--text", "abcd",
                 "--text", "hgfe", "--beams", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [{"input": "abcd", "translation": "D C B A"}, {"input": "hgfe", "translation": "E F G H"}]
    assert main(["translate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best")]) == 2
    assert "error: give exactly one of --text or --input" in capsys.readouterr().err
    assert main(["translate", "--checkpoint", str(tmp_path / "nowhere"), "--text", "abc"]) == 2
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best"), "--text", "abzé"]) == 2
    assert "error: cannot translate 'abzé': 'z', 'é' not in the model's source vocabulary" in capsys.readouterr().err
    # evaluate re-decodes the run's test split as the run did: the same figures; predict --text translates
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["split"] == "test" and scored["examples"] == test["words"]
    assert all(abs(scored[k] - test[k]) < 1e-6 for k in ("wer", "per", "chrf", "bleu"))
    assert main(["predict", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best"), "--text", "hgfe"]) == 0
    assert json.loads(capsys.readouterr().out) == {"input": "hgfe", "translation": "E F G H"}


@pytest.mark.slow
def test_resume_continues_bit_for_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = toy_language(tmp_path / "toy.tsv", n=200)
    assert_resume_is_exact(finetune_translation,
                           lambda out: tiny_config(data, out, epochs=2, eval_every=5, dropout=0.1, eval_limit=20),
                           tmp_path, monkeypatch, stop_at=7)


def test_bad_input_is_refused_before_the_run_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("abc\tA B C\nno tab here\n", encoding="utf-8")
    with pytest.raises(FromzeroError, match=r"bad.tsv:2: expected source<TAB>target"):
        finetune_translation(tiny_config(bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(FromzeroError, match="divisible"):
        finetune_translation(tiny_config(bad, tmp_path / "run", d_model=30))
    with pytest.raises(FromzeroError, match="source_tokens must be one of"):
        finetune_translation(tiny_config(bad, tmp_path / "run", source_tokens="bytes"))


def test_length_bucketed_batches_cover_each_pair_once_and_follow_the_seed() -> None:
    from fromzero.finetune.translation import training_batches

    rng = random.Random(1)
    lengths = [rng.randint(2, 16) for _ in range(1000)]  # a word's phonemes: about as many as its letters
    rows = [([3] * n, [4] * max(2, n + rng.randint(-2, 1))) for n in lengths]
    for i, (source, _) in enumerate(rows):  # make every row identifiable: its index in the first token
        source[0] = 1000 + i

    def epoch(seed: int, e: int, bucketed: bool = True) -> list[tuple[list[int], int, int]]:
        make, per_epoch = training_batches(rows, 32, seed, bucketed)
        batches = list(make(e))
        assert len(batches) == per_epoch == 32  # ceil(1000 / 32)
        return [(src[:, 0].tolist(), src.shape[1], tgt.shape[1]) for src, tgt in batches]

    first = epoch(0, 1)
    seen = sorted(i - 1000 for ids, _, _ in first for i in ids)
    assert seen == list(range(1000))  # every pair exactly once
    assert first == epoch(0, 1)  # the seed and the epoch decide the order (resume draws the same batches)
    assert first != epoch(0, 2) and first != epoch(1, 1)
    padded = sum(len(ids) * (s + t) for ids, s, t in first)
    random_padded = sum(len(ids) * (s + t) for ids, s, t in epoch(0, 1, bucketed=False))
    real = sum(len(s) + len(t) for s, t in rows)
    assert padded < 1.1 * real and random_padded > 1.4 * real  # random batches pad far more
