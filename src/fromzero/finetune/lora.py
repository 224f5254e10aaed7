"""LoRA with ``peft`` on fromzero models, saved in PEFT's own format with Hugging Face names.

:func:`apply_lora` wraps a fromzero model with ``peft.get_peft_model``: the target Linear layers
get ``lora_A`` / ``lora_B`` (the update is ``(alpha / r) * B @ A``), the base is frozen and the new
task head (``modules_to_save``) trains in full. :func:`save_adapter` writes adapter_config.json and
adapter_model.safetensors under the module names of the model ``fromzero convert to-hf`` exports
(plus config.json, tokenizer.json and info.json naming ``base_checkpoint``), so
``PeftModel.from_pretrained`` on the exported base gives fromzero's outputs (tested);
:func:`load_adapter_model` reads it back (base + adapter, merged) and ``fromzero merge-lora``
writes the merged weights as a plain checkpoint. Where HF splits a layer we fuse (LLaMA's
q/k/v_proj from our c_attn), the exported adapter repeats A and cuts B by rows: the same update.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fromzero.errors import FromzeroError, first_line
from fromzero.finetune.methods import MethodConfig
from fromzero.models import FamilyFacts

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

def lora_facts(model_config: dict) -> FamilyFacts:
    """The model family's facts, or a one-line error for a family LoRA does not support."""
    from fromzero.models import facts_with

    return facts_with(str(model_config.get("model_type")), "lora_targets",
                      "LoRA is supported for {supported} models, not {model_type}; use method full or frozen")


def default_targets(model_config: dict) -> list[str]:
    """The Linear layers LoRA adapts when a recipe names none: the family's (see models.FamilyFacts)."""
    return list(lora_facts(model_config).lora_targets)


def hf_names(model_config: dict) -> tuple[dict[str, str], dict]:
    """(fromzero module -> HF module names, extra LoraConfig fields) for a model family."""
    return importlib.import_module(lora_facts(model_config).hf_mapping).hf_module_names(model_config)


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full Linear-layer names matched by ``targets`` (a full name, or its trailing part)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    matched: list[str] = []
    for target in targets:
        hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            leaves = sorted({re.sub(r"^(.*\.)?\d+\.", "", n) for n in linears})  # layers.0.attn.query -> attn.query
            raise FromzeroError(f"lora target {target!r} matches no Linear layer; the model has: {', '.join(leaves)}")
        matched += [n for n in hits if n not in matched]
    return matched


def apply_lora(model: nn.Module, model_config: dict, method: MethodConfig, modules_to_save: list[str]) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (base frozen; ``modules_to_save`` train in full)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, model_config, method, modules_to_save))


def lora_config(model: nn.Module, model_config: dict, method: MethodConfig, modules_to_save: list[str]
                ) -> Any:
    """peft's LoraConfig of ``method`` for ``model`` (the family's default targets if it names none),
    refusing bad settings and families whose adapters cannot be exported, before training."""
    from peft import LoraConfig

    hf_names(model_config)
    if method.lora_rank <= 0:
        raise FromzeroError(f"lora_rank must be a positive integer, got {method.lora_rank}")
    if not 0.0 <= method.lora_dropout < 1.0:
        raise FromzeroError(f"lora_dropout must be in [0, 1), got {method.lora_dropout}")
    targets = method.lora_targets or default_targets(model_config)
    return LoraConfig(r=method.lora_rank, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
                      target_modules=resolve_targets(model, list(targets)), bias="none",
                      modules_to_save=list(modules_to_save) or None)


def base_model(model: nn.Module) -> nn.Module:
    """The fromzero model inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _split_key(key: str, modules: Any, what: str) -> tuple[str, str]:
    """'<module>.<rest>' -> (module, rest) for the longest module prefix of key in ``modules``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return module, ".".join(parts[cut:])
    raise FromzeroError(f"{what}: no module name for tensor {key!r}")


def _parts(mapped: str | list[tuple[str, int]]) -> list[tuple[str, int | None]]:
    """A name-map value as a list of (HF module, output rows): one entry unless the HF model
    splits our fused layer (LLaMA's q/k/v_proj from our c_attn)."""
    return [(mapped, None)] if isinstance(mapped, str) else list(mapped)


