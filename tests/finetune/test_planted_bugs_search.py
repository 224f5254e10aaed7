"""Tests aimed at bugs that a search or a private run would not reveal by crashing.

* ``fromzero crossval``: every fold's validation rows are out of its training rows, the K
  validation folds partition train+val (each row in exactly one), each fold keeps the class
  proportions (a class's count in a fold is floor or ceil of pool_count / K), the test split is
  never pooled; for text (JSONL folds) and images (symlink folds), on the fold-writing functions
  directly, plus one end-to-end text run whose fold runs must train and validate on their own fold.
* ``fromzero tune``: every evaluation of a trial reaches the study (intermediate values, equal
  to the trial's metrics.jsonl), and trials in a bad region of the space (a learning rate too
  tiny to learn) are PRUNED before they finish.
* DP-SGD: with a zero data gradient the update is pure noise whose standard deviation is
  sigma * C / expected_batch_size (Opacus adds N(0, (sigma C)^2) to the summed clipped gradients,
  then divides by the expected batch size), measured on a 12,800-element weight.

The crossval and DP blocks end with tests that plant the bugs (monkeypatching) and check that
the checks catch them (a planted tune bug needs a whole search: checked by hand, see the report).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from fromzero.finetune import crossval as cv
from fromzero.training.privacy import PrivacyConfig, make_private

# ---------------------------------------------------------------------------------------------
# crossval: fold building

K = 4
# Imbalanced on purpose: pool counts 31 / 17 / 11, not multiples of K (floor/ceil both occur).
TEXT_COUNTS = {"train": {"alpha": 25, "beta": 13, "gamma": 8}, "val": {"alpha": 6, "beta": 4, "gamma": 3},
               "test": {"alpha": 3, "beta": 2, "gamma": 2}}
WORDS = ["the film", "this book", "my day", "the food", "our trip", "the show", "good", "bad", "really", "again"]


def write_text_data(root: Path) -> Path:
    """train/val/test.jsonl with unique texts (so "the same row" means "the same text")."""
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for split, counts in TEXT_COUNTS.items():
        lines = []
        for label, count in counts.items():
            for _ in range(count):
                text = f"{WORDS[n % len(WORDS)]} {WORDS[(n // len(WORDS)) % len(WORDS)]} row{n}"
                lines.append(json.dumps({"text": text, "label": label}))
                n += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    return [(r["text"], r["label"]) for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def check_stratified(val_labels: list[list[str]], pool_labels: list[str], k: int) -> None:
    pool = Counter(pool_labels)
    for fold, labels in enumerate(val_labels, start=1):
        counts = Counter(labels)
        for label, total in pool.items():
            # StratifiedKFold spreads each class as evenly as possible: floor or ceil of total / k
            assert abs(counts[label] - total / k) < 1, (fold, label, counts[label], total / k)


def check_folds(pool: list, test: list, folds: list[tuple[list, list, list]], k: int) -> None:
    """pool / test: rows (hashable, label last); folds: (train, val, test) rows of each fold."""
    assert len(folds) == k
    assert len(set(pool)) == len(pool), "test data must have unique rows"
    val_union: Counter = Counter()
    for fold, (train, val, fold_test) in enumerate(folds, start=1):
        assert not set(train) & set(val), f"fold {fold}: validation rows also in training rows"
        assert Counter(train) + Counter(val) == Counter(pool), f"fold {fold}: train + val is not the pool"
        assert Counter(fold_test) == Counter(test), f"fold {fold}: the test split changed"
        assert not set(fold_test) & set(train + val), f"fold {fold}: test rows were pooled"
        val_union += Counter(val)
    assert val_union == Counter(pool), "validation folds do not partition train+val"
    check_stratified([[row[-1] for row in val] for _, val, _ in folds], [row[-1] for row in pool], k)


def text_cfg(data: Path, seed: int = 0) -> SimpleNamespace:
    # what _text_folds reads of a TextClassificationConfig
    return SimpleNamespace(data=str(data), text_column="text", label_column="label", val_fraction=0.1,
                           test_fraction=0.1, seed=seed)


def check_text_fold_dirs(data: Path, sources: list[str], k: int) -> None:
    pool = read_jsonl(data / "train.jsonl") + read_jsonl(data / "val.jsonl")
    test = read_jsonl(data / "test.jsonl")
    folds = [tuple(read_jsonl(Path(s) / f"{split}.jsonl") for split in ("train", "val", "test")) for s in sources]
    check_folds(pool, test, folds, k)


@pytest.mark.parametrize("seed", [0, 7])
def test_text_folds_partition_the_pool_stratified(tmp_path: Path, seed: int) -> None:
    data = write_text_data(tmp_path / "data")
    sources = cv._text_folds(text_cfg(data, seed), K, tmp_path / "folds")
    assert len(set(sources)) == K
    check_text_fold_dirs(data, sources, K)
    # the fold directories are what each fold's run loads: no split is carved again, none lost
    from fromzero.data.classification import load_text_classification

    for source in sources:
        loaded = load_text_classification(source, seed=seed)
        assert loaded["val"] == read_jsonl(Path(source) / "val.jsonl")
        assert loaded["train"] == read_jsonl(Path(source) / "train.jsonl")


def test_fold_indices_keep_every_class_proportion() -> None:
    labels = ["a"] * 23 + ["b"] * 10 + ["c"] * 5 + ["d"] * 5
    held = cv._fold_indices(labels, 5, seed=3)
    assert sorted(i for fold in held for i in fold) == list(range(len(labels)))
    check_stratified([[labels[i] for i in fold] for fold in held], labels, 5)


IMAGE_COUNTS = {"train": {"cat": 14, "dog": 9, "fox": 5}, "val": {"cat": 4, "dog": 3, "fox": 2},
                "test": {"cat": 2, "dog": 2, "fox": 2}}


def write_image_data(root: Path) -> Path:
    from PIL import Image

    n = 0
    for split, counts in IMAGE_COUNTS.items():
        for label, count in counts.items():
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (2, 2), (n % 256, 0, 0)).save(root / split / label / f"{i:03d}.png")
                n += 1
        (root / split / "notes.txt").write_text("not an image folder entry")  # ignored (not a directory)
    return root


def image_rows(split_dir: Path) -> list[tuple[Path, str]]:
    """(resolved file, class) of every image under split_dir/<class>/ (symlinks followed)."""
    return [(f.resolve(), c.name) for c in sorted(p for p in split_dir.iterdir() if p.is_dir())
            for f in sorted(c.iterdir())]


def test_image_folds_partition_the_pool_stratified(tmp_path: Path) -> None:
    data = write_image_data(tmp_path / "data")
    k = 3
    sources = cv._image_folds(SimpleNamespace(data_dir=str(data), seed=5), k, tmp_path / "folds")
    pool = image_rows(data / "train") + image_rows(data / "val")
    test = image_rows(data / "test")
    folds = [(image_rows(Path(s) / "train"), image_rows(Path(s) / "val"), image_rows(Path(s) / "test"))
             for s in sources]
    check_folds(pool, test, folds, k)  # a link's class folder is the class of the file it points to


# Planted bugs: each must make the checks above fail.

ORIGINAL_FOLD_INDICES = cv._fold_indices


def _overlapping(labels, folds, seed):  # fold k also validates on fold k+1's first row
    held = ORIGINAL_FOLD_INDICES(labels, folds, seed)
    return [h + [held[(i + 1) % len(held)][0]] for i, h in enumerate(held)]


def _lost_row(labels, folds, seed):  # one row never validated (it trains in every fold)
    held = ORIGINAL_FOLD_INDICES(labels, folds, seed)
    return held[:-1] + [held[-1][:-1]]


def _not_stratified(labels, folds, seed):  # a plain shuffled KFold
    from sklearn.model_selection import KFold

    return [list(h) for _, h in KFold(folds, shuffle=True, random_state=seed).split(labels)]


@pytest.mark.parametrize("planted", [_overlapping, _lost_row, _not_stratified])
def test_planted_fold_bugs_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted) -> None:
    data = write_text_data(tmp_path / "data")
    monkeypatch.setattr(cv, "_fold_indices", planted)
    sources = cv._text_folds(text_cfg(data), K, tmp_path / "folds")
    with pytest.raises(AssertionError):
        check_text_fold_dirs(data, sources, K)


def test_planted_val_rows_in_train_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_text_data(tmp_path / "data")
    pool = read_jsonl(data / "train.jsonl") + read_jsonl(data / "val.jsonl")
    write = cv._write_jsonl
    # training on the whole pool: the validation rows leak into training
    monkeypatch.setattr(cv, "_write_jsonl",
                        lambda path, rows: write(path, pool if path.name == "train.jsonl" else rows))
    sources = cv._text_folds(text_cfg(data), K, tmp_path / "folds")
    with pytest.raises(AssertionError, match="validation rows also in training rows"):
        check_text_fold_dirs(data, sources, K)


def test_crossval_runs_train_and_validate_on_their_own_fold(cli, bert_base: Path, tmp_path: Path) -> None:
    """End to end (1 epoch per fold): folds on disk as above, each fold run configured with its fold
    and crossval.json's val metrics are that fold's best checkpoint scored on that fold's val rows."""
    import yaml

    from fromzero.inference.predict import evaluate_checkpoint

    data = write_text_data(tmp_path / "data")
    out = tmp_path / "cv"
    k = 3
    result = cli("crossval", "--task", "text-classification", "--init_from", bert_base, "--data", data,
                 "--folds", str(k), "--epochs", "1", "--batch_size", "16", "--device", "cpu", "--dtype", "float32",
                 "--out_dir", out, "--quiet")
    assert result.code == 0, result
    sources = [out / "folds" / f"fold-{i}" for i in range(1, k + 1)]
    check_text_fold_dirs(data, [str(s) for s in sources], k)
    report = json.loads((out / "crossval.json").read_text())
    assert [f["fold"] for f in report["folds"]] == list(range(1, k + 1))
    for row, source in zip(report["folds"], sources):
        config = yaml.safe_load((out / f"fold-{row['fold']}" / "config.yaml").read_text())
        assert Path(config["data"]["source"]).resolve() == source.resolve()
        val = evaluate_checkpoint(out / f"fold-{row['fold']}" / "checkpoints" / "best", str(source), "val")
        assert val["n"] == len(read_jsonl(source / "val.jsonl"))
        assert row["val_loss"] == pytest.approx(val["loss"], rel=1e-4, abs=1e-5)
        assert row["val_accuracy"] == pytest.approx(val["accuracy"])


