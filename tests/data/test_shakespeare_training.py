"""Real data, real learning: the char GPT learns Shakespeare (prepare -> pretrain -> generate)."""

from __future__ import annotations

import json
import math

from fromzero.cli import main


def test_char_gpt_learns_real_shakespeare(shakespeare_home, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FROMZERO_HOME", str(shakespeare_home))
    data = tmp_path / "shakespeare-char"
    assert main(["data", "prepare", "--corpus", "shakespeare", "--tokenizer", "char", "--out", str(data), "--quiet"]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["vocab_size"] == 84 and meta["train_tokens"] + meta["val_tokens"] == 5_057_198

    run = tmp_path / "run"
    # The recipe's model and optimiser, cut to 150 steps (eager fp32: no compile in this test).
    rc = main(["pretrain", "--config", "recipes/shakespeare-char.yaml", "--data.dir", str(data),
               "--out_dir", str(run), "--train.max_steps", "150", "--train.eval_every", "75",
               "--train.decay_steps", "150", "--train.warmup_steps", "20",
               "--train.compile", "false", "--train.dtype", "float32", "--quiet"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert abs(val[0] - math.log(84)) < 0.15  # untrained: ~uniform over 84 characters
    assert val[-1] < 2.75 < val[0]  # learned the letter statistics of English verse
    assert val == sorted(val, reverse=True)

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run / "checkpoints" / "best"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "100", "--temperature", "0.8"]) == 0
    text = capsys.readouterr().out
    assert text.endswith("\n")  # print's newline
    assert text.startswith("ROMEO:") and len(text[:-1]) == len("ROMEO:") + 100
