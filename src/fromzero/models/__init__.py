"""Model families. Each family module exposes ``build_from_config(config: dict) -> nn.Module``
that rebuilds a model from the ``config.json`` of a checkpoint directory (which names its
``model_type``); :func:`build_model` dispatches on that name."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from fromzero.errors import FromzeroError

if TYPE_CHECKING:  # the package itself stays light: `--help` finds model modules without importing torch
    import torch

# model_type in a checkpoint's config.json -> module that can rebuild it
MODEL_REGISTRY: dict[str, str] = {
    "fromzero-gpt": "fromzero.models.gpt",
    "fromzero-bert": "fromzero.models.bert",
    "fromzero-vit": "fromzero.models.vit",
    "fromzero-cnn": "fromzero.models.cnn",
    "fromzero-recsys": "fromzero.models.recsys",
}


def build_model(config: dict) -> torch.nn.Module:
    """A freshly initialised model for a checkpoint config (weights are loaded separately)."""
    model_type = config.get("model_type")
    module_name = MODEL_REGISTRY.get(str(model_type))
    if module_name is None:
        raise FromzeroError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(MODEL_REGISTRY))})"
        )
    module = importlib.import_module(module_name)
    try:
        return module.build_from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise FromzeroError(f"invalid {model_type} config: {e}") from None


def load_plain_checkpoint(directory: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The loader of plain checkpoints (config.json + model.safetensors), registered in
    :mod:`fromzero.checkpoint`: rebuild the family from config.json, then load the weights."""
    from fromzero.checkpoint import CONFIG_FILE, MODEL_FILE, load_weights, read_json

    config = read_json(directory / CONFIG_FILE, "model config")
    try:
        model = build_model(config)
    except FromzeroError as e:
        raise FromzeroError(f"{directory / CONFIG_FILE}: {e}") from None
    load_weights(model, directory / MODEL_FILE)
    return model.to(device).eval()