# ---------------------------------------------------------------------------------------------
# tune: intermediate values reach the pruner; a bad region is pruned

GOOD_LRS = [3e-3, 2e-3]
TINY_LRS = [1e-7, 2e-7]  # the bad half of the (log) range: 20 steps at these learn nothing
EVAL_STEPS = [0, 5, 10, 15, 20]


@pytest.fixture(scope="module")
def pruning_study(recipe_writer, tmp_path_factory: pytest.TempPathFactory):
    """4 trials of a 20-step tiny GPT over train.lr in [1e-7, 1e-2] (log): two good rates first
    (the pruner's startup trials), then two tiny ones. The order is fixed by enqueueing the trials
    in the study before ``tune`` opens it (the documented resume path: same storage, same name)."""
    import optuna

    from fromzero.tune import tune

    directory = tmp_path_factory.mktemp("tune-prune")
    recipe = recipe_writer(directory)(
        "prune", train={"max_steps": 20, "eval_every": 5, "decay_steps": 20, "warmup_steps": 0,
                        "min_lr": 0.0},
        tune={"space": {"train.lr": {"log_uniform": [1.0e-7, 1.0e-2]}}})
    out = directory / "search"
    out.mkdir()
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.create_study(study_name=recipe.stem, storage=storage, direction="minimize")
    for lr in GOOD_LRS + TINY_LRS:
        study.enqueue_trial({"train.lr": lr})
    summary = tune(recipe, [], trials=4, out_dir=out)
    return optuna.load_study(study_name=recipe.stem, storage=storage), out, summary


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_every_evaluation_is_an_intermediate_value_of_the_trial(pruning_study) -> None:
    import optuna

    study, out, _ = pruning_study
    assert [t.params["train.lr"] for t in study.trials] == pytest.approx(GOOD_LRS + TINY_LRS)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2
    for trial in study.trials:
        assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED), trial.user_attrs
        assert trial.intermediate_values, f"trial {trial.number} reported nothing to the pruner"
        logged = val_losses(out / f"trial-{trial.number:03d}")
        assert trial.intermediate_values == pytest.approx(logged), trial.number  # same steps, same values
    for trial in complete:
        assert sorted(trial.intermediate_values) == EVAL_STEPS
        assert trial.value == pytest.approx(min(trial.intermediate_values.values()))  # the best val_loss


