"""Hugging Face ViT <-> fromzero ViT (see the converter protocol in fromzero.models.hf).

Reads ``ViTModel`` checkpoints (bare keys, pooler optional) and ``ViTForImageClassification``
checkpoints (``vit.`` prefix + ``classifier.*``), in the layout ``save_pretrained`` writes and
the hub holds (``encoder.layer.0.attention.attention.query``, ...) or in transformers 5's
in-memory layout (``layers.0.attention.q_proj``, ...). Writes the former, which every
transformers version loads. The name map is :func:`_name_pairs`; HF's separate query / key /
value are stacked (rows q, k, v) into our ``blocks.i.attn.qkv``.
"""

from __future__ import annotations

from typing import Any

import torch

from fromzero.errors import FromzeroError
from fromzero.models.hf import check_keys, check_shape
from fromzero.models.vit import ViTConfig, _pair

HF_MODEL_TYPES = ("vit",)
FROMZERO_MODEL_TYPE = "fromzero-vit"

# Our names of one block -> (legacy HF name, transformers-5 HF name), both relative to the block.
_BLOCK_NAMES = {
    "ln_1": ("layernorm_before", "layernorm_before"),
    "attn.q": ("attention.attention.query", "attention.q_proj"),
    "attn.k": ("attention.attention.key", "attention.k_proj"),
    "attn.v": ("attention.attention.value", "attention.v_proj"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "ln_2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_BLOCK_PREFIX = ("encoder.layer", "layers")  # legacy, transformers 5

# HF ViTConfig defaults, for configs that leave fields out.
_HF_DEFAULTS = {
    "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-12, "qkv_bias": True, "pooler_act": "tanh",
}


def _as_size(value: object) -> int | list[int]:
    """HF stores sizes as an int or a pair; keep an int when square."""
    h, w = _pair(value)  # type: ignore[arg-type]
    return h if h == w else [h, w]


def _label_names(hf_config: dict, num_labels: int) -> list[str] | None:
    """Class names from HF's id2label, unless they are the placeholder LABEL_i names."""
    id2label = hf_config.get("id2label")
    if not num_labels or not isinstance(id2label, dict) or len(id2label) != num_labels:
        return None
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, TypeError):
        return None
    if names == [f"LABEL_{i}" for i in range(num_labels)]:
        return None
    return names


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """HF ViTModel / ViTForImageClassification config + weights -> fromzero ViT config + weights."""
    where = "Hugging Face ViT checkpoint"
    # ViTForImageClassification keeps the encoder under "vit." and the head at the top level.
    prefix = "vit." if any(k.startswith("vit.") for k in hf_state) else ""

    def hf_name(name: str) -> str:
        return name if name.startswith("classifier.") else prefix + name

    num_labels = 0
    if "classifier.weight" in hf_state:
        head = hf_state["classifier.weight"]
        if head.dim() != 2:
            raise FromzeroError(
                f"{where}: tensor classifier.weight has shape {tuple(head.shape)}, expected (num_labels, hidden_size)"
            )
        num_labels = int(head.shape[0])
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    try:
        hidden = int(hf["hidden_size"])
        pooler_size = int(hf.get("pooler_output_size") or hidden)
        config = ViTConfig(
            image_size=_as_size(hf["image_size"]),
            patch_size=_as_size(hf["patch_size"]),
            num_channels=int(hf["num_channels"]),
            hidden_size=hidden,
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            hidden_act=str(hf["hidden_act"]),
            layer_norm_eps=float(hf["layer_norm_eps"]),
            hidden_dropout_prob=float(hf["hidden_dropout_prob"]),
            attention_probs_dropout_prob=float(hf["attention_probs_dropout_prob"]),
            qkv_bias=bool(hf["qkv_bias"]),
            num_labels=num_labels,
            pooler=hf_name("pooler.dense.weight") in hf_state,
            pooler_output_size=0 if pooler_size == hidden else pooler_size,
            pooler_act=str(hf["pooler_act"]),
            labels=_label_names(hf_config, num_labels),
        )
        config.validate()
    except (TypeError, ValueError) as e:
        raise FromzeroError(f"{where}: unsupported config: {e}") from None

    # Which key layout: save_pretrained's (legacy) or transformers 5's in-memory one.
    layout = 1 if any(k.startswith(prefix + "layers.") for k in hf_state) else 0
    expected = {hf_name(name): shape for name, shape in _hf_shapes(config, layout).items()}
    check_keys(set(expected), set(hf_state), where)
    for name, shape in expected.items():
        check_shape(name, hf_state[name], shape, where)

    out = {ours: hf_state[hf_name(name)] for ours, name in _name_pairs(config, layout)}
    for i, qkv, kinds in _qkv_names(config, layout):
        for kind in kinds:  # q, k and v are stacked row-wise into one (3D, D) projection
            parts = [hf_state[hf_name(f"{name}.{kind}")] for name in qkv]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return config.to_dict(), out


def _name_pairs(config: ViTConfig, layout: int) -> list[tuple[str, str]]:
    """(our name, HF name without the ``vit.`` prefix) of every tensor but the fused q/k/v."""
    pairs = [("patch_embed.weight", "embeddings.patch_embeddings.projection.weight"),
             ("patch_embed.bias", "embeddings.patch_embeddings.projection.bias"),
             ("cls_token", "embeddings.cls_token"), ("pos_embed", "embeddings.position_embeddings"),
             ("ln_f.weight", "layernorm.weight"), ("ln_f.bias", "layernorm.bias")]
    for i in range(config.num_hidden_layers):
        for ours in ("ln_1", "attn.proj", "ln_2", "mlp.fc1", "mlp.fc2"):
            hf = f"{_BLOCK_PREFIX[layout]}.{i}.{_BLOCK_NAMES[ours][layout]}"
            pairs += [(f"blocks.{i}.{ours}.{kind}", f"{hf}.{kind}") for kind in ("weight", "bias")]
    if config.pooler:
        pairs += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
    if config.num_labels:
        pairs += [("head.weight", "classifier.weight"), ("head.bias", "classifier.bias")]
    return pairs


def _qkv_names(config: ViTConfig, layout: int) -> list[tuple[int, list[str], tuple[str, ...]]]:
    """(block, HF query / key / value module names, stored kinds) of every block."""
    kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
    return [(i, [f"{_BLOCK_PREFIX[layout]}.{i}.{_BLOCK_NAMES[f'attn.{x}'][layout]}" for x in "qkv"], kinds)
            for i in range(config.num_hidden_layers)]


def _hf_shapes(config: ViTConfig, layout: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config holds (without the ``vit.`` prefix) and its shape."""
    D, I = config.hidden_size, config.intermediate_size
    ph, pw = _pair(config.patch_size)
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.patch_embeddings.projection.weight": (D, config.num_channels, ph, pw),
        "embeddings.patch_embeddings.projection.bias": (D,),
        "embeddings.cls_token": (1, 1, D),
        "embeddings.position_embeddings": (1, 1 + config.num_patches, D),
        "layernorm.weight": (D,),
        "layernorm.bias": (D,),
    }
    per_block = {
        "ln_1": ((D,), (D,)), "attn.q": ((D, D), (D,)), "attn.k": ((D, D), (D,)),
        "attn.v": ((D, D), (D,)), "attn.proj": ((D, D), (D,)), "ln_2": ((D,), (D,)),
        "mlp.fc1": ((I, D), (I,)), "mlp.fc2": ((D, I), (D,)),
    }
    for i in range(config.num_hidden_layers):
        for ours, (w, b) in per_block.items():
            name = f"{_BLOCK_PREFIX[layout]}.{i}.{_BLOCK_NAMES[ours][layout]}"
            shapes[name + ".weight"] = w
            if config.qkv_bias or ours not in ("attn.q", "attn.k", "attn.v"):
                shapes[name + ".bias"] = b
    if config.pooler:
        P = config.pooler_output_size or D
        shapes["pooler.dense.weight"] = (P, D)
        shapes["pooler.dense.bias"] = (P,)
    if config.num_labels:
        shapes["classifier.weight"] = (config.num_labels, D)
        shapes["classifier.bias"] = (config.num_labels,)
    return shapes


def to_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """fromzero ViT -> HF config + weights in the layout ``save_pretrained`` writes.

    With a head: ``ViTForImageClassification`` (encoder under ``vit.``); a pooler, if the model
    has one, is kept as ``vit.pooler.*`` so ``AutoModel`` restores it too (the classifier
    ignores it). Without a head: ``ViTModel``; if our model has no pooler either,
    ``transformers`` initialises its pooler randomly (``last_hidden_state`` is still ours).
    """
    cfg = ViTConfig.from_dict(config)
    cfg.validate()
    D = cfg.hidden_size
    classify = cfg.num_labels > 0
    prefix = "vit." if classify else ""
    dtype = next(iter(state.values())).dtype if state else torch.float32

    hf_config: dict = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification" if classify else "ViTModel"],
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.num_channels,
        "hidden_size": D,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "hidden_dropout_prob": cfg.hidden_dropout_prob,
        "attention_probs_dropout_prob": cfg.attention_probs_dropout_prob,
        "layer_norm_eps": cfg.layer_norm_eps,
        "qkv_bias": cfg.qkv_bias,
        "pooler_output_size": cfg.pooler_output_size or D,
        "pooler_act": cfg.pooler_act,
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if classify:
        names = cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        hf_config["num_labels"] = cfg.num_labels
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}

    def hf_name(name: str) -> str:  # the classifier sits outside the "vit." encoder
        return name if name.startswith("classifier.") else prefix + name

    out = {hf_name(name): state[ours].detach().contiguous() for ours, name in _name_pairs(cfg, 0)}
    for i, qkv, kinds in _qkv_names(cfg, 0):
        for kind in kinds:
            for name, part in zip(qkv, state[f"blocks.{i}.attn.qkv.{kind}"].split(D, dim=0)):
                out[f"{prefix}{name}.{kind}"] = part.detach().contiguous()
    return hf_config, out


def hf_module_names(config: dict) -> tuple[dict[str, Any], dict]:
    """fromzero module name -> HF module name(s) of the exported ViT, for LoRA adapters (see
    fromzero.finetune.lora). We fuse what HF splits: ``attn.qkv`` -> attention.query / key /
    value, given as [(HF name, output rows), ...]; the head is HF's ``classifier``."""
    cfg = ViTConfig.from_dict(config)
    D = cfg.hidden_size
    prefix = "vit." if cfg.num_labels > 0 else ""
    names: dict[str, Any] = {"patch_embed": prefix + "embeddings.patch_embeddings.projection",
                             "ln_f": prefix + "layernorm"}
    if cfg.pooler:
        names["pooler"] = prefix + "pooler.dense"
    if cfg.num_labels > 0:
        names["head"] = "classifier"
    for i in range(cfg.num_hidden_layers):
        # PEFT names the modules of the model in memory: transformers 5's layout (the files keep
        # the legacy names, which from_pretrained maps).
        ours, hf = f"blocks.{i}.", f"{prefix}{_BLOCK_PREFIX[1]}.{i}."
        new = {k: hf + current for k, (_, current) in _BLOCK_NAMES.items()}
        names.update({
            ours + "ln_1": new["ln_1"], ours + "ln_2": new["ln_2"],
            ours + "attn.qkv": [(new["attn.q"], D), (new["attn.k"], D), (new["attn.v"], D)],
            ours + "attn.proj": new["attn.proj"], ours + "mlp.fc1": new["mlp.fc1"], ours + "mlp.fc2": new["mlp.fc2"],
        })
    return names, {}

