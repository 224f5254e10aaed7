"""Tests for fromzero.config: recipes, dotted overrides, type checks, validation, help text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fromzero.config import (
    DataConfig,
    PretrainConfig,
    TrainConfig,
    all_keys,
    field_docs,
    from_dict,
    load_pretrain_config,
    load_yaml,
    options_help,
    parse_overrides,
    save_yaml,
    to_dict,
    validate_pretrain,
)
from fromzero.errors import FromzeroError
from fromzero.models.gpt import GPTConfig

RECIPE = """\
model:
  vocab_size: 0
  block_size: 64
  n_layer: 2
  n_head: 2
  n_embd: 32
train:
  batch_size: 4
  lr: 1e-3
  min_lr: 1e-4
  max_steps: 50
data:
  dir: data/tiny
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_load_recipe_with_defaults(tmp_path: Path) -> None:
    cfg = load_pretrain_config(write(tmp_path, RECIPE, "tiny-char.yaml"))
    assert isinstance(cfg, PretrainConfig)
    assert cfg.model == GPTConfig(vocab_size=0, block_size=64, n_layer=2, n_head=2, n_embd=32)
    assert cfg.train.batch_size == 4 and cfg.train.max_steps == 50
    # YAML 1.1 reads 1e-3 as a string; it must still become a float.
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-3
    assert cfg.train.min_lr == 1e-4
    assert cfg.train.beta2 == TrainConfig().beta2  # untouched fields keep their defaults
    assert cfg.data.dir == "data/tiny"
    assert cfg.name == "tiny-char"  # defaults to the recipe's stem


def test_overrides_are_parsed_and_typed(tmp_path: Path) -> None:
    recipe = write(tmp_path, RECIPE)
    cfg = load_pretrain_config(
        recipe,
        ["--train.lr", "3e-4", "--model.bias=false", "--train.compile", "true",
         "--model.n-layer", "3", "--data.dir=other", "--name", "exp1"],
    )
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 3e-4
    assert cfg.model.bias is False
    assert cfg.train.compile is True
    assert cfg.model.n_layer == 3  # dashes in keys mean underscores
    assert cfg.model.n_embd == 32  # merged with the recipe, not replacing the section
    assert cfg.data.dir == "other"
    assert cfg.name == "exp1"


def test_overrides_without_recipe_and_as_dict() -> None:
    cfg = load_pretrain_config(None, ["--train.batch_size", "7"])
    assert cfg.train.batch_size == 7 and cfg.model == GPTConfig() and cfg.name == "run"
    cfg = load_pretrain_config(None, {"train": {"dtype": "bfloat16"}})
    assert cfg.train.dtype == "bfloat16"


def test_parse_overrides_nested_dict() -> None:
    out = parse_overrides(["--train.lr", "3e-4", "--model.bias=false", "--out_dir", "x"], PretrainConfig)
    assert out == {"train": {"lr": "3e-4"}, "model": {"bias": False}, "out_dir": "x"}


@pytest.mark.parametrize(
    "tokens,msg",
    [
        (["train.lr", "1"], "unexpected argument 'train.lr'"),
        (["--"], "unexpected argument"),
        (["--train.lr"], "needs a value"),
    ],
)
def test_parse_overrides_malformed(tokens: list[str], msg: str) -> None:
    with pytest.raises(FromzeroError, match=msg):
        parse_overrides(tokens, PretrainConfig)


def test_unknown_key_in_yaml_suggests_closest(tmp_path: Path) -> None:
    recipe = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(FromzeroError) as e:
        load_pretrain_config(recipe)
    assert "unknown config key 'train.lrr'" in str(e.value)
    assert "did you mean 'train.lr'" in str(e.value)


def test_unknown_top_level_key_in_yaml(tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="unknown config key 'modle'.*'model'"):
        load_pretrain_config(write(tmp_path, "modle:\n  n_layer: 2\n"))
    with pytest.raises(FromzeroError, match="unknown config key 'zzzzzz'") as e:
        load_pretrain_config(write(tmp_path, "zzzzzz: 1\n"))
    assert "did you mean" not in str(e.value)  # no suggestion when nothing is close


def test_unknown_override_names_it_and_suggests() -> None:
    with pytest.raises(FromzeroError) as e:
        load_pretrain_config(None, ["--train.lrr", "0.1"])
    msg = str(e.value)
    assert "--train.lrr" in msg and "train.lr'" in msg and "did you mean" in msg
    with pytest.raises(FromzeroError, match="model.n_layers"):
        load_pretrain_config(None, ["--model.n_layers=2"])


