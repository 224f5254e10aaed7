"""Hyperparameter search with Optuna: ``fromzero tune --config RECIPE --trials N``.

The recipe's ``tune`` section (``metric``, ``direction``, ``space``: dotted recipe keys ->
``{uniform | log_uniform | int | log_int | choice: [...]}``) says what to search; the rest is an
ordinary pretraining or fine-tuning recipe. Each trial is a complete run in ``<out>/trial-NNN``,
sampled by a seeded TPE and stopped early by a median pruner; the study lives in SQLite, so the
same command resumes a stopped search (user guide: docs/tuning.md; outputs: :func:`write_outputs`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError, first_line

KINDS = {
    "uniform": "[low, high] floats",
    "log_uniform": "[low, high] positive floats, sampled on a log scale",
    "int": "[low, high] integers (inclusive)",
    "log_int": "[low, high] positive integers, log scale",
    "choice": "[a, b, ...] any values",
}
MAXIMIZED = ("accuracy", "f1", "hr", "ndcg", "auc", "precision", "recall")


@dataclass
class Dimension:
    """One searched setting: its dotted recipe key, the kind of distribution and its bounds."""

    key: str
    kind: str
    values: list

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.values)
        low, high = self.values
        suggest = trial.suggest_int if self.kind.endswith("int") else trial.suggest_float
        return suggest(self.key, low, high, log=self.kind.startswith("log"))


def parse_space(space: Any, valid_keys: list[str]) -> list[Dimension]:
    """The ``tune.space`` mapping as dimensions; an empty or degenerate space is an error."""
    import difflib

    if not isinstance(space, dict) or not space:
        raise FromzeroError("tune.space is empty: declare at least one setting to search, e.g. "
                            "tune: {space: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}}")
    dims = []
    for key, spec in space.items():
        key = str(key)
        if key not in valid_keys:
            close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
            raise FromzeroError(f"tune.space: unknown setting '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise FromzeroError(f"tune.space.{key} must be one of " + ", ".join(f"{{{k}: {v}}}" for k, v in KINDS.items()))
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise FromzeroError(f"tune.space.{key}: {kind} needs a list: {KINDS[kind]}")
        if kind == "choice":
            if len({json.dumps(v, sort_keys=True) for v in values}) < 2:
                raise FromzeroError(f"tune.space.{key}: a choice needs at least two different values (a fixed "
                                    "value belongs in the recipe, not in the search space)")
        else:
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if len(values) != 2 or not numeric or (kind.endswith("int") and not all(isinstance(v, int) for v in values)):
                raise FromzeroError(f"tune.space.{key}: {kind} needs {KINDS[kind]}, got {values}")
            low, high = values
            if not low < high:
                raise FromzeroError(f"tune.space.{key}: degenerate range [{low}, {high}] (need low < high)")
            if kind.startswith("log") and low <= 0:
                raise FromzeroError(f"tune.space.{key}: {kind} needs positive bounds, got {values}")
        dims.append(Dimension(key, kind, list(values)))
    return dims


def set_dotted(data: dict, key: str, value: Any) -> None:
    """data["a"]["b"] = value for key "a.b" (creating sections)."""
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


class TrialInterrupted(KeyboardInterrupt):
    """A trial cut short by Ctrl-C / SIGTERM: its value is not a result. The trial is recorded
    as failed with that reason, not counted toward --trials, and the search stops (the same
    command continues it)."""


class Search:
    """A recipe with a tune section, ready to run trials of."""
    def __init__(self, recipe: Path, overrides: list[str]) -> None:
        from fromzero.config import PretrainConfig, all_keys, deep_merge, load_yaml, parse_overrides

        self.recipe = Path(recipe)
        data = load_yaml(self.recipe)
        tune = data.pop("tune", None)
        if not isinstance(tune, dict):
            raise FromzeroError(f"{self.recipe} has no tune section: add tune: {{space: {{...}}}} (see fromzero tune --help)")
        unknown = sorted(set(tune) - {"space", "metric", "direction"})
        if unknown:
            raise FromzeroError(f"tune: unknown key(s) {unknown} (known: space, metric, direction)")
        self.task = data.get("task")
        if self.task == "pretrain":  # the optional task line of a pretraining recipe
            del data["task"]
            self.task = None
        space = tune.get("space")
        if self.task:
            from fromzero.config import flatten_recipe, recipe_keys, section_recipe
            from fromzero.finetune.recipe import parse_recipe_overrides, task_config_class

            self.cls = cls = task_config_class(str(self.task))
            recipe = {k: v for k, v in data.items() if k != "task"}
            flat = deep_merge(flatten_recipe(cls, recipe, str(self.recipe)),
                              parse_recipe_overrides(overrides, cls, command="tune"))
            self.base = {"task": self.task, **section_recipe(cls, flat)}
            dotted = recipe_keys(cls)
            keys = [dotted.get(k, k) for k in all_keys(cls)]  # train.lr, method.name, privacy.delta, ...
            if isinstance(space, dict):  # a flat key of the old shape names the same setting
                space = {dotted.get(k, k): v for k, v in space.items()}
            default_metric = str(flat.get("monitor") or "val_loss")
        else:
            keys = all_keys(PretrainConfig)
            self.base = deep_merge(data, parse_overrides(overrides, PretrainConfig, command="tune"))
            self.base.setdefault("name", self.recipe.stem)
            default_metric = "val_loss"
        self.dimensions = parse_space(space, [k for k in keys if k not in ("out_dir", "force", "progress")])
        self.metric = str(tune.get("metric") or default_metric)
        if not self.metric.startswith("val_"):
            self.metric = "val_" + self.metric
        maximize = any(word in self.metric for word in MAXIMIZED)
        self.direction = str(tune.get("direction") or ("maximize" if maximize else "minimize"))
        if self.direction not in ("minimize", "maximize"):
            raise FromzeroError(f"tune.direction must be minimize or maximize, got {self.direction!r}")
        self.build(self.base, None)  # the base recipe itself must be valid before any trial runs
        self._check_range_ends()

    def _check_range_ends(self) -> None:
        """Both ends of every range must give a valid recipe (the others at their base values):
        e.g. train.lr searched below the recipe's train.min_lr would fail every such trial, so
        part of the space would silently never be searched. (A choice may hold values a user
        wants tried and recorded as failing, so choices are not checked.)"""
        for dim in self.dimensions:
            if dim.kind == "choice":
                continue
            for end in dim.values[:2]:
                try:
                    self.build(self.with_params({dim.key: end}), None)
                except FromzeroError as e:
                    raise FromzeroError(f"tune.space {dim.key}: the value {end} makes the recipe invalid "
                                        f"({first_line(e)}); narrow the range or change the recipe") from None

    def build(self, data: dict, out_dir: Path | None) -> Any:
        """The validated config of one trial."""
        data = copy.deepcopy(data)
        if out_dir is not None:
            data["out_dir"] = str(out_dir)
        if self.task:
            from fromzero.config import flatten_recipe
            from fromzero.finetune.recipe import load_finetune_config

            data.pop("task", None)
            flat = flatten_recipe(self.cls, data, str(self.recipe), notes=False)
            if out_dir is not None:
                flat["progress"] = False
            return load_finetune_config(None, flat, task=str(self.task))[1]
        from fromzero.config import PretrainConfig, from_dict, validate_pretrain

        cfg = from_dict(PretrainConfig, data)
        validate_pretrain(cfg)
        return cfg

    def run_trial(self, params: dict[str, Any], out_dir: Path, report: Any) -> float:
        """Train one trial; returns its best value of the metric."""
        from fromzero.training.callbacks import listen_to_evaluations

        cfg = self.build(self.with_params(params), out_dir)
        with listen_to_evaluations(report):
            if self.task:
                from fromzero.finetune.recipe import run_finetune

                result = run_finetune(str(self.task), cfg)
                if result.get("interrupted"):
                    raise TrialInterrupted(f"stopped by Ctrl-C / SIGTERM after step {result.get('steps', '?')}")
                value = result["val"].get(self.metric.removeprefix("val_"))
            else:
                from fromzero.training.pretrain import pretrain

                result = pretrain(cfg, progress=False)
                if result.stopped_early:  # pretraining stops early only when asked to
                    raise TrialInterrupted(f"stopped by Ctrl-C / SIGTERM at step {result.step}")
                value = result.best_val_loss if self.metric == "val_loss" else None
        if value is None or not math.isfinite(float(value)):
            raise FromzeroError(f"the trial produced no finite {self.metric}")
        return float(value)

    def with_params(self, params: dict[str, Any]) -> dict:
        """The base recipe with ``params`` (dotted keys) set."""
        data = copy.deepcopy(self.base)
        for key, value in params.items():
            set_dotted(data, key, value)
        return data

    def best_recipe(self, params: dict[str, Any]) -> dict:
        data = self.with_params(params)
        data.pop("out_dir", None)
        return data


def tune(recipe: Path, overrides: list[str], trials: int, timeout: float | None = None, out_dir: Path | None = None,
         storage: str | None = None, study_name: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the search; returns a summary (best value and parameters, counts, paths)."""
    import optuna

    if trials <= 0:
        raise FromzeroError(f"--trials must be positive, got {trials}")
    if timeout is not None and timeout <= 0:
        raise FromzeroError(f"--timeout must be positive seconds, got {timeout}")
    search = Search(recipe, overrides)
    out = Path(out_dir or Path("runs") / f"tune-{Path(recipe).stem}")
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    study_name = study_name or Path(recipe).stem
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=study_name, storage=storage, load_if_exists=True, direction=search.direction,
            sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )
    except ValueError as e:  # e.g. an existing study optimised in the other direction
        raise FromzeroError(f"cannot open study {study_name!r} in {storage}: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a bad storage URL or an unreadable database
        raise FromzeroError(f"cannot open the study storage {storage}: {first_line(e)}") from None
    states = optuna.trial.TrialState
    for stale in study.get_trials(deepcopy=False, states=(states.RUNNING,)):  # a search killed mid-trial
        study._storage.set_trial_user_attr(stale._trial_id, "error", "killed: the search process died during this trial")
        study._storage.set_trial_user_attr(stale._trial_id, "interrupted", True)
        study.tell(stale.number, state=states.FAIL)
    # Interrupted and killed trials have no result: they do not count toward --trials.
    done = sum(not t.user_attrs.get("interrupted") for t in study.get_trials(
        deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL)))
    remaining = max(0, trials - done)
    # A resumed search must not draw the first trials' parameters again: seed the sampler by how
    # many trials the study already has (the same seed and history still give the same search).
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    print(f"study {study_name!r} ({storage}): {search.direction} {search.metric} over "
          f"{', '.join(d.key for d in search.dimensions)}; {done} trial(s) done, running {remaining}")

    def objective(trial: Any) -> float:
        params = {d.key: d.suggest(trial) for d in search.dimensions}

        def report(step: int, metrics: dict[str, Any]) -> None:
            value = metrics.get(search.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                trial.report(float(value), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{search.metric} {value:.4f} at step {step}")

        try:
            value = search.run_trial(params, out / f"trial-{trial.number:03d}", report)
        except TrialInterrupted as e:
            print(f"trial {trial.number}: interrupted ({e}) {params}")
            trial.set_user_attr("error", f"interrupted: {e}")
            trial.set_user_attr("interrupted", True)
            raise
        except optuna.TrialPruned:
            print(f"trial {trial.number}: pruned {params}")
            raise
        except Exception as e:
            print(f"trial {trial.number}: failed ({first_line(e)}) {params}")
            trial.set_user_attr("error", first_line(e))
            raise
        print(f"trial {trial.number}: {search.metric} {value:.4f} {params}")
        return value

    if remaining:
        try:
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(Exception,))
        except KeyboardInterrupt:  # Ctrl-C: the cut trial is recorded failed; keep what was found
            if len(study.get_trials(deepcopy=False, states=(states.COMPLETE,))):
                write_outputs(study, search, out)
            print(f"search stopped; run the same command to continue it ({out})")
            raise
    return write_outputs(study, search, out)


def write_outputs(study: Any, search: Search, out: Path) -> dict[str, Any]:
    """best_params.json, best-recipe.yaml, trials.csv and plots of a study."""
    import optuna

    from fromzero.config import save_yaml

    states = optuna.trial.TrialState
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (states.COMPLETE, states.PRUNED, states.FAIL)}
    summary: dict[str, Any] = {"study": study.study_name, "metric": search.metric, "direction": search.direction,
                               "trials": counts, "out_dir": str(out)}
    _write_trials_csv(study, out / "trials.csv")
    if not counts["complete"]:
        print(f"no trial finished ({counts}); nothing to recommend yet")
        return summary
    best = study.best_trial
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    (out / "best_params.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_yaml(search.best_recipe(best.params), out / "best-recipe.yaml")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    summary["plots"] = _plots(study, plots)
    print(f"best: trial {best.number}, {search.metric} {best.value:.4f}, {best.params}")
    print(f"wrote {out / 'best-recipe.yaml'} (run it: fromzero {'finetune' if search.task else 'pretrain'} "
          f"--config {out / 'best-recipe.yaml'})")
    return summary


def _write_trials_csv(study: Any, path: Path) -> None:
    """One row per trial: number, state, value, each parameter, seconds, error."""
    import csv

    trials = study.get_trials(deepcopy=False)
    names = sorted({name for t in trials for name in t.params})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "value", *names, "seconds", "error"])
        for t in trials:
            seconds = t.duration.total_seconds() if t.duration is not None else ""
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else t.value,
                             *[t.params.get(n, "") for n in names], seconds, t.user_attrs.get("error", "")])


def _plots(study: Any, plots: Path) -> list[str]:
    """Optimisation history and parameter importances as PNGs (importances need >= 2 finished trials)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written = []
    for name, draw in (("optimization_history.png", ovm.plot_optimization_history),
                       ("param_importances.png", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
                axes = draw(study)
            axes.figure.tight_layout()
            axes.figure.savefig(plots / name, dpi=100)
            plt.close(axes.figure)
            written.append(str(plots / name))
        except Exception:  # noqa: BLE001 - e.g. importances of a single finished trial
            continue
    return written
