"""One recipe shape for every command: task, model, data, train, method, dist sections, dotted
overrides, the previous flat shape still loading with one line naming the new places."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fromzero.config import flatten_recipe, load_pretrain_config, recipe_keys, section_recipe
from fromzero.errors import FromzeroError
from fromzero.finetune.recipe import load_finetune_config, load_run_config, task_config_class
from fromzero.tasks import finetuning_tasks

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipes(kind: str) -> list[Path]:
    out = []
    for path in sorted(RECIPES.glob("*.yaml")):
        task = yaml.safe_load(path.read_text()).get("task")
        if (task == "pretrain") == (kind == "pretrain"):
            out.append(path)
    return out


@pytest.mark.parametrize("path", _recipes("finetune"), ids=lambda p: p.name)
def test_shipped_recipes_are_sectioned_and_their_flat_form_is_the_same_config(path: Path, tmp_path: Path, capsys) -> None:
    data = yaml.safe_load(path.read_text())
    assert set(data) <= {"task", "model", "data", "train", "method", "distill", "dist", "privacy"}, sorted(data)
    task, cfg = load_finetune_config(path)
    assert capsys.readouterr().err == ""  # a sectioned recipe loads without notes
    cls = task_config_class(task)
    flat = flatten_recipe(cls, {k: v for k, v in data.items() if k != "task"})
    old = tmp_path / "flat.yaml"
    old.write_text(yaml.safe_dump({"task": task, **flat}))
    _, again = load_finetune_config(old)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    notes = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(notes) == 1 and notes[0].startswith("note:"), notes  # one line for the whole recipe
    assert all(f"{name} -> {keys}" in notes[0] for name, keys in recipe_keys(cls).items() if name in flat and keys != name)


@pytest.mark.parametrize("path", _recipes("pretrain"), ids=lambda p: p.name)
def test_pretraining_recipes_name_their_task(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert data["task"] == "pretrain" and {"model", "train"} <= set(data)
    if "tune" not in data:
        load_pretrain_config(path)


def test_every_field_of_every_task_has_one_place_and_round_trips() -> None:
    for task in finetuning_tasks():
        cls = task_config_class(task)
        keys = recipe_keys(cls)
        assert len(set(keys.values())) == len(keys), f"{task}: two fields share a recipe key"
        sections = {v.partition(".")[0] for v in keys.values() if "." in v}
        assert sections <= {"model", "data", "train", "method", "distill", "dist"}, (task, sections)
        flat = dataclasses.asdict(cls())
        assert flatten_recipe(cls, section_recipe(cls, flat)) == flat


def test_dotted_and_short_overrides_set_the_same_field(tmp_path: Path) -> None:
    recipe = RECIPES / "genre-minilm.yaml"
    _, dotted = load_finetune_config(recipe, ["--train.lr", "1e-4", "--method.name", "frozen", "--data.max_length", "64"])
    _, short = load_finetune_config(recipe, ["--lr", "1e-4", "--method", "frozen", "--max_length", "64"])
    assert dataclasses.asdict(dotted) == dataclasses.asdict(short)
    assert (dotted.lr, dotted.method, dotted.max_length) == (1e-4, "frozen", 64)


@pytest.mark.parametrize("where", ["recipe", "override"])
def test_unknown_dotted_key_is_refused_with_the_closest_one(where: str, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    body = {"task": "text-classification", "train": {"lrr": 1e-3}} if where == "recipe" else {"task": "text-classification"}
    recipe.write_text(yaml.safe_dump(body))
    overrides = ["--train.lrr", "1e-3"] if where == "override" else []
    with pytest.raises(FromzeroError, match="train.lrr.*did you mean.*train.lr"):
        load_finetune_config(recipe, overrides)


def test_a_recipe_sent_to_the_other_command_says_which(tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="pretraining recipe .*fromzero pretrain"):
        load_finetune_config(RECIPES / "shakespeare-char.yaml")
    with pytest.raises(FromzeroError, match="fine-tuning recipe .*fromzero finetune"):
        load_pretrain_config(RECIPES / "genre-minilm.yaml")


def test_run_config_is_sectioned_and_an_old_flat_one_still_resumes(tmp_path: Path) -> None:
    """config.yaml of a fine-tuning run has the recipe shape; a flat one written before loads
    as it is (no notes: the user did not write it)."""
    from fromzero.finetune.engine import start_run_dir
    from fromzero.training.distributed import DistContext

    _, cfg = load_finetune_config(RECIPES / "digits-cnn.yaml", ["--out_dir", str(tmp_path / "run")])
    run_dir = start_run_dir(cfg, "image-classification", DistContext())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["task"] == "image-classification" and saved["train"]["lr"] == cfg.lr
    assert saved["data"]["source"] == "digits" and saved["out_dir"] == str(run_dir)
    (run_dir / "checkpoints" / "last").mkdir(parents=True)
    (run_dir / "checkpoints" / "last" / "info.json").write_text('{"step": 1}')
    _, resumed = load_run_config(run_dir, ["--train.epochs", "7"])
    assert resumed.epochs == 7 and dataclasses.replace(resumed, epochs=cfg.epochs, force=False) == \
        dataclasses.replace(cfg, out_dir=str(run_dir), force=False)
    flat = {"task": "image-classification", **dataclasses.asdict(cfg)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(flat))
    _, old = load_run_config(run_dir)
    assert old.lr == cfg.lr and old.data_dir == "digits"


def test_tune_searches_a_fine_tuning_recipe_by_its_dotted_keys(tmp_path: Path) -> None:
    """A tune space over a sectioned fine-tuning recipe names keys as the recipe does (an old flat
    key names the same setting); each trial's config has the drawn value; best-recipe.yaml keeps
    the recipe's shape."""
    from fromzero.tune import Search, set_dotted

    recipe = tmp_path / "tune.yaml"
    body = yaml.safe_load((RECIPES / "digits-cnn.yaml").read_text())
    body["tune"] = {"space": {"train.lr": {"log_uniform": [1e-3, 1e-1]}, "batch_size": {"choice": [16, 32]}}}
    recipe.write_text(yaml.safe_dump(body))
    search = Search(recipe, ["--train.epochs", "2"])
    assert sorted(d.key for d in search.dimensions) == ["train.batch_size", "train.lr"]
    data = search.base
    set_dotted(data, "train.lr", 0.02)
    cfg = search.build(data, tmp_path / "trial-000")
    assert (cfg.lr, cfg.epochs, cfg.out_dir, cfg.progress) == (0.02, 2, str(tmp_path / "trial-000"), False)
    best = search.best_recipe({"train.lr": 0.03, "train.batch_size": 16})
    assert best["task"] == "image-classification" and best["train"]["lr"] == 0.03 and best["train"]["batch_size"] == 16
    assert "lr" not in best and "out_dir" not in best