def to_hf_adapter_state(state: dict[str, torch.Tensor], names: dict) -> dict[str, torch.Tensor]:
    """peft tensors under our module names -> under HF's. A fused layer split in HF gets the
    same A for every part and its B cut by output rows: (B_q; B_k; B_v) @ A is exactly the
    fused update, so the adapters are equal (eval outputs match; dropout differs in training)."""
    out = {}
    for key, tensor in state.items():
        module, rest = _split_key(key.removeprefix(PEFT_PREFIX), names, "adapter")
        parts = _parts(names[module])
        if len(parts) == 1:
            out[f"{PEFT_PREFIX}{parts[0][0]}.{rest}"] = tensor
        elif rest.startswith("lora_A."):
            out.update({f"{PEFT_PREFIX}{hf}.{rest}": tensor.clone() for hf, _ in parts})
        elif rest.startswith("lora_B."):
            pieces = tensor.split([rows for _, rows in parts])
            out.update({f"{PEFT_PREFIX}{hf}.{rest}": piece.clone() for (hf, _), piece in zip(parts, pieces)})
        else:
            raise FromzeroError(f"adapter: {module}.{rest} of a split layer has no Hugging Face counterpart")
    return out


def from_hf_adapter_state(state: dict[str, torch.Tensor], names: dict, what: str) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf_adapter_state` (split parts: A from the first, B concatenated)."""
    place = {hf: (ours, i) for ours, mapped in names.items() for i, (hf, _) in enumerate(_parts(mapped))}
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        hf, rest = _split_key(key.removeprefix(PEFT_PREFIX), place, what)
        ours, index = place[hf]
        grouped.setdefault(f"{PEFT_PREFIX}{ours}.{rest}", {})[index] = tensor
    out = {}
    for key, pieces in grouped.items():
        ordered = [pieces[i] for i in sorted(pieces)]
        out[key] = torch.cat(ordered) if ".lora_B." in f".{key}" and len(ordered) > 1 else ordered[0]
    return out


def save_adapter(directory: Path, peft_model: nn.Module, model_config: dict, base_checkpoint: Path,
                 tokenizer_file: Path | None = None, info: dict | None = None) -> None:
    """Write the adapter checkpoint directory atomically (layout in the module docstring)."""
    from peft import LoraConfig, get_peft_model_state_dict

    from fromzero.checkpoint import atomic_directory, write_checkpoint_files, write_safetensors

    from peft.tuners.lora import LoraLayer

    names, extra = hf_names(model_config)
    ours: Any = peft_model.peft_config["default"]
    # The adapted layers, read off the model: peft may have shortened a long target list to suffixes.
    adapted = [n.removeprefix(PEFT_PREFIX) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    state = get_peft_model_state_dict(peft_model)
    hf_state = {k: v.detach().cpu().contiguous() for k, v in to_hf_adapter_state(state, names).items()}
    config = LoraConfig(
        r=ours.r, lora_alpha=ours.lora_alpha, lora_dropout=ours.lora_dropout, bias="none",
        target_modules=sorted(hf for t in adapted for hf, _ in _parts(names[t])),
        modules_to_save=sorted(hf for m in ours.modules_to_save for hf, _ in _parts(names[m]))
        if ours.modules_to_save else None,
        task_type=lora_facts(model_config).peft_task_type or None, base_model_name_or_path=str(Path(base_checkpoint).resolve()),
        **extra,
    )
    meta = {**(info or {}), "base_checkpoint": str(Path(base_checkpoint).resolve()), "adapter": "lora"}
    with atomic_directory(Path(directory)) as tmp:
        write_safetensors(hf_state, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config.to_dict(), indent=2, default=sorted) + "\n")
        write_checkpoint_files(tmp, model_config, tokenizer_file, meta)


def load_base(model: nn.Module, base_checkpoint: Path) -> list[str]:
    """Load a base checkpoint's weights into ``model`` (built for a new task); return the model's
    tensors the base lacked (its new head). Base tensors the model has no place for (another
    task's head) are ignored."""
    from fromzero.checkpoint import MODEL_FILE, load_weights

    base_checkpoint = Path(base_checkpoint)
    if not (base_checkpoint / MODEL_FILE).is_file():
        raise FromzeroError(f"base checkpoint {base_checkpoint} has no {MODEL_FILE}")
    missing, _ = load_weights(model, base_checkpoint / MODEL_FILE, partial=True)
    return missing


def load_adapter_checkpoint(directory: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The loader of LoRA adapter checkpoints, registered in :mod:`fromzero.checkpoint`: base +
    adapter, merged into plain weights, in eval mode."""
    return load_adapter_model(directory).to(device).eval()


def load_adapter_model(directory: Path, merge: bool = True, dropout: float = 0.0) -> nn.Module:
    """Rebuild base + LoRA adapter from an adapter checkpoint directory, merged into plain weights
    (merge False: the peft model, its adapter trainable with ``dropout``)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from fromzero.models import build_model
    from fromzero.checkpoint import CONFIG_FILE, INFO_FILE, read_json

    directory = Path(directory)
    model_config = read_json(directory / CONFIG_FILE, "model config")
    info = read_json(directory / INFO_FILE, "adapter info")
    adapter = read_json(directory / ADAPTER_CONFIG, "adapter config")
    base_dir = Path(str(info.get("base_checkpoint", "")))
    if not base_dir.is_dir():
        raise FromzeroError(f"{directory}: the base checkpoint of this adapter is gone ({base_dir})")
    try:
        model = build_model(model_config)
    except FromzeroError as e:
        raise FromzeroError(f"{directory / CONFIG_FILE}: {e}") from None
    load_base(model, base_dir)
    if isinstance(info.get("qlora"), dict):  # trained on the 4-bit base: merge into it, dequantized
        from fromzero.finetune.qlora import round_base_to_int4

        round_base_to_int4(model, int(info["qlora"].get("group_size", 64)))
    names, _ = hf_names(model_config)
    ours = {hf: fz for fz, mapped in names.items() for hf, _ in _parts(mapped)}
    try:
        targets = sorted({ours[t] for t in adapter["target_modules"]})
        to_save = [ours[m] for m in adapter.get("modules_to_save") or []]
        config = LoraConfig(r=int(adapter["r"]), lora_alpha=float(adapter["lora_alpha"]), target_modules=targets,
                            lora_dropout=dropout, modules_to_save=to_save or None, bias="none")
    except (KeyError, TypeError, ValueError) as e:
        raise FromzeroError(f"{directory / ADAPTER_CONFIG}: not an adapter of this model ({first_line(e)})") from None
    peft_model = get_peft_model(model, config)
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as e:  # missing or corrupt file
        raise FromzeroError(f"cannot read {directory / ADAPTER_WEIGHTS}: {first_line(e)}") from None
    state = from_hf_adapter_state(state, names, str(directory))
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except KeyError as e:  # peft looks up modules_to_save tensors (a head) by name
        raise FromzeroError(f"{directory / ADAPTER_WEIGHTS}: missing tensor {e} (an incomplete or "
                            "mismatched adapter)") from None
    except RuntimeError as e:  # shapes that do not fit adapter_config.json (its r, its targets)
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), first_line(e))
        raise FromzeroError(f"{directory / ADAPTER_WEIGHTS} does not fit {ADAPTER_CONFIG}: {detail}") from None
    if result.unexpected_keys:
        raise FromzeroError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensors {result.unexpected_keys[:3]}")
    if not merge:
        return peft_model
    with torch.no_grad():
        return peft_model.merge_and_unload()


def merge_lora(directory: Path, out: Path, force: bool = False) -> Path:
    """``fromzero merge-lora``: write base + adapter, merged, as a plain checkpoint directory."""
    from fromzero.checkpoint import CONFIG_FILE, INFO_FILE, TOKENIZER_FILE, read_json, save_checkpoint

    directory, out = Path(directory), Path(out)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FromzeroError(f"{directory} is not a LoRA adapter checkpoint (no {ADAPTER_CONFIG})")
    if out.exists() and any(out.iterdir()) and not force:
        raise FromzeroError(f"{out} already exists; pass --force to replace it")
    model = load_adapter_model(directory)
    info = read_json(directory / INFO_FILE, "adapter info")
    info = {k: v for k, v in info.items() if k != "adapter"} | {"merged_from": str(directory.resolve())}
    tokenizer = directory / TOKENIZER_FILE
    # A chat model's template files (chat_template.jinja, tokenizer_config.json) come along, so
    # the merged model still chats and `convert to-gguf` can store its template.
    from fromzero.finetune.sft import TEMPLATE_FILES, save_with_template_files

    has_template = any((directory / name).is_file() for name in TEMPLATE_FILES)
    save_with_template_files(
        out, lambda d: save_checkpoint(d, model, read_json(directory / CONFIG_FILE, "model config"),
                                       tokenizer_file=tokenizer if tokenizer.is_file() else None, info=info),
        directory if has_template else None)
    return out
