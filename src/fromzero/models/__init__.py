"""Model families. Each family module exposes ``build_from_config(config: dict) -> nn.Module``
that rebuilds a model from the ``config.json`` of a checkpoint directory (which names its
``model_type``); :func:`build_model` dispatches on that name. Each also declares ``FACTS``
(:class:`FamilyFacts`): what fine-tuning, LoRA, distillation and freezing need to know about its
modules, kept next to the model instead of in every consumer (:func:`family_facts`)."""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
    "fromzero-seq2seq": "fromzero.models.seq2seq",
    "fromzero-centernet": "fromzero.models.centernet",
    "fromzero-fcos": "fromzero.models.fcos",
    "fromzero-diffusion": "fromzero.models.diffusion",
}


@dataclass(frozen=True)
class FamilyFacts:
    """What the rest of fromzero needs to know about a model family's modules."""

    lora_targets: tuple[str, ...] = ()
    """Linear layers LoRA adapts by default (full names or their last parts); () = no LoRA."""
    peft_task_type: str = ""
    """PEFT's ``task_type`` for adapters of this family (SEQ_CLS, CAUSAL_LM)."""
    hf_mapping: str = ""
    """Module whose ``hf_module_names(config)`` maps our module names to Hugging Face's (PEFT adapters)."""
    depth_field: str = ""
    """The config field holding the number of layers (distillation builds shallower students)."""
    layer_prefix: str = ""
    """Parameter-name prefix of layer i, without i (``transformer.h.``)."""
    layer_stack: Callable[[Any], tuple[list, list]] = lambda model: ([], [])
    """(layers in order, modules after the last one): what ``unfreeze_top`` unfreezes from the top."""
    head_modules: Callable[[Any], list] = lambda model: []
    """The task head: what a frozen fine-tune trains."""
    export_signature: str = ""
    """Inputs of its ONNX export: causal-lm (input_ids -> logits) | encoder (input_ids,
    attention_mask[, token_type_ids]) | image (pixel_values) | detector (pixel_values -> raw heads);
    "" = not exportable."""
    attention: Callable[[Any], tuple[list, Callable]] | None = None
    """(attention modules in layer order, the forward that runs them over every token): what
    attention maps hook (``fromzero explain --method attention``); None = no attention maps."""


class ConfigDict:
    """``to_dict`` / ``from_dict`` of a family's config dataclass: config.json holds its fields and
    ``model_type`` (the class's MODEL_TYPE); reading ignores keys that are not fields."""

    MODEL_TYPE = ""

    def to_dict(self) -> dict:
        return {"model_type": self.MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def family_facts(model_or_type: Any) -> FamilyFacts:
    """The FACTS of a model family, given a ``model_type`` string or a model instance (ours, or a
    torchvision ResNet, which belongs to the cnn family)."""
    if isinstance(model_or_type, str):
        module_name = MODEL_REGISTRY.get(model_or_type)
        if module_name is None:
            raise FromzeroError(f"unsupported model_type {model_or_type!r} "
                                f"(supported: {', '.join(sorted(MODEL_REGISTRY))})")
        return importlib.import_module(module_name).FACTS
    families = set(MODEL_REGISTRY.values())
    for cls in type(model_or_type).__mro__:
        if cls.__module__ in families:
            return importlib.import_module(cls.__module__).FACTS
        if cls.__module__.startswith("torchvision.models."):
            return importlib.import_module(MODEL_REGISTRY["fromzero-cnn"]).FACTS
    return FamilyFacts()


def facts_with(model_type: str, fact: str, error: str) -> FamilyFacts:
    """The facts of ``model_type``'s family when it declares ``fact`` (e.g. ``lora_targets``);
    else a one-line error: ``error`` formatted with ``supported`` (the families that declare it)
    and ``model_type``."""
    facts = family_facts(model_type) if model_type in MODEL_REGISTRY else None
    if facts is None or not getattr(facts, fact):
        supported = ", ".join(t for t in sorted(MODEL_REGISTRY) if getattr(family_facts(t), fact))
        raise FromzeroError(error.format(supported=supported, model_type=repr(model_type)))
    return facts


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
