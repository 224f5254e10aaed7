"""Text-classification fine-tuning (fromzero.finetune.text) and its commands: finetune, predict,
evaluate, crossval.

The base model is a random 2-layer, 32-wide fromzero-bert with a WordPiece tokenizer over a few
dozen words (``bert_base`` in conftest.py); the data are 300 short sentences whose label is set by
one sentiment word (``sentiment_csv``). Full fine-tuning learns it within a few epochs on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fromzero.finetune.text import finetune_text_classification

from .conftest import NEGATIVE, POSITIVE, sentiment_rows, text_config, write_gpt_base


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def encoder_l1(state: dict[str, torch.Tensor]) -> float:
    """sum |w| over the encoder's matrices (what the L1 penalty acts on, minus the head)."""
    return float(sum(v.abs().sum() for k, v in state.items() if k.startswith("layers.") and v.dim() >= 2))


@pytest.fixture(scope="module")
def trained(bert_base: Path, sentiment_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Full fine-tune through the Python API (15 epochs, lr 1e-3): the module's shared run."""
    cfg = text_config(bert_base, sentiment_csv, tmp_path_factory.mktemp("text") / "full")
    return finetune_text_classification(cfg)


# ---------------------------------------------------------------------------------------------
# full fine-tuning via the Python API


def test_full_finetune_learns_the_task(trained: dict) -> None:
    assert trained["labels"] == ["neg", "pos"]
    assert trained["test"]["accuracy"] >= 0.95
    assert trained["val"]["accuracy"] >= 0.95
    assert trained["trainable_params"] == trained["total_params"]
    assert trained["epochs_run"] == 15 and not trained["stopped_early"]
    assert trained["truncated"] == {"train": 0, "val": 0, "test": 0}


def test_run_directory_contents(trained: dict) -> None:
    run = Path(trained["run_dir"])
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "plots/loss.png", "plots/confusion_matrix.png",
                 "checkpoints/best/config.json", "checkpoints/best/model.safetensors",
                 "checkpoints/best/tokenizer.json", "checkpoints/best/info.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    for png in ("plots/loss.png", "plots/confusion_matrix.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(trained["checkpoint"]) == run / "checkpoints" / "best"

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == "text-classification" and saved["method"]["name"] == "full" and saved["train"]["lr"] == 1e-3

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_f1_macro" in r for r in rows) == 15  # one evaluation per epoch
    assert any("loss" in r and "lr" in r for r in rows)
    assert any("test_accuracy" in r for r in rows)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test"
    assert metrics["accuracy"] == pytest.approx(trained["test"]["accuracy"])
    assert metrics["f1_macro"] == pytest.approx(trained["test"]["f1_macro"])
    assert set(metrics["per_class"]) == {"neg", "pos"}
    assert np.asarray(metrics["confusion_matrix"]).shape == (2, 2)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 30  # 10% of 300

    config = json.loads((run / "checkpoints/best/config.json").read_text())
    assert config["model_type"] == "fromzero-bert" and config["head"] == "classification"
    assert config["labels"] == ["neg", "pos"] and config["num_labels"] == 2
    info = json.loads((run / "checkpoints/best/info.json").read_text())
    assert info["task"] == "text-classification" and info["method"] == "full"


def test_best_checkpoint_reloads_with_the_test_accuracy(trained: dict) -> None:
    from fromzero.inference.predict import Classifier

    classifier = Classifier(Path(trained["checkpoint"]), "cpu")
    texts = ["the film was " + w for w in POSITIVE + NEGATIVE]
    predicted = [r["label"] for r in classifier.label(classifier.text_logits(texts))]
    assert predicted == ["pos"] * len(POSITIVE) + ["neg"] * len(NEGATIVE)


# ---------------------------------------------------------------------------------------------
# methods and regularisation


def test_frozen_trains_only_the_head(bert_base: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    result = finetune_text_classification(
        text_config(bert_base, sentiment_csv, tmp_path / "frozen", method="frozen", epochs=2))
    base, tuned = weights(bert_base), weights(result["checkpoint"])
    assert "classifier.weight" in tuned and "classifier.weight" not in base
    for name, tensor in base.items():
        if name.startswith(("embeddings.", "layers.")):
            assert torch.equal(tuned[name], tensor), name
    assert result["trainable_params"] < result["total_params"]
    # head + pooler only: classifier 32*2+2, pooler 32*32+32
    assert result["trainable_params"] == (32 * 2 + 2) + (32 * 32 + 32)


def test_frozen_unfreeze_top_trains_the_last_layer_only(bert_base: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    result = finetune_text_classification(
        text_config(bert_base, sentiment_csv, tmp_path / "top1", method="frozen", unfreeze_top=1, epochs=2))
    base, tuned = weights(bert_base), weights(result["checkpoint"])
    first = [n for n in base if n.startswith(("layers.0.", "embeddings."))]
    last = [n for n in base if n.startswith("layers.1.")]
    assert first and last
    for name in first:
        assert torch.equal(tuned[name], base[name]), name
    assert any(not torch.equal(tuned[name], base[name]) for name in last)
    assert not torch.equal(tuned["layers.1.attn.query.weight"], base["layers.1.attn.query.weight"])


def test_early_stopping_keeps_the_first_evaluation(bert_base: Path, sentiment_csv: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # lr 1e-9: the weights barely move, the monitored f1 never improves after the first evaluation
    result = finetune_text_classification(
        text_config(bert_base, sentiment_csv, tmp_path / "stop", lr=1e-9, patience=1, epochs=6))
    assert result["stopped_early"] is True
    assert result["epochs_run"] == 2 < 6
    steps_per_epoch = result["steps"] // 2
    assert result["best_epoch"] == 1 and result["best_step"] == steps_per_epoch
    assert "early stop" in capsys.readouterr().err  # progress lines go to stderr
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert metrics["stopped_early"] is True and metrics["best_step"] == steps_per_epoch


def test_l1_lowers_the_weight_norm(bert_base: Path, sentiment_csv: Path, tmp_path: Path) -> None:
    common = dict(epochs=2, weight_decay=0.0, patience=0)
    plain = finetune_text_classification(text_config(bert_base, sentiment_csv, tmp_path / "l1-0", l1=0.0, **common))
    l1 = finetune_text_classification(text_config(bert_base, sentiment_csv, tmp_path / "l1-big", l1=1e-2, **common))
    assert plain["steps"] == l1["steps"]
    norm_plain, norm_l1 = encoder_l1(weights(plain["checkpoint"])), encoder_l1(weights(l1["checkpoint"]))
    assert norm_l1 < 0.9 * norm_plain
    assert norm_l1 < encoder_l1(weights(bert_base))


def test_long_texts_are_truncated_and_counted(bert_base: Path, sentiment_csv: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    result = finetune_text_classification(
        text_config(bert_base, sentiment_csv, tmp_path / "trunc", max_length=4, epochs=1))
    truncated = result["truncated"]
    assert truncated["train"] > 0 and truncated["val"] > 0 and truncated["test"] > 0
    out = capsys.readouterr().out
    assert f"note: {truncated['train']} of " in out and "truncated" in out
    info = json.loads((Path(result["checkpoint"]) / "info.json").read_text())
    assert info["max_length"] == 4


# ---------------------------------------------------------------------------------------------
# the finetune command


def finetune_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--task", "text-classification", "--init_from", str(base), "--data", str(data),
            "--epochs", "1", "--device", "cpu", "--dtype", "float32", "--out_dir", str(out), "--quiet", *extra]


def test_cli_finetune_refuses_an_existing_run_without_force(cli, one_line_error, bert_base, sentiment_csv,
                                                            tmp_path) -> None:
    out = tmp_path / "run"
    first = cli(*finetune_args(bert_base, sentiment_csv, out))
    assert first.code == 0, first
    assert f"done: run directory {out}" in first.out
    assert (out / "checkpoints/best/model.safetensors").is_file()
    again = cli(*finetune_args(bert_base, sentiment_csv, out))
    one_line_error(again, "--force", str(out))
    forced = cli(*finetune_args(bert_base, sentiment_csv, out, "--force"))
    assert forced.code == 0, forced


def test_an_interrupted_finetune_says_so_and_exits_130(cli, bert_base, sentiment_csv, tmp_path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C / SIGTERM during fine-tuning: not "done" with exit 0 (a script could not tell it
    from a finished run), but "stopped" with exit 130, everything needed to continue kept in
    checkpoints/last (stopped before its first evaluation: no best checkpoint, no test score)."""
    from fromzero.training import trainer

    real_enter = trainer.StopRequest.__enter__

    def enter(self):  # as if Ctrl-C came during the first step
        stop = real_enter(self)
        stop.requested = True
        return stop

    monkeypatch.setattr(trainer.StopRequest, "__enter__", enter)
    out = tmp_path / "run"
    result = cli(*finetune_args(bert_base, sentiment_csv, out))
    assert result.code == 130, result
    assert "stopped: interrupted at step 1" in result.out and "done:" not in result.out
    assert f"fromzero finetune --resume {out}" in result.out
    assert (out / "checkpoints/last/trainer_state.pt").is_file()
    assert not (out / "checkpoints/best").exists() and not (out / "metrics.json").exists()


def test_cli_finetune_existing_run_error_names_only_real_options(cli, bert_base, sentiment_csv, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1\n")
    result = cli(*finetune_args(bert_base, sentiment_csv, out))
    assert result.code == 2
    assert "--resume" not in result.err  # `fromzero finetune --resume` is an unknown option


def test_cli_finetune_from_a_jsonl_recipe(cli, bert_base, sentiment_jsonl, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "text-classification", "model": {"init_from": str(bert_base)},
                                      "data": {"source": str(sentiment_jsonl)},
                                      "train": {"epochs": 1, "device": "cpu", "dtype": "float32"},
                                      "out_dir": str(tmp_path / "run")}))
    result = cli("finetune", "--config", recipe, "--quiet", "--method.name", "frozen")
    assert result.code == 0, result
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"]["name"] == "frozen"


def test_cli_finetune_typo_suggests_the_option(cli, one_line_error, bert_base, sentiment_csv, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "text-classification", "model": {"init_from": str(bert_base)},
                                      "data": {"source": str(sentiment_csv)}, "out_dir": str(tmp_path / "run")}))
    one_line_error(cli("finetune", "--config", recipe, "--lrr", "1"), "did you mean '--lr'")
    one_line_error(cli("finetune", "--config", recipe, "--train.lrr", "1"), "did you mean '--train.lr'")
    assert not (tmp_path / "run").exists()


def test_cli_finetune_recipe_without_task(cli, one_line_error, bert_base, sentiment_csv, tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"init_from": str(bert_base), "data": str(sentiment_csv)}))
    one_line_error(cli("finetune", "--config", recipe), "task", "text-classification")


def test_cli_finetune_unknown_task(cli, one_line_error, bert_base, sentiment_csv) -> None:
    one_line_error(cli("finetune", "--task", "summarisation", "--init_from", bert_base, "--data", sentiment_csv),
                   "summarisation", "text-classification")


# ---------------------------------------------------------------------------------------------
# bad inputs: one-line error, exit 2, no run directory


def _write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_bad_label_column_names_the_columns(cli, one_line_error, bert_base, tmp_path) -> None:
    data = _write_csv(tmp_path / "d.csv", "text,sentiment", [f"{t},{lab}" for t, lab in sentiment_rows(40)])
    out = tmp_path / "run"
    line = one_line_error(cli(*finetune_args(bert_base, data, out)), "label", "'text'", "'sentiment'")
    assert "columns" in line
    assert not out.exists()


def test_single_class_is_refused(cli, one_line_error, bert_base, tmp_path) -> None:
    data = _write_csv(tmp_path / "d.csv", "text,label", [f"{t},pos" for t, _ in sentiment_rows(40)])
    out = tmp_path / "run"
    one_line_error(cli(*finetune_args(bert_base, data, out)), "single class", "'pos'")
    assert not out.exists()


def test_missing_data_file(cli, one_line_error, bert_base, tmp_path) -> None:
    out = tmp_path / "run"
    one_line_error(cli(*finetune_args(bert_base, tmp_path / "nope.csv", out)), "nope.csv")
    assert not out.exists()


def test_init_from_a_decoder_is_refused(cli, one_line_error, sentiment_csv, tmp_path) -> None:
    gpt = write_gpt_base(tmp_path / "gpt")
    out = tmp_path / "run"
    one_line_error(cli(*finetune_args(gpt, sentiment_csv, out)), "encoder", "fromzero-gpt")
    assert not out.exists()


def test_init_from_a_missing_directory(cli, one_line_error, sentiment_csv, tmp_path) -> None:
    out = tmp_path / "run"
    one_line_error(cli(*finetune_args(tmp_path / "no-such-model", sentiment_csv, out)), "no-such-model")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# predict / evaluate


def test_cli_predict_texts(cli, trained) -> None:
    result = cli("predict", "--checkpoint", trained["checkpoint"], "--device", "cpu",
                 "--text", "the food was really lovely", "--text", "my day was so awful")
    assert result.code == 0, result
    lines = [json.loads(x) for x in result.out.splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert set(line["probabilities"]) == {"neg", "pos"}
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert [x["label"] for x in lines] == ["pos", "neg"]
    assert lines[0]["input"] == "the food was really lovely"


def test_cli_predict_input_file(cli, trained, tmp_path) -> None:
    texts = tmp_path / "in.txt"
    texts.write_text("this book was great\n\nthe show felt boring\nour trip was nice again\n", encoding="utf-8")
    result = cli("predict", "--checkpoint", trained["checkpoint"], "--device", "cpu", "--input", texts)
    assert result.code == 0, result
    assert [json.loads(x)["label"] for x in result.out.splitlines()] == ["pos", "neg", "pos"]


def test_cli_predict_without_input(cli, one_line_error, trained) -> None:
    one_line_error(cli("predict", "--checkpoint", trained["checkpoint"]), "--text")


def test_cli_evaluate_matches_the_run(cli, trained, tmp_path) -> None:
    out = tmp_path / "e.json"
    result = cli("evaluate", "--checkpoint", trained["checkpoint"], "--split", "test", "--device", "cpu",
                 "--out", out)
    assert result.code == 0, result
    evaluation = json.loads(out.read_text())
    run_metrics = json.loads((Path(trained["run_dir"]) / "metrics.json").read_text())
    assert evaluation["split"] == "test"
    assert evaluation["accuracy"] == pytest.approx(run_metrics["accuracy"])
    assert evaluation["f1_macro"] == pytest.approx(run_metrics["f1_macro"])
    assert evaluation["loss"] == pytest.approx(run_metrics["loss"], rel=1e-4)
    assert out.with_suffix(".confusion_matrix.png").is_file()


# ---------------------------------------------------------------------------------------------
# crossval


def test_cli_crossval(cli, bert_base, sentiment_csv, tmp_path) -> None:
    out = tmp_path / "cv"
    result = cli("crossval", "--task", "text-classification", "--init_from", bert_base, "--data", sentiment_csv,
                 "--folds", "3", "--epochs", "1", "--device", "cpu", "--dtype", "float32", "--out_dir", out,
                 "--quiet")
    assert result.code == 0, result
    report = json.loads((out / "crossval.json").read_text())
    assert report["n_folds"] == 3 and len(report["folds"]) == 3
    for key in ("val_accuracy", "test_accuracy", "test_f1_macro"):
        stats = report["metrics"][key]
        assert len(stats["values"]) == 3
        assert stats["mean"] == pytest.approx(float(np.mean(stats["values"])))
        assert stats["std"] >= 0
    for k in (1, 2, 3):
        assert (out / f"fold-{k}" / "checkpoints/best/model.safetensors").is_file()
    # the folds partition train+val (270 of 300 rows): each validates on about a third
    val_sizes = [len((out / "folds" / f"fold-{k}" / "val.jsonl").read_text().splitlines()) for k in (1, 2, 3)]
    assert sum(val_sizes) == 270


def test_cli_crossval_needs_two_folds(cli, one_line_error, bert_base, sentiment_csv, tmp_path) -> None:
    out = tmp_path / "cv"
    one_line_error(cli("crossval", "--task", "text-classification", "--init_from", bert_base, "--data",
                       sentiment_csv, "--folds", "1", "--out_dir", out), "--folds")
    assert not out.exists()


def test_scoring_float32_logits_does_not_warn() -> None:
    import warnings

    from fromzero.finetune.text import score

    torch.manual_seed(0)
    logits = torch.randn(64, 3) * 3  # float32, as predict_logits returns them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = score(logits, [i % 3 for i in range(64)], ["a", "b", "c"])
    assert metrics["log_loss"] > 0


# ---------------------------------------------------------------------------------------------
# Exact resume (finetune --resume): stopped after step k and continued = never stopped


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_continues_bit_for_bit(bert_base, sentiment_csv, tmp_path, monkeypatch, method) -> None:
    """Mid-epoch stop (step 7 of 9 per epoch, dropout on, gradient accumulation, eval_every) ->
    resume -> the same weights, best checkpoint and losses as a run never stopped."""
    from fromzero.finetune.text import finetune_text_classification

    from .resume import assert_resume_is_exact

    def cfg(out):
        return text_config(bert_base, sentiment_csv, out, epochs=2, batch_size=8, grad_accum=2, eval_every=4,
                           log_interval=1, method=method, dropout=0.1)

    straight, resumed = assert_resume_is_exact(finetune_text_classification, cfg, tmp_path, monkeypatch, stop_at=7)
    assert resumed["test"]["accuracy"] == straight["test"]["accuracy"]
    assert resumed["best_step"] == straight["best_step"]


def test_cli_resume_of_an_interrupted_finetune(cli, one_line_error, bert_base, sentiment_csv, tmp_path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`finetune --resume RUN_DIR` continues a stopped run from its own config.yaml (overrides
    still apply); nothing to resume, or --config next to --resume, is a one-line error."""
    from .resume import stop_after_step

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_after_step(m, 3)
        cut = cli(*finetune_args(bert_base, sentiment_csv, out, "--epochs", "2"))
    assert cut.code == 130 and f"finetune --resume {out}" in cut.out, cut
    again = cli(*finetune_args(bert_base, sentiment_csv, out))
    one_line_error(again, "--resume", "--force")
    both = cli("finetune", "--resume", str(out), "--config", "x.yaml")
    one_line_error(both, "--resume", "--config")
    resumed = cli("finetune", "--resume", str(out), "--quiet")
    assert resumed.code == 0 and "resuming at step 3" in resumed.err and f"done: run directory {out}" in resumed.out
    assert (out / "checkpoints/best/model.safetensors").is_file() and (out / "metrics.json").is_file()
    one_line_error(cli("finetune", "--resume", str(tmp_path / "nowhere")), "nothing to resume")


def test_a_stopped_finetune_can_be_finished_where_it_stands(cli, bert_base, sentiment_csv, tmp_path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume with --max_steps at the step it stopped: no more training, the best weights so
    far are scored on test and saved, as a finished run's would be."""
    from .resume import stop_after_step

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        stop_after_step(m, 5)
        assert cli(*finetune_args(bert_base, sentiment_csv, out, "--epochs", "3")).code == 130
    done = cli("finetune", "--resume", str(out), "--max_steps", "5", "--quiet")
    assert done.code == 0 and "finishing it without training" in done.out + done.err, done
    info = json.loads((out / "checkpoints/best/info.json").read_text())
    assert info["best_step"] == 5


def test_crossval_stops_when_a_fold_is_interrupted(cli, bert_base, sentiment_csv, tmp_path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a fold stops the cross-validation with exit 130 and says so (no traceback, no
    crossval.json built from a cut fold)."""
    from .resume import stop_after_step

    stop_after_step(monkeypatch, 2)
    out = tmp_path / "cv"
    result = cli("crossval", "--task", "text-classification", "--init_from", str(bert_base), "--data",
                 str(sentiment_csv), "--folds", "2", "--epochs", "1", "--device", "cpu", "--dtype", "float32",
                 "--out_dir", str(out), "--quiet")
    assert result.code == 130, result
    assert "stopped: fold 1/2 interrupted at step 2" in result.out
    assert not (out / "crossval.json").exists()


def test_resume_is_exact_under_compile_too(bert_base, sentiment_csv, tmp_path, monkeypatch) -> None:
    """torch.compile (fp32, CPU): the resumed process compiles its graphs anew, on another first
    batch shape, and still continues bit for bit."""
    from fromzero.finetune.text import finetune_text_classification

    from .resume import assert_resume_is_exact

    def cfg(out):
        return text_config(bert_base, sentiment_csv, out, epochs=2, batch_size=8, grad_accum=2, eval_every=4,
                           log_interval=1, dropout=0.1, compile=True)

    assert_resume_is_exact(finetune_text_classification, cfg, tmp_path, monkeypatch, stop_at=7)