def test_the_bad_region_is_pruned_early(pruning_study) -> None:
    import optuna

    study, out, summary = pruning_study
    states = {t.params["train.lr"]: t.state for t in study.trials}
    assert all(states[lr] == optuna.trial.TrialState.COMPLETE for lr in GOOD_LRS), states
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, states
    assert summary["trials"]["pruned"] == len(pruned)
    for trial in pruned:
        assert trial.params["train.lr"] < 1e-6
        # the run stopped at the pruning evaluation: no later evaluation, no final step
        assert max(trial.intermediate_values) < EVAL_STEPS[-1]
        assert max(val_losses(out / f"trial-{trial.number:03d}")) == max(trial.intermediate_values)
    assert any(summary["best_params"]["train.lr"] == pytest.approx(lr) for lr in GOOD_LRS)


# ---------------------------------------------------------------------------------------------
# DP-SGD: the noise scale

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="opacus not installed")
IN, OUT = 128, 100  # a 12,800-element weight: its std is estimated to ~0.6% (1 / sqrt(2n))


def private_linear(cfg: PrivacyConfig, batch: int, epochs: int = 1, n_batches: int = 4):
    """Linear(IN, OUT) with SGD at lr 1 over n_batches * batch examples (expected batch = batch)."""
    torch.manual_seed(0)
    model = nn.Linear(IN, OUT)
    n = n_batches * batch
    data = torch.utils.data.TensorDataset(torch.randn(n, IN), torch.randint(0, OUT, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return model, make_private(model, opt, loader, cfg, epochs=epochs, seed=0)


def noise_only_update(model: nn.Module, private, real_batch: int) -> torch.Tensor:
    """One optimizer step whose data gradient is exactly zero; returns the weight's change."""
    before = model.weight.detach().clone()
    if real_batch == 0:
        private.empty_step()  # a Poisson batch that drew nobody
    else:  # a real batch through the per-sample hooks, but a loss with zero gradient
        private.optimizer.zero_grad()
        x = torch.randn(real_batch, IN)
        (private.module(x) * 0.0).sum().backward()
        assert model.weight.grad_sample.abs().max() == 0  # the clipped per-sample gradients are zero
        private.optimizer.step()
    return (model.weight.detach() - before).flatten().double()


def assert_noise_std(update: torch.Tensor, expected_std: float) -> None:
    n = update.numel()
    assert n >= 10_000
    rel_se = 1 / math.sqrt(2 * (n - 1))  # relative standard error of a Gaussian sample std
    tolerance = 6 * rel_se  # ~3.8% for 12,800 elements: a 5% error in the scale cannot pass
    assert abs(float(update.mean())) < 6 * expected_std / math.sqrt(n), float(update.mean())
    measured = float(update.std())
    assert abs(measured / expected_std - 1) < tolerance, (measured, expected_std, tolerance)


@needs_opacus
@pytest.mark.parametrize("sigma, clip, batch, real_batch", [
    (1.3, 0.5, 16, 0),   # an empty Poisson batch: a noise-only step
    (1.3, 0.5, 16, 5),   # a real batch of 5 (not 16): still divided by the *expected* batch size
    (0.7, 2.0, 5, 11),
])
def test_noise_std_is_sigma_times_clip_over_expected_batch(sigma, clip, batch, real_batch) -> None:
    model, private = private_linear(PrivacyConfig(noise_multiplier=sigma, max_grad_norm=clip, reproducible=True),
                                    batch)
    assert private.expected_batch_size == batch and private.noise_multiplier == sigma
    assert_noise_std(noise_only_update(model, private, real_batch), sigma * clip / batch)


@needs_opacus
def test_calibrated_noise_is_the_noise_added_and_meets_the_budget() -> None:
    """With target_epsilon: the sigma the run reports is the one the noise has, and it is the
    sigma that spends the budget over exactly the planned steps (recomputed with Opacus)."""
    from opacus.accountants import RDPAccountant

    target, clip, batch, epochs, n_batches = 2.0, 0.8, 16, 3, 4
    model, private = private_linear(PrivacyConfig(target_epsilon=target, max_grad_norm=clip, reproducible=True),
                                    batch, epochs=epochs, n_batches=n_batches)
    sigma = private.noise_multiplier
    accountant = RDPAccountant()
    accountant.history = [(sigma, 1 / n_batches, epochs * n_batches)]
    assert target - 0.05 <= accountant.get_epsilon(delta=1e-5) <= target + 1e-6, sigma
    assert_noise_std(noise_only_update(model, private, 7), sigma * clip / batch)


def _wrong_sigma(engine_make_private):
    def make(self, **kw):
        kw["noise_multiplier"] *= 1.1
        return engine_make_private(self, **kw)
    return make


def _wrong_batch(engine_make_private):  # e.g. dividing by the loader's size + 1, or the actual batch
    def make(self, **kw):
        module, optimizer, loader = engine_make_private(self, **kw)
        optimizer.expected_batch_size += 1
        return module, optimizer, loader
    return make


def _no_clip_in_scale(engine_make_private):  # noise std sigma instead of sigma * C
    def make(self, **kw):
        kw["noise_multiplier"] /= kw["max_grad_norm"]
        return engine_make_private(self, **kw)
    return make


@needs_opacus
@pytest.mark.parametrize("planted", [_wrong_sigma, _wrong_batch, _no_clip_in_scale])
def test_planted_noise_scale_bugs_are_caught(monkeypatch: pytest.MonkeyPatch, planted) -> None:
    from opacus import PrivacyEngine

    monkeypatch.setattr(PrivacyEngine, "make_private", planted(PrivacyEngine.make_private))
    sigma, clip, batch = 1.3, 0.5, 16
    model, private = private_linear(PrivacyConfig(noise_multiplier=sigma, max_grad_norm=clip, reproducible=True),
                                    batch)
    with pytest.raises(AssertionError):
        assert_noise_std(noise_only_update(model, private, 5), sigma * clip / batch)
