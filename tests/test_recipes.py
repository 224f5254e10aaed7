"""Every recipe in recipes/ loads, validates and builds its model (LitGPT's "config hub tested")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fromzero.config import load_pretrain_config
from fromzero.models.gpt import GPT

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "shakespeare-char.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds_a_working_model(recipe):
    cfg = load_pretrain_config(recipe)
    if cfg.model.vocab_size == 0:  # taken from the data at run time
        cfg.model.vocab_size = 84
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (2, min(cfg.model.block_size, 16)))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, idx.size(1), cfg.model.vocab_size)
    assert torch.isfinite(loss)
