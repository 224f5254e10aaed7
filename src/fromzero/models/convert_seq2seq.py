"""Hugging Face Marian (``MarianMTModel``, Helsinki-NLP's opus-mt models) <-> fromzero seq2seq.

Our module names are Marian's without the ``model.`` prefix (``encoder.layers`` ->
``encoder_layers``, ``fc1``/``fc2`` inside ``ffn``), so the weights map one to one. The position
tables are not weights on either side (both compute the same sinusoids). Marian's output layer
is tied to the target embeddings; a checkpoint with an untied ``lm_head`` is refused.
"""

from __future__ import annotations

import torch

from fromzero.errors import FromzeroError
from fromzero.models.seq2seq import Seq2SeqConfig

HF_MODEL_TYPES = ("marian",)
FROMZERO_MODEL_TYPE = "fromzero-seq2seq"

_ATTENTION = [f"{proj}.{p}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for p in ("weight", "bias")]
_NORM = ("weight", "bias")
# (our name, Marian's name) inside encoder layer i / decoder layer i
_ENCODER_LAYER = ([(f"self_attn.{n}", f"self_attn.{n}") for n in _ATTENTION]
                  + [(f"{norm}.{p}", f"{norm}.{p}") for norm in ("self_attn_layer_norm", "final_layer_norm")
                     for p in _NORM]
                  + [(f"ffn.{fc}.{p}", f"{fc}.{p}") for fc in ("fc1", "fc2") for p in _NORM])
_DECODER_LAYER = _ENCODER_LAYER + [(f"encoder_attn.{n}", f"encoder_attn.{n}") for n in _ATTENTION] + [
    (f"encoder_attn_layer_norm.{p}", f"encoder_attn_layer_norm.{p}") for p in _NORM]
_ACTIVATIONS = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}


def _layer_pairs(cfg: Seq2SeqConfig) -> list[tuple[str, str]]:
    return ([(f"encoder_layers.{i}.{ours}", f"model.encoder.layers.{i}.{hf}")
             for i in range(cfg.encoder_layers) for ours, hf in _ENCODER_LAYER]
            + [(f"decoder_layers.{i}.{ours}", f"model.decoder.layers.{i}.{hf}")
               for i in range(cfg.decoder_layers) for ours, hf in _DECODER_LAYER])


def _config_from_hf(hf: dict) -> Seq2SeqConfig:
    for ours, theirs in (("encoder_attention_heads", "decoder_attention_heads"),
                         ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(ours) != hf.get(theirs):
            raise FromzeroError(f"Marian config: {ours} ({hf.get(ours)}) != {theirs} ({hf.get(theirs)}); "
                                "fromzero's seq2seq uses one value for both sides")
    activation = _ACTIVATIONS.get(str(hf.get("activation_function", "gelu")))
    if activation is None:
        raise FromzeroError(f"Marian config: unsupported activation_function {hf.get('activation_function')!r}")
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    vocab = int(hf["vocab_size"])
    tgt_vocab = int(hf.get("decoder_vocab_size") or vocab)
    eos = hf.get("eos_token_id", 0)
    return Seq2SeqConfig(
        src_vocab_size=vocab, tgt_vocab_size=0 if shared else tgt_vocab, d_model=int(hf["d_model"]),
        n_head=int(hf["encoder_attention_heads"]), encoder_layers=int(hf["encoder_layers"]),
        decoder_layers=int(hf["decoder_layers"]), ffn_dim=int(hf["encoder_ffn_dim"]), activation=activation,
        dropout=float(hf.get("dropout", 0.1)), attention_dropout=float(hf.get("attention_dropout", 0.0)),
        activation_dropout=float(hf.get("activation_dropout", 0.0)),
        max_positions=int(hf.get("max_position_embeddings", 512)), scale_embedding=bool(hf.get("scale_embedding")),
        share_embeddings=shared, pad_id=int(hf["pad_token_id"]), eos_id=int(eos[0] if isinstance(eos, list) else eos),
        decoder_start_id=int(hf.get("decoder_start_token_id", hf["pad_token_id"])),
    )


def from_hf(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Marian config.json + state dict -> fromzero seq2seq config + state dict."""
    cfg = _config_from_hf(hf_config)
    try:
        cfg.validate()
    except ValueError as e:
        raise FromzeroError(f"Marian config: {e}") from None
    state = {k if k.startswith(("model.", "lm_head", "final_logits_bias")) else f"model.{k}": v
             for k, v in hf_state.items() if "embed_positions" not in k}  # a bare MarianModel has no prefix
    decoder_embed = state.get("model.decoder.embed_tokens.weight", state.get("model.shared.weight"))
    if decoder_embed is not None and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                                                    decoder_embed):
        raise FromzeroError("Marian checkpoint with an lm_head untied from the decoder embeddings: not supported")
    ours = {o: state[h] for o, h in _layer_pairs(cfg) if h in state}
    missing = [h for _, h in _layer_pairs(cfg) if h not in state]
    source_embed = state.get("model.shared.weight", state.get("model.encoder.embed_tokens.weight"))
    if source_embed is None or (not cfg.share_embeddings and decoder_embed is None):
        missing.append("model.shared.weight" if cfg.share_embeddings else "model.encoder/decoder.embed_tokens.weight")
    if missing:
        raise FromzeroError(f"Marian checkpoint is missing {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    ours["src_embed.weight"] = source_embed
    if not cfg.share_embeddings:
        ours["tgt_embed.weight"] = decoder_embed
    bias = state.get("final_logits_bias")
    ours["final_logits_bias"] = bias.reshape(-1) if bias is not None else torch.zeros(cfg.target_vocab)
    return cfg.to_dict(), ours


def to_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A fromzero seq2seq config + state dict -> a Marian config.json + state dict that
    ``MarianMTModel.from_pretrained`` loads."""
    cfg = Seq2SeqConfig.from_dict(config)
    hf_state = {h: state[o] for o, h in _layer_pairs(cfg)}
    hf_state["final_logits_bias"] = state["final_logits_bias"].reshape(1, -1)
    if cfg.share_embeddings:
        hf_state["model.shared.weight"] = state["src_embed.weight"]
    else:
        hf_state["model.encoder.embed_tokens.weight"] = state["src_embed.weight"]
        hf_state["model.decoder.embed_tokens.weight"] = state["tgt_embed.weight"]
    hf_config = {
        "model_type": "marian", "architectures": ["MarianMTModel"], "vocab_size": cfg.src_vocab_size,
        "decoder_vocab_size": cfg.target_vocab, "d_model": cfg.d_model, "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers, "encoder_attention_heads": cfg.n_head,
        "decoder_attention_heads": cfg.n_head, "encoder_ffn_dim": cfg.ffn_dim, "decoder_ffn_dim": cfg.ffn_dim,
        "activation_function": cfg.activation, "dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout, "max_position_embeddings": cfg.max_positions,
        "scale_embedding": cfg.scale_embedding, "share_encoder_decoder_embeddings": cfg.share_embeddings,
        "tie_word_embeddings": True, "pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id,
        "forced_eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
        "is_encoder_decoder": True, "bad_words_ids": [[cfg.pad_id]],
    }
    return hf_config, hf_state
