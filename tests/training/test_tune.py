"""fromzero tune: Optuna search over recipe keys, resumable study, failed trials kept, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fromzero.training.callbacks import listen_to_evaluations
from fromzero.tune import parse_space

SPACE = {"train.lr": {"log_uniform": [1.0e-3, 1.0e-2]}, "model.n_layer": {"int": [1, 2]}}


def test_every_evaluation_is_announced_to_listeners(cli, make_recipe) -> None:
    seen: list[tuple[int, float]] = []
    with listen_to_evaluations(lambda step, metrics: seen.append((step, metrics["val_loss"]))):
        result = cli("pretrain", "--config", make_recipe(train={"max_steps": 20, "eval_every": 5}), "--quiet")
    assert result.code == 0, result
    assert [s for s, _ in seen] == [0, 5, 10, 15, 20]  # the pruner sees every intermediate value


def test_search_writes_best_recipe_and_resumes_without_losing_trials(cli, make_recipe, tmp_path: Path) -> None:
    import optuna

    recipe = make_recipe(train={"max_steps": 10, "eval_every": 5, "decay_steps": 10}, tune={"space": SPACE})
    out = tmp_path / "search"
    first = cli("tune", "--config", recipe, "--trials", "3", "--out", str(out))
    assert first.code == 0, first
    study = optuna.load_study(study_name=Path(recipe).stem, storage=f"sqlite:///{out / 'study.db'}")
    before = {t.number: t.value for t in study.trials}
    assert len(before) == 3 and all(v is not None for v in before.values())
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    best = json.loads((out / "best_params.json").read_text())
    assert best["best_value"] == min(before.values()) and set(best["best_params"]) == set(SPACE)
    assert (out / "plots" / "optimization_history.png").is_file() and (out / "trials.csv").is_file()
    # The best recipe is a plain recipe holding the best values; it runs as is.
    recipe_data = yaml.safe_load((out / "best-recipe.yaml").read_text())
    assert "tune" not in recipe_data and "out_dir" not in recipe_data
    assert recipe_data["train"]["lr"] == pytest.approx(best["best_params"]["train.lr"])
    assert recipe_data["model"]["n_layer"] == best["best_params"]["model.n_layer"]
    rerun = cli("pretrain", "--config", out / "best-recipe.yaml", "--out_dir", str(tmp_path / "best-run"), "--quiet")
    assert rerun.code == 0, rerun

    # Resume: --trials counts the finished ones; the earlier trials are kept as they were.
    again = cli("tune", "--config", recipe, "--trials", "4", "--out", str(out))
    assert again.code == 0, again
    assert "3 trial(s) done, running 1" in again.out
    study = optuna.load_study(study_name=Path(recipe).stem, storage=f"sqlite:///{out / 'study.db'}")
    after = {t.number: t.value for t in study.trials}
    assert len(after) == 4 and all(after[n] == before[n] for n in before)


def test_a_crashing_trial_is_recorded_and_the_search_goes_on(cli, make_recipe, tmp_path: Path) -> None:
    import optuna

    # n_head 3 does not divide n_embd 32: those trials fail, the others complete.
    recipe = make_recipe(train={"max_steps": 5, "eval_every": 5, "decay_steps": 5},
                         tune={"space": {"model.n_head": {"choice": [2, 3]}}})
    result = cli("tune", "--config", recipe, "--trials", "6", "--out", str(tmp_path / "s"))
    assert result.code == 0, result
    study = optuna.load_study(study_name=Path(recipe).stem, storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    states = {t.params["model.n_head"]: t.state for t in study.trials}
    assert states == {2: optuna.trial.TrialState.COMPLETE, 3: optuna.trial.TrialState.FAIL}
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert "divisible" in failed[0].user_attrs["error"]
    assert json.loads((tmp_path / "s" / "best_params.json").read_text())["best_params"] == {"model.n_head": 2}


def test_ctrl_c_stops_the_search_and_the_same_command_continues_it(cli, make_recipe, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in trial 1: that trial is recorded failed as interrupted (never complete with a
    partial value), the search stops with exit 130, the next run neither counts it nor a trial
    killed with the process, gives the killed one a reason, and draws new parameters."""
    import optuna

    from fromzero.training import trainer

    recipe = make_recipe(train={"max_steps": 6, "eval_every": 3, "decay_steps": 6}, tune={"space": SPACE})
    out = tmp_path / "s"
    entered = [0]
    real_enter = trainer.StopRequest.__enter__

    def enter(self):  # the second trial gets a Ctrl-C as soon as it starts
        entered[0] += 1
        stop = real_enter(self)
        stop.requested = entered[0] == 2
        return stop

    monkeypatch.setattr(trainer.StopRequest, "__enter__", enter)
    first = cli("tune", "--config", recipe, "--trials", "3", "--out", str(out))
    assert first.code == 130, first
    assert "run the same command to continue" in first.out
    monkeypatch.undo()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name=Path(recipe).stem, storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    cut = study.trials[1]
    assert cut.user_attrs["interrupted"] and cut.user_attrs["error"].startswith("interrupted: stopped by Ctrl-C")
    assert (out / "best_params.json").is_file()  # what was found so far is written
    study.ask()  # a trial left RUNNING, as by a kill -9 of the search
    again = cli("tune", "--config", recipe, "--trials", "3", "--out", str(out))
    assert again.code == 0, again
    assert "1 trial(s) done, running 2" in again.out
    study = optuna.load_study(study_name=Path(recipe).stem, storage=storage)
    killed = study.trials[2]
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["error"].startswith("killed")
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(study.trials) == 5 and len(finished) == 3
    assert all(t.params != study.trials[0].params for t in study.trials[3:])  # not trial 0's draw again


@pytest.mark.parametrize("space, message", [
    ({}, "tune.space is empty"),
    ({"train.lr": {"uniform": [0.1, 0.1]}}, "degenerate range"),
    ({"train.lrr": {"uniform": [0.1, 0.2]}}, "did you mean 'train.lr'"),
    ({"train.lr": {"log_uniform": [0.0, 0.1]}}, "positive bounds"),
    ({"train.batch_size": {"choice": [4, 4]}}, "at least two different values"),
    ({"train.lr": {"gaussian": [0.0, 1.0]}}, "must be one of"),
    ({"train.lr": {"log_uniform": [1.0e-7, 1.0e-2]}}, "the value 1e-07 makes the recipe invalid"),  # < min_lr
])
def test_bad_search_spaces_are_one_line_errors(cli, one_line_error, make_recipe, tmp_path, space, message) -> None:
    result = cli("tune", "--config", make_recipe(tune={"space": space}), "--trials", "2", "--out", str(tmp_path / "s"))
    one_line_error(result, message)
    assert not (tmp_path / "s" / "study.db").exists()


def test_a_recipe_without_tune_section_is_refused(cli, one_line_error, make_recipe) -> None:
    one_line_error(cli("tune", "--config", make_recipe(), "--trials", "2"), "has no tune section")


def test_parse_space_reads_every_kind() -> None:
    dims = parse_space({"a": {"uniform": [0, 1]}, "b": {"log_int": [1, 64]}, "c": {"choice": ["x", "y"]}},
                       ["a", "b", "c"])
    assert [(d.key, d.kind) for d in dims] == [("a", "uniform"), ("b", "log_int"), ("c", "choice")]
