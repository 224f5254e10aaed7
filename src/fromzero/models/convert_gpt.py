"""Hugging Face <-> fromzero for decoder-only language models (GPT-2, LLaMA, Mistral, Qwen2).

The family converter of :mod:`fromzero.models.hf` (see its docstring for the protocol)::

    fromzero convert from-hf ./gpt2 checkpoints/gpt2             # GPT2LMHeadModel directory
    fromzero convert from-hf ./TinyLlama checkpoints/tinyllama   # LlamaForCausalLM
    fromzero convert to-hf runs/latest/checkpoints/best exported/   # -> GPT-2 or LLaMA layout

Both directions map names and layouts only; the maths is the same, so logits agree to float
rounding (the parity tests check it):

* GPT-2 stores its projections as ``Conv1D`` with (in, out) weights; fromzero uses
  ``nn.Linear`` (out, in), so those four matrices per block are transposed. The head is tied
  to ``wte`` unless ``tie_word_embeddings`` is false.
* LLaMA-style models keep q/k/v and gate/up as separate matrices; fromzero fuses them into
  ``c_attn`` (rows: q, then k, then v) and ``mlp.c_fc`` (rows: gate, then up). Rotary
  embeddings follow the same "rotate_half" convention in both, so no rows are permuted.
* Mistral and Qwen2 are LLaMA with a sliding attention window (and, for Qwen2, q/k/v biases).
  A window only changes anything for sequences longer than it, so the converted block_size is
  capped at the window: within block_size the attention is exactly the full causal one.
* RoPE scaling: ``default``, ``linear`` and ``llama3`` are reproduced; other types (dynamic,
  yarn, longrope, ...) and partial rotary embeddings are refused with a one-line error.

Exporting picks GPT-2 for learned positions + LayerNorm + GELU MLP (missing biases are written
as zeros, which is exact), LLaMA for RoPE + RMSNorm + SwiGLU (Qwen2 when only q/k/v have
biases); other mixes have no Hugging Face counterpart and are refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from fromzero.errors import FromzeroError
from fromzero.models.gpt import GPTConfig
from fromzero.models.hf import check_keys, check_shape

HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")
FROMZERO_MODEL_TYPE = "fromzero-gpt"

Tensor = torch.Tensor

# Defaults of the transformers config classes, used for keys a config.json leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False,
        tie_word_embeddings=True,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
        max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
        sliding_window=4096, attention_dropout=0.0,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None,
        attention_dropout=0.0,
    ),
}

# HF activation names -> fromzero's, and back (GPT-2 and LLaMA spell tanh-GELU differently).
_HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
    "swish": "silu", "relu": "relu",
}
_GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_LLAMA_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}

_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Key under which a converted config.json keeps the HF special token ids (for the way back).
SPECIAL_TOKENS_KEY = "hf_special_tokens"

# Modules of our LLaMA-style block -> the HF modules they hold (q/k/v and gate/up are fused in ours,
# their rows stacked in this order).
_LLAMA_MODULES: dict[str, tuple[str, ...]] = {
    "ln_1": ("input_layernorm",), "ln_2": ("post_attention_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"), "mlp.c_proj": ("mlp.down_proj",),
}

# Buffers that some HF versions saved with the weights: never parameters, dropped on reading.
_IGNORED_HF_KEYS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


class _Config:
    """Typed access to a HF config.json dict, with the model type's defaults."""

    def __init__(self, hf_config: dict, model_type: str) -> None:
        self.d = {**_DEFAULTS[model_type], **hf_config}
        self.model_type = model_type

    def fail(self, message: str) -> FromzeroError:
        return FromzeroError(f"cannot convert Hugging Face {self.model_type} model: {message}")

    def get(self, key: str) -> Any:
        return self.d.get(key)

    def int(self, key: str, optional: bool = False) -> int | None:
        value = self.d.get(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(f"config.json {key} must be a positive integer, got {value!r}")
        return value

    def float(self, key: str) -> float:
        value = self.d.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"config.json {key} must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.d.get(key)
        if not isinstance(value, bool):
            raise self.fail(f"config.json {key} must be true or false, got {value!r}")
        return value

    def activation(self, key: str) -> str:
        name = self.d.get(key)
        if name not in _HF_ACTIVATIONS:
            raise self.fail(f"unsupported {key} {name!r} (supported: {', '.join(sorted(_HF_ACTIVATIONS))})")
        return _HF_ACTIVATIONS[name]

    def special_tokens(self) -> dict:
        tokens = {k: self.d.get(k) for k in _SPECIAL_TOKENS}
        return {SPECIAL_TOKENS_KEY: tokens} if any(v is not None for v in tokens.values()) else {}


def _build_config(cfg: _Config, **fields: Any) -> GPTConfig:
    config = GPTConfig(**fields)
    try:
        config.validate()
    except ValueError as e:
        raise cfg.fail(str(e)) from None
    return config


def _strip_prefix(state: dict[str, Tensor], prefix: str) -> tuple[str, dict[str, Tensor]]:
    """Detect whether weights are saved with the causal-LM prefix (``transformer.`` / ``model.``)
    or bare (a base model); return that prefix ('' if bare) and the state without ignored buffers."""
    state = {k: v for k, v in state.items() if not _IGNORED_HF_KEYS.search(k)}
    used = prefix if any(k.startswith(prefix) for k in state) else ""
    return used, state


def _check(cfg: _Config, state: dict[str, Tensor], shapes: dict[str, tuple[int, ...]],
           optional: set[str] = frozenset()) -> None:
    """Every expected tensor present with its shape; nothing unexpected (optional ones may be)."""
    where = f"Hugging Face {cfg.model_type} checkpoint"
    got = set(state) - (set(optional) & set(state))
    check_keys(set(shapes) - set(optional), got, where)
    for name, shape in shapes.items():
        if name in state:
            check_shape(name, state[name], shape, where)


# ---------------------------------------------------------------------------------------------
# from Hugging Face


def from_hf(hf_config: dict, hf_state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """HF config.json + weights -> (fromzero config.json dict, fromzero state dict)."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise FromzeroError(
            f"unsupported Hugging Face model_type {model_type!r} for decoder conversion "
            f"(supported: {', '.join(HF_MODEL_TYPES)})"
        )
    cfg = _Config(hf_config, model_type)
    if model_type == "gpt2":
        return _gpt2_from_hf(cfg, hf_state)
    return _llama_from_hf(cfg, hf_state)


def _gpt2_from_hf(cfg: _Config, hf_state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    if cfg.get("add_cross_attention"):
        raise cfg.fail("cross-attention (add_cross_attention) is not supported")
    if not cfg.get("scale_attn_weights") or cfg.get("scale_attn_by_inverse_layer_idx"):
        raise cfg.fail("attention scaling other than 1/sqrt(head size) is not supported")
    C, L, H, V = cfg.int("n_embd"), cfg.int("n_layer"), cfg.int("n_head"), cfg.int("vocab_size")
    inner = cfg.int("n_inner", optional=True)
    tied = cfg.bool("tie_word_embeddings")
    activation = cfg.activation("activation_function")
    config = _build_config(
        cfg, vocab_size=V, block_size=cfg.int("n_positions"), n_layer=L, n_head=H, n_embd=C,
        dropout=cfg.float("resid_pdrop"), bias=True, norm_eps=cfg.float("layer_norm_epsilon"),
        activation="" if activation == "gelu_tanh" else activation, intermediate_size=inner or 0,
        tie_embeddings=tied,
    )
    I = inner or 4 * C

    prefix, state = _strip_prefix(hf_state, "transformer.")
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}wte.weight": (V, C), f"{prefix}wpe.weight": (config.block_size, C),
        f"{prefix}ln_f.weight": (C,), f"{prefix}ln_f.bias": (C,),
    }
    conv = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, I), "mlp.c_proj": (I, C)}
    for i in range(L):
        p = f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[f"{p}{ln}.weight"] = shapes[f"{p}{ln}.bias"] = (C,)
        for name, (n_in, n_out) in conv.items():
            shapes[f"{p}{name}.weight"] = (n_in, n_out)  # Conv1D: (in, out)
            shapes[f"{p}{name}.bias"] = (n_out,)
    optional = set()
    if prefix:  # a GPT2LMHeadModel; a bare GPT2Model has no head and must be tied
        shapes["lm_head.weight"] = (V, C)
        if tied:
            optional.add("lm_head.weight")  # saved by some versions; the tie makes it wte anyway
    elif not tied:
        raise cfg.fail("tie_word_embeddings is false but the weights have no lm_head (a base GPT2Model)")
    _check(cfg, state, shapes, optional)

    out: dict[str, Tensor] = {}
    for name in shapes:
        if name == "lm_head.weight":
            if not tied:
                out["lm_head.weight"] = state[name]
            continue
        ours = "transformer." + name[len(prefix):]
        tensor = state[name]
        if name.endswith(".weight") and any(f".{c}." in name for c in conv):
            tensor = tensor.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
        out[ours] = tensor
    return {**config.to_dict(), **cfg.special_tokens()}, out


def _rope_fields(cfg: _Config) -> dict[str, Any]:
    """GPTConfig rope fields from HF's rope_parameters (transformers 5) or rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise cfg.fail(f"config.json rope_parameters must be a mapping, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (e.g. {"full_attention": {...}}): fine when all the same.
        distinct = {repr(sorted(v.items())) for v in params.values()}
        if len(distinct) > 1:
            raise cfg.fail("different rotary embeddings per layer type are not supported")
        params = next(iter(params.values()))
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", cfg.get("rope_theta") or 10000.0)
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0)
    if partial != 1.0:
        raise cfg.fail(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    fields: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        return fields
    if rope_type not in ("linear", "llama3"):
        raise cfg.fail(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")
    try:
        fields.update(rope_scaling=rope_type, rope_scaling_factor=float(params["factor"]))
        if rope_type == "llama3":
            fields.update(
                rope_low_freq_factor=float(params["low_freq_factor"]),
                rope_high_freq_factor=float(params["high_freq_factor"]),
                rope_original_block_size=int(
                    params.get("original_max_position_embeddings") or cfg.int("max_position_embeddings")
                ),
            )
    except (KeyError, TypeError, ValueError) as e:
        raise cfg.fail(f"{rope_type} rope scaling parameters are incomplete or invalid ({e})") from None
    return fields


def _sliding_window(cfg: _Config) -> int | None:
    """The attention window if any layer uses one (as transformers' config classes decide)."""
    if cfg.model_type == "mistral":
        window = cfg.get("sliding_window")
    elif cfg.model_type == "qwen2":
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        layer_types = cfg.get("layer_types")
        if window is not None and layer_types is not None and "sliding_attention" not in layer_types:
            window = None
        if window is not None and layer_types is None:
            if cfg.int("max_window_layers") >= cfg.int("num_hidden_layers"):
                window = None  # layers from max_window_layers on slide; there are none
    else:
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise cfg.fail(f"config.json sliding_window must be a positive integer or null, got {window!r}")
    return window


def _llama_from_hf(cfg: _Config, hf_state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    C, L, H = cfg.int("hidden_size"), cfg.int("num_hidden_layers"), cfg.int("num_attention_heads")
    V, I = cfg.int("vocab_size"), cfg.int("intermediate_size")
    G = cfg.int("num_key_value_heads", optional=True) or H
    D = cfg.int("head_dim", optional=True) or 0
    if cfg.model_type == "llama":
        attention_bias, mlp_bias = cfg.bool("attention_bias"), cfg.bool("mlp_bias")
        if attention_bias != mlp_bias:
            raise cfg.fail(
                f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
                "(fromzero has one bias switch for all projections)"
            )
        bias, qkv_bias = attention_bias, False
    else:
        bias, qkv_bias = False, cfg.model_type == "qwen2"
    tied = cfg.bool("tie_word_embeddings")
    block_size = cfg.int("max_position_embeddings")
    window = _sliding_window(cfg)
    if window is not None:
        block_size = min(block_size, window)  # within the window, sliding == full attention
    config = _build_config(
        cfg, vocab_size=V, block_size=block_size, n_layer=L, n_head=H, n_embd=C,
        dropout=cfg.float("attention_dropout"), bias=bias, norm="rmsnorm",
        norm_eps=cfg.float("rms_norm_eps"), pos_embedding="rope", mlp="swiglu",
        activation=cfg.activation("hidden_act"), intermediate_size=I, n_kv_head=G if G != H else 0,
        head_dim=D if D and D * H != C else 0, qkv_bias=qkv_bias, tie_embeddings=tied,
        **_rope_fields(cfg),
    )
    D = config.head_size

    prefix, state = _strip_prefix(hf_state, "model.")
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (V, C), f"{prefix}norm.weight": (C,)}
    for i in range(L):
        p = f"{prefix}layers.{i}."
        shapes[f"{p}input_layernorm.weight"] = shapes[f"{p}post_attention_layernorm.weight"] = (C,)
        for name, rows in (("q_proj", H * D), ("k_proj", G * D), ("v_proj", G * D)):
            shapes[f"{p}self_attn.{name}.weight"] = (rows, C)
            if bias or qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (C, H * D)
        for name, shape in (("gate_proj", (I, C)), ("up_proj", (I, C)), ("down_proj", (C, I))):
            shapes[f"{p}mlp.{name}.weight"] = shape
        if bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (C,)
            for name, rows in (("gate_proj", I), ("up_proj", I), ("down_proj", C)):
                shapes[f"{p}mlp.{name}.bias"] = (rows,)
    optional = set()
    if prefix:
        shapes["lm_head.weight"] = (V, C)
        if tied:
            optional.add("lm_head.weight")
    elif not tied:
        raise cfg.fail("tie_word_embeddings is false but the weights have no lm_head (a base model)")
    _check(cfg, state, shapes, optional)

    out: dict[str, Tensor] = {"transformer.wte.weight": state[prefix + "embed_tokens.weight"],
                              "transformer.ln_f.weight": state[prefix + "norm.weight"]}
    for i in range(L):
        for ours, theirs in _LLAMA_MODULES.items():
            for kind in ("weight", "bias"):  # the tensors present are the expected ones (checked above)
                parts = [state.get(f"{prefix}layers.{i}.{name}.{kind}") for name in theirs]
                if parts[0] is not None:
                    out[f"transformer.h.{i}.{ours}.{kind}"] = torch.cat(parts) if len(parts) > 1 else parts[0]
    if not tied:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {**config.to_dict(), **cfg.special_tokens()}, out


# ---------------------------------------------------------------------------------------------
# to Hugging Face


def _export_error(config: GPTConfig, why: str) -> FromzeroError:
    return FromzeroError(
        f"cannot export this model to Hugging Face: {why} (GPT-2 needs learned positions, "
        "layernorm and mlp gelu; LLaMA needs rope, rmsnorm and mlp swiglu)"
    )


def to_hf(config: dict, state: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """fromzero config.json + state dict -> (HF config.json dict, HF state dict)."""
    cfg = GPTConfig.from_dict(config)
    try:
        cfg.validate()
    except ValueError as e:
        raise FromzeroError(f"invalid fromzero-gpt config: {e}") from None
    special = {k: None for k in _SPECIAL_TOKENS}
    special.update({k: v for k, v in (config.get(SPECIAL_TOKENS_KEY) or {}).items() if k in special})
    gpt2_style = (cfg.pos_embedding, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama_style = (cfg.pos_embedding, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    if gpt2_style:
        if cfg.kv_heads != cfg.n_head:
            raise _export_error(cfg, "GPT-2 has no grouped-query attention (n_kv_head)")
        if cfg.head_size * cfg.n_head != cfg.n_embd:
            raise _export_error(cfg, "GPT-2 needs head_dim = n_embd / n_head")
        return _gpt2_to_hf(cfg, state, special)
    if llama_style:
        return _llama_to_hf(cfg, state, special)
    raise _export_error(
        cfg, f"pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp} has no counterpart"
    )


def _gpt2_to_hf(cfg: GPTConfig, state: dict[str, Tensor], special: dict) -> tuple[dict, dict[str, Tensor]]:
    C = cfg.n_embd
    I = cfg.intermediate_size or 4 * C
    activation = cfg.activation or "gelu_tanh"
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": C,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size or None,
        "activation_function": _GPT2_ACTIVATION[activation], "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": _dtype_name(state), **special,
    }

    def bias_or_zeros(name: str, n: int) -> Tensor:
        # HF GPT-2 always has biases; a fromzero model without them equals zero biases.
        b = state.get(name)
        return b.clone() if b is not None else torch.zeros(n, dtype=state["transformer.wte.weight"].dtype)

    out = {
        "transformer.wte.weight": state["transformer.wte.weight"].clone(),
        "transformer.wpe.weight": state["transformer.wpe.weight"].clone(),
        "transformer.ln_f.weight": state["transformer.ln_f.weight"].clone(),
        "transformer.ln_f.bias": bias_or_zeros("transformer.ln_f.bias", C),
    }
    widths = {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": I, "mlp.c_proj": C}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{p}{ln}.weight"] = state[f"{p}{ln}.weight"].clone()
            out[f"{p}{ln}.bias"] = bias_or_zeros(f"{p}{ln}.bias", C)
        for name, n_out in widths.items():
            out[f"{p}{name}.weight"] = state[f"{p}{name}.weight"].t().contiguous()  # -> Conv1D
            out[f"{p}{name}.bias"] = bias_or_zeros(f"{p}{name}.bias", n_out)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"].clone()
    return hf_config, out


def _llama_to_hf(cfg: GPTConfig, state: dict[str, Tensor], special: dict) -> tuple[dict, dict[str, Tensor]]:
    C, H, G, D = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size
    I = cfg.intermediate_size or 4 * C
    qwen2 = cfg.qkv_bias and not cfg.bias
    activation = _LLAMA_ACTIVATION[cfg.activation or "silu"]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope.update(rope_type=cfg.rope_scaling, factor=cfg.rope_scaling_factor)
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_block_size)
    hf_config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": C, "intermediate_size": I,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": H, "num_key_value_heads": G,
        "hidden_act": activation, "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout, "initializer_range": 0.02, "use_cache": True,
        # transformers 5 reads rope_parameters; rope_theta / rope_scaling are for older readers.
        "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling != "none" else None,
        "dtype": _dtype_name(state), **special,
    }
    if qwen2:
        hf_config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                         layer_types=["full_attention"] * cfg.n_layer)
        if D * H != C:
            hf_config["head_dim"] = D
    else:
        hf_config.update(head_dim=D, attention_bias=cfg.bias, mlp_bias=cfg.bias)

    out = {"model.embed_tokens.weight": state["transformer.wte.weight"].clone(),
           "model.norm.weight": state["transformer.ln_f.weight"].clone()}
    rows = _llama_rows(cfg)
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_MODULES.items():
            for kind in ("weight", "bias"):
                t = state.get(f"transformer.h.{i}.{ours}.{kind}")
                if t is not None:
                    for name, part in zip(theirs, t.split(rows[ours]) if ours in rows else (t,)):
                        out[f"model.layers.{i}.{name}.{kind}"] = part.clone()
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"].clone()
    return hf_config, out


def _llama_rows(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Output rows of each HF module in our fused ones (see _LLAMA_MODULES)."""
    H, G, D, I = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.intermediate_size or 4 * cfg.n_embd
    return {"attn.c_attn": (H * D, G * D, G * D), "mlp.c_fc": (I, I)}


def _dtype_name(state: dict[str, Tensor]) -> str:
    dtype = next(iter(state.values())).dtype
    return str(dtype).removeprefix("torch.")


def hf_module_names(config: dict) -> tuple[dict[str, Any], dict]:
    """fromzero module name -> HF module name(s) of the exported model, for adapters.

    GPT-2's names are ours; its Linear layers are ``Conv1D`` (weights stored in x out), which
    peft handles with ``fan_in_fan_out=True``: the LoRA A/B matrices themselves are the same.
    LLaMA / Qwen2 split what we fuse: ``attn.c_attn`` -> q/k/v_proj and ``mlp.c_fc`` ->
    gate/up_proj, given as [(HF name, output rows), ...] (see fromzero.finetune.lora).
    """
    cfg = GPTConfig.from_dict(config)
    if (cfg.pos_embedding, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        names: dict[str, Any] = {m: m for m in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head")}
        for i in range(cfg.n_layer):
            for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                names[f"transformer.h.{i}.{m}"] = f"transformer.h.{i}.{m}"
        return names, {"fan_in_fan_out": True}
    if (cfg.pos_embedding, cfg.norm, cfg.mlp) != ("rope", "rmsnorm", "swiglu"):
        raise _export_error(cfg, "its adapters have no Hugging Face counterpart")
    rows = _llama_rows(cfg)
    names = {"transformer.wte": "model.embed_tokens", "transformer.ln_f": "model.norm", "lm_head": "lm_head"}
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_MODULES.items():
            hf = [f"model.layers.{i}.{name}" for name in theirs]
            names[f"transformer.h.{i}.{ours}"] = list(zip(hf, rows[ours])) if ours in rows else hf[0]
    return names, {}