@pytest.mark.parametrize(
    "text,key",
    [
        ("train:\n  batch_size: abc\n", "train.batch_size"),
        ("model:\n  n_layer: 2.5\n", "model.n_layer"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  compile: maybe\n", "train.compile"),
        ("model:\n  bias: 3\n", "model.bias"),
        ("data:\n  dir: [a, b]\n", "data.dir"),
        ("data:\n  dir: true\n", "data.dir"),
        ("train: 5\n", "train"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(FromzeroError) as e:
        load_pretrain_config(write(tmp_path, text))
    assert str(e.value).startswith(key + " must be")


def test_wrong_type_from_override() -> None:
    with pytest.raises(FromzeroError, match="train.batch_size must be int"):
        load_pretrain_config(None, ["--train.batch_size", "abc"])


def test_int_and_bool_coercions(tmp_path: Path) -> None:
    cfg = load_pretrain_config(write(tmp_path, "model:\n  n_layer: 4.0\ntrain:\n  max_steps: 1_000\n"))
    assert cfg.model.n_layer == 4 and isinstance(cfg.model.n_layer, int)
    assert cfg.train.max_steps == 1000
    cfg = load_pretrain_config(None, {"train": {"compile": "yes", "decay_lr": "false"}})
    assert cfg.train.compile is True and cfg.train.decay_lr is False
    with pytest.raises(FromzeroError, match="train.batch_size"):  # bool is not an int
        load_pretrain_config(None, {"train": {"batch_size": True}})


def test_bool_field_accepts_1_and_0_from_the_command_line() -> None:
    cfg = load_pretrain_config(None, ["--train.compile", "1", "--model.bias", "0"])
    assert cfg.train.compile is True and cfg.model.bias is False


def test_bad_yaml_reports_line(tmp_path: Path) -> None:
    recipe = write(tmp_path, "model:\n  n_layer: 2\ntrain:\n  lr: [1, 2\n  batch_size: 3\n")
    with pytest.raises(FromzeroError) as e:
        load_pretrain_config(recipe)
    msg = str(e.value)
    assert "invalid YAML" in msg and str(recipe) in msg
    assert "line " in msg
    line = int(msg.split("line ")[1].split(",")[0])
    assert 4 <= line <= 6
    assert "\n" not in msg  # one line


def test_bad_yaml_tab_indentation_reports_line(tmp_path: Path) -> None:
    recipe = write(tmp_path, "train:\n\tlr: 1\n")
    with pytest.raises(FromzeroError, match=r"line 2"):
        load_yaml(recipe)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="config file not found"):
        load_pretrain_config(tmp_path / "nope.yaml")
    with pytest.raises(FromzeroError, match="config file not found"):
        load_yaml(tmp_path)  # a directory is not a config file


def test_non_mapping_top_level(tmp_path: Path) -> None:
    with pytest.raises(FromzeroError, match="YAML mapping"):
        load_pretrain_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(FromzeroError, match="YAML mapping"):
        load_pretrain_config(write(tmp_path, "just a string\n"))


def test_empty_and_non_utf8_files(tmp_path: Path) -> None:
    cfg = load_pretrain_config(write(tmp_path, "", "empty.yaml"))
    assert cfg.train == TrainConfig() and cfg.name == "empty"
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FromzeroError, match="UTF-8"):
        load_yaml(p)


@pytest.mark.parametrize(
    "override,msg",
    [
        ({"train": {"min_lr": 0.01, "lr": 0.001}}, "min_lr"),
        ({"train": {"lr": 0.0}}, "lr"),
        ({"train": {"dtype": "fp8"}}, "train.dtype must be one of auto, float32, bfloat16, float16"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer must be one of adamw, sgd"),
        ({"train": {"compile_mode": "fast"}}, "train.compile_mode must be one of"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be a positive integer"),
        ({"train": {"eval_batches": -1}}, "train.eval_batches must be positive"),
        ({"train": {"warmup_steps": -5}}, "warmup_steps"),
        ({"train": {"grad_clip": -1.0}}, "grad_clip"),
        ({"model": {"n_embd": 30, "n_head": 4}}, "divisible"),
        ({"model": {"vocab_size": 0, "n_embd": 30, "n_head": 4}}, "divisible"),
        ({"model": {"dropout": 1.5}}, "dropout"),
    ],
)
def test_validate_pretrain_rejections(override: dict, msg: str) -> None:
    with pytest.raises(FromzeroError, match=msg):
        load_pretrain_config(None, override)


def test_validate_pretrain_accepts_vocab_size_zero() -> None:
    cfg = PretrainConfig(model=GPTConfig(vocab_size=0, n_layer=1, n_head=1, n_embd=8))
    validate_pretrain(cfg)  # 0 = "take it from the data": not an error
    validate_pretrain(PretrainConfig())
    for dtype in ("float32", "bfloat16", "float16", "auto"):
        assert load_pretrain_config(None, {"train": {"dtype": dtype}}).train.dtype == dtype


def test_validate_pretrain_rejects_nan() -> None:
    with pytest.raises(FromzeroError, match="lr"):
        load_pretrain_config(None, ["--train.lr", "nan"])


def test_from_dict_and_to_dict_round_trip() -> None:
    cfg = PretrainConfig(
        model=GPTConfig(n_layer=3, bias=False), train=TrainConfig(lr=5e-4), data=DataConfig(dir="d")
    )
    d = to_dict(cfg)
    assert d["model"]["n_layer"] == 3 and d["train"]["lr"] == 5e-4 and d["data"]["dir"] == "d"
    assert from_dict(PretrainConfig, d) == cfg


def test_save_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_pretrain_config(write(tmp_path, RECIPE), ["--train.lr", "3e-4"])
    out = tmp_path / "run" / "config.yaml"
    save_yaml(to_dict(cfg), out)
    again = load_pretrain_config(out)
    assert again == cfg


def test_all_keys() -> None:
    keys = all_keys(PretrainConfig)
    assert "train.lr" in keys and "model.n_layer" in keys and "data.dir" in keys
    assert "out_dir" in keys and "name" in keys and "dist.strategy" in keys and "dist.checkpoint" in keys
    assert "model" not in keys and "train" not in keys  # leaves only
    n = len(dataclasses.fields(GPTConfig)) + len(dataclasses.fields(TrainConfig)) + 1 + 2 + 2
    assert len(keys) == len(set(keys)) == n


def test_field_docs() -> None:
    docs = field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert docs["lr"] == "Peak learning rate (reached after warmup)."
    assert docs["dtype"].startswith("auto (bf16 where")  # inherited from TrainSettings
    assert "\n" not in docs["weight_decay"]
    gdocs = field_docs(GPTConfig)
    assert gdocs["n_layer"] == "Number of transformer blocks."


def test_options_help_lists_every_key_with_default() -> None:
    lines = options_help(PretrainConfig)
    text = "\n".join(lines)
    defaults = PretrainConfig()
    assert len(lines) == len(all_keys(PretrainConfig))
    for key in all_keys(PretrainConfig):
        obj = defaults
        *parents, leaf = key.split(".")
        for part in parents:
            obj = getattr(obj, part)
        value = getattr(obj, leaf)
        shown = "''" if value == "" else str(value)
        matching = [ln for ln in lines if ln.split()[0] == f"--{key}"]
        assert len(matching) == 1, key
        assert f"(default: {shown})" in matching[0], matching[0]
    assert "--train.lr (default: 0.001)  Peak learning rate" in text
    # Defaults from a loaded config are shown instead of the class defaults.
    custom = dataclasses.replace(defaults, train=TrainConfig(lr=0.5))
    assert any("--train.lr (default: 0.5)" in ln for ln in options_help(PretrainConfig, custom))


def test_renamed_keys_still_work_with_one_line_naming_the_new_name(capsys) -> None:
    """Pretraining keys now have the fine-tuning names (max_steps, eval_every, grad_accum,
    warmup_steps, decay_steps, eval_batches): an old recipe, an old override or the config.yaml
    of a run made before still works, each old key noted once with its new name; next to its new
    name (an old recipe + a new override) the new one wins."""
    from fromzero import config as config_mod
    from fromzero.config import PretrainConfig, deep_merge, from_dict, parse_overrides

    config_mod._RENAME_NOTES.clear()
    cfg = from_dict(PretrainConfig, {"train": {"max_iters": 40, "eval_interval": 10, "grad_accum_steps": 2,
                                               "warmup_iters": 5, "lr_decay_iters": 30, "eval_iters": 3}})
    t = cfg.train
    assert (t.max_steps, t.eval_every, t.grad_accum, t.warmup_steps, t.decay_steps, t.eval_batches) == (40, 10, 2, 5,
                                                                                                      30, 3)
    err = capsys.readouterr().err.splitlines()
    assert "note: train.max_iters is now called train.max_steps; please rename it" in err and len(err) == 6
    merged = deep_merge({"train": {"max_iters": 2000}}, parse_overrides(["--train.max_steps", "7"], PretrainConfig))
    assert from_dict(PretrainConfig, merged).train.max_steps == 7
    assert parse_overrides(["--train.max_iters", "9"], PretrainConfig) == {"train": {"max_steps": 9}}
    assert capsys.readouterr().err.count("note:") == 0  # each old key is noted once per process
