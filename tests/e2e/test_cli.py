"""End to end through the ``fromzero`` command: data prepare -> pretrain -> generate.

One tiny run (40 steps) is shared by the module; most commands run in-process through
``fromzero.cli.main``; a few go through the installed console script and ``python -m fromzero``.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from fromzero.cli import main
from fromzero.config import PretrainConfig, from_dict, load_yaml
from fromzero.training.pretrain import load_resume_config
from fromzero.training.optim import lr_at

MAX_ITERS = 40
PROMPT = "The miller "


class Run:
    def __init__(self, data_dir: Path, run_dir: Path, prepare_out: str, pretrain_out: str) -> None:
        self.data_dir, self.run_dir = data_dir, run_dir
        self.prepare_out, self.pretrain_out = prepare_out, pretrain_out
        self.rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.train_rows = [r for r in self.rows if "loss" in r]
        self.eval_rows = [r for r in self.rows if "val_loss" in r]
        self.meta = json.loads((data_dir / "meta.json").read_text())

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best(self) -> Path:
        return self.run_dir / "checkpoints" / "best"


@pytest.fixture(scope="module")
def run(tiny_corpus, recipe_writer, tmp_path_factory) -> Run:
    """``data prepare`` the tiny corpus, then ``pretrain`` 40 steps on it, through the CLI."""
    root = tmp_path_factory.mktemp("e2e")
    data_dir = root / "data" / "tiny-char"
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["data", "prepare", "--corpus", str(tiny_corpus), "--tokenizer", "char",
                     "--out", str(data_dir), "--quiet"]) == 0
    prepare_out = out.getvalue()
    recipe = recipe_writer(root)("e2e", data={"dir": str(data_dir)})
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["pretrain", "--config", str(recipe), "--quiet"])
    assert code == 0, err.getvalue()
    return Run(data_dir, root / "runs" / "e2e", prepare_out, out.getvalue())


# ---------------------------------------------------------------------------------------------
# data prepare + pretrain


def test_data_prepare_reports_and_writes_dataset(run, tiny_corpus):
    text = tiny_corpus.read_text(encoding="utf-8")
    meta = run.meta
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == len(set(text))
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert (run.data_dir / "train.bin").stat().st_size == 2 * meta["train_tokens"]  # uint16
    assert run.prepare_out == (
        f"wrote {run.data_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']} (char), uint16\n"
    )


def test_pretrain_loss_goes_down(run):
    vocab = run.meta["vocab_size"]
    assert [r["step"] for r in run.train_rows] == list(range(5, MAX_ITERS + 1, 5))
    assert [r["step"] for r in run.eval_rows] == list(range(0, MAX_ITERS + 1, 10))
    # An untrained model predicts close to uniformly: cross-entropy ~ ln(V).
    assert run.eval_rows[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.15)
    assert run.train_rows[-1]["loss"] < run.train_rows[0]["loss"] - 0.3
    assert run.eval_rows[-1]["val_loss"] < run.eval_rows[0]["val_loss"] - 0.5
    assert all(math.isfinite(r["loss"]) for r in run.train_rows)
    assert run.pretrain_out.startswith(f"done: step {MAX_ITERS}, val loss ")
    assert f"run directory {run.run_dir}" in run.pretrain_out


def test_run_dir_config_yaml_is_resolved_and_loadable(run):
    data = load_yaml(run.run_dir / "config.yaml")
    assert data.pop("task") == "pretrain"  # every recipe and run config names its task
    cfg = from_dict(PretrainConfig, data)
    assert cfg.model.vocab_size == run.meta["vocab_size"]  # 0 in the recipe, resolved from data
    assert cfg.name == "e2e"  # the recipe's file name
    assert cfg.out_dir == str(run.run_dir)
    assert cfg.data.dir == str(run.data_dir)
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (2, 32, 16)
    assert cfg.train.max_steps == MAX_ITERS and cfg.train.device == "cpu"


def test_run_dir_metrics_rows(run):
    cfg = load_resume_config(run.run_dir)
    for row in run.train_rows:
        assert {"step", "loss", "lr", "tokens_per_sec", "elapsed_s"} <= row.keys(), row
        assert row["tokens_per_sec"] > 0 and row["elapsed_s"] >= 0
        # The row's lr is the one used by its last step (step - 1, zero-based).
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, cfg.train), abs=1e-6)
    for row in run.eval_rows:
        assert {"step", "val_loss", "elapsed_s"} <= row.keys(), row
    elapsed = [r["elapsed_s"] for r in run.rows]
    assert elapsed == sorted(elapsed)


def test_run_dir_tensorboard_and_plots(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run.run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(run.run_dir / "tb"))
    acc.Reload()
    assert {"loss", "lr", "val_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in run.train_rows]
    assert [e.value for e in acc.Scalars("val_loss")] == pytest.approx(
        [r["val_loss"] for r in run.eval_rows], abs=1e-5)
    png = run.run_dir / "plots" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_run_dir_checkpoints(run):
    for d in (run.last, run.best):
        assert {"config.json", "model.safetensors", "tokenizer.json", "info.json"} <= {
            p.name for p in d.iterdir()}
        assert json.loads((d / "config.json").read_text())["model_type"] == "fromzero-gpt"
        assert (d / "tokenizer.json").read_bytes() == (run.data_dir / "tokenizer.json").read_bytes()
    assert (run.last / "trainer_state.pt").is_file()
    assert not (run.best / "trainer_state.pt").exists()
    assert json.loads((run.last / "info.json").read_text())["step"] == MAX_ITERS
    best = json.loads((run.best / "info.json").read_text())
    lowest = min(run.eval_rows, key=lambda r: r["val_loss"])
    assert best["step"] == lowest["step"]
    assert best["val_loss"] == pytest.approx(lowest["val_loss"], abs=1e-5)
    # Nothing temporary left behind by the atomic writes.
    assert sorted(p.name for p in (run.run_dir / "checkpoints").iterdir()) == ["best", "last"]


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_prints_prompt_plus_n_characters(run, cli):
    for checkpoint in (run.best, run.last):
        result = cli("generate", "--checkpoint", checkpoint, "--prompt", PROMPT,
                     "--max-new-tokens", "25", "--seed", "1")
        assert result.code == 0, result
        assert result.out.endswith("\n")
        text = result.out[:-1]  # print() adds the newline; generated text may hold others
        assert text.startswith(PROMPT)
        assert len(text) == len(PROMPT) + 25


def test_generate_seed_controls_the_sample(run, cli):
    def sample(*extra: str) -> str:
        result = cli("generate", "--checkpoint", run.last, "--prompt", PROMPT,
                     "--max-new-tokens", "40", *extra)
        assert result.code == 0, result
        return result.out

    assert sample("--seed", "3") == sample("--seed", "3")
    assert sample("--seed", "3") != sample("--seed", "4")
    two = sample("--seed", "3", "--num-samples", "2", "--top-k", "5", "--top-p", "0.9")
    assert two.count("--- sample ") == 2 and "--- sample 2 ---" in two


def test_generate_with_and_without_kv_cache_agree(run, cli):
    """Greedy decoding past block_size (16): the cache is rebuilt when the window slides."""
    args = ("generate", "--checkpoint", run.last, "--prompt", PROMPT, "--max-new-tokens", "30",
            "--temperature", "0")
    cached, uncached = cli(*args), cli(*args, "--no-cache")
    assert cached.code == uncached.code == 0
    assert cached.out == uncached.out
    assert len(cached.out) == len(PROMPT) + 30 + 1
    # Inside the window, prompt-lookup drafts (default 8) give the one-token-per-pass text.
    short = args[:-3] + ("10", "--temperature", "0")
    assert cli(*short).out == cli(*short, "--lookup-tokens", "0").out == cli(*short, "--no-cache").out
    bad = cli(*short, "--lookup-tokens", "-1")
    assert bad.code == 2 and "--lookup-tokens" in bad.err


def test_console_script_generate_matches_in_process(run, cli, console_script):
    args = ["generate", "--checkpoint", str(run.last), "--prompt", PROMPT,
            "--max-new-tokens", "20", "--seed", "11"]
    proc = subprocess.run([str(console_script), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(PROMPT)
    assert proc.stdout == cli(*args).out


# ---------------------------------------------------------------------------------------------
# help


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ["data", "tokenizer", "pretrain", "generate", "--debug"]),
        (["pretrain"], ["--config", "--resume", "--force",
                        "--train.lr (default: 0.001)  Peak learning rate",
                        "--model.n_layer (default: 12)", "--data.dir", "--device"]),
        (["generate"], ["--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                        "--top-p", "--seed", "--num-samples", "--no-cache", "--lookup-tokens"]),
        (["data", "prepare"], ["--corpus", "--tokenizer", "--out", "--force", "--quiet"]),
        (["tokenizer", "train"], ["--corpus", "--vocab-size", "--out"]),
    ],
)
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fromzero")
    for fragment in expected:
        assert fragment in out, fragment


def test_python_m_fromzero_help():
    proc = subprocess.run([sys.executable, "-m", "fromzero", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fromzero")
    assert "pretrain" in proc.stdout and "generate" in proc.stdout


# ---------------------------------------------------------------------------------------------
# tokenizer train -> data prepare --tokenizer FILE


def test_tokenizer_train_then_prepare_with_it(tiny_corpus, tmp_path, cli):
    tok = tmp_path / "tok.json"
    result = cli("tokenizer", "train", "--corpus", tiny_corpus, "--vocab-size", "300", "--out", tok)
    assert result.code == 0, result
    assert result.out.startswith(f"wrote {tok}: bpe tokenizer, vocab ")
    vocab = int(result.out.rsplit("vocab ", 1)[1])
    assert 257 < vocab <= 300

    out = tmp_path / "data"
    result = cli("data", "prepare", "--corpus", tiny_corpus, "--tokenizer", tok, "--out", out, "--quiet")
    assert result.code == 0, result
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == vocab
    # BPE merges: fewer tokens than characters.
    assert meta["train_tokens"] + meta["val_tokens"] < len(tiny_corpus.read_text(encoding="utf-8"))
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(tok.read_text())


# ---------------------------------------------------------------------------------------------
# override aliases


def test_pretrain_aliases_and_override_forms(make_recipe, cli, tmp_path):
    recipe = make_recipe("aliases", train={"max_steps": 2, "eval_every": 2, "device": "auto",
                                           "compile": True})
    out_dir = tmp_path / "elsewhere"
    result = cli("pretrain", "--config", recipe, "--quiet", "--device", "cpu", "--compile", "false",
                 "--seed", "3", "--out-dir", out_dir, "--train.lr=0.002", "--model.bias", "false")
    assert result.code == 0, result
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert cfg["train"]["device"] == "cpu"
    assert cfg["train"]["compile"] is False
    assert cfg["train"]["seed"] == 3
    assert cfg["train"]["lr"] == 0.002
    assert cfg["model"]["bias"] is False
    assert cfg["out_dir"] == str(out_dir)
    assert "device cpu" in result.err
    assert not (recipe.parent / "runs" / "aliases").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_verb(where: str, tmp_path) -> None:
    """--debug turns the one-line error into the traceback wherever it is typed."""
    from fromzero.cli import main
    from fromzero.errors import FromzeroError

    args = ["generate", "--checkpoint", str(tmp_path / "missing")]
    assert main(args) == 2
    with pytest.raises(FromzeroError, match="checkpoint directory not found"):
        main(["--debug", *args] if where == "before" else [*args, "--debug"])
