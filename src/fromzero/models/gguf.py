"""GGUF (llama.cpp's single-file format) <-> fromzero checkpoints.

::

    fromzero convert from-gguf SmolLM2-135M-Instruct.Q4_1.gguf checkpoints/smollm2
    fromzero convert to-gguf runs/latest/checkpoints/best model.gguf --type q8_0

**Reading** (:func:`convert_from_gguf`). A GGUF holds the weights under llama.cpp's names
(``token_embd``, ``blk.N.attn_q``, ...), possibly quantized in blocks, and the config and
tokenizer as metadata. We

1. read it with the ``gguf`` package and dequantize every tensor to float32 (quantization was
   lossy once, when the file was made: we get exactly the weights llama.cpp computes with);
2. rename the tensors to Hugging Face names, build a HF config from the metadata and hand both
   to :func:`fromzero.models.convert_gpt.from_hf`: one mapping into :class:`~fromzero.models.gpt.GPT`;
3. undo llama.cpp's rotary permutation: llama.cpp rotates adjacent pairs of query/key features
   (GPT-J style) while HF LLaMA rotates the two halves of each head (``rotate_half``), so
   ``convert_hf_to_gguf.py`` interleaves the rows of q_proj/k_proj of every LLaMA head. Qwen2
   (NEOX rope in llama.cpp) and GPT-2 (no rope) are stored unpermuted;
4. rebuild a standard ``tokenizer.json`` from ``tokenizer.ggml.*`` (byte-level BPE with the
   pre-tokenizer ``tokenizer.ggml.pre`` names, or SentencePiece-style BPE with byte fallback),
   plus ``tokenizer_config.json`` and ``chat_template.jinja``, so our tokenizer and chat code and
   ``transformers.AutoTokenizer`` all read the checkpoint.

**Writing** (:func:`convert_to_gguf`) runs the same steps backwards for GPT-2-style and
LLaMA/Qwen2-style checkpoints, quantizing 2-D weights to f16, bf16, q8_0 or q4_0 (norms, biases
and positions stay F32, as llama.cpp keeps them), with the byte-level BPE tokenizer, its special
tokens and the chat template (a fromzero SFT template is written as the equivalent Jinja), so
llama.cpp and ollama can chat with the file.

Refused, each with one line: encoders and vision models, a structurally pruned GPT-2 (llama.cpp's
gpt2 graph needs n_head * head_dim == n_embd), fromzero's char tokenizer (no byte fallback or
merges: llama.cpp could not encode text outside its characters), WordPiece/unigram tokenizers,
RoPE types llama.cpp stores as extra tensors (Llama 3.1 ``rope_freqs``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fromzero.files import temp_file_beside
from fromzero.errors import FromzeroError, first_line
from fromzero.models.hf import describe_mismatch

Tensor = torch.Tensor

# Architectures (general.architecture) read and written. Mistral and SmolLM / TinyLlama files
# say "llama": llama.cpp runs them with the LLaMA graph.
ARCHITECTURES = ("llama", "qwen2", "gpt2")
ARCHITECTURES_HELP = "llama (LLaMA, Mistral, SmolLM, TinyLlama), qwen2, gpt2"

# Tensor types we dequantize (all of these the gguf package can decode).
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
              "Q5_K", "Q6_K")
# --type of to-gguf -> (ggml type of the 2-D weights, llama.cpp file type)
WRITE_TYPES = {"f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}

# llama.cpp's tokenizer.ggml.pre names of byte-level BPE pre-tokenizers we rebuild (and write).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt-2", "smollm", "qwen2", "llama-bpe")
_PRE_ALIASES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "llama-v3": "llama-bpe"}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA_BLOCK = {  # GGUF block tensor -> HF LLaMA / Qwen2 module
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_BLOCK = {  # GGUF block tensor -> HF GPT-2 module (the matrices are Conv1D there: transposed)
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
# Per architecture: GGUF tensors outside the blocks -> HF names, the block map, HF's block prefix.
_LLAMA_LAYOUT = ({"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}, _LLAMA_BLOCK, "model.layers")
_LAYOUTS = {
    "gpt2": ({"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
              "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
              "output.weight": "lm_head.weight"}, _GPT2_BLOCK, "transformer.h"),
    "llama": _LLAMA_LAYOUT, "qwen2": _LLAMA_LAYOUT,
}


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency
        raise FromzeroError("the gguf package is needed for GGUF files (pip install gguf)") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# The rotary permutation of llama.cpp (convert_hf_to_gguf.py, LlamaModel.permute)


def permute_rotary(w: Tensor, n_head: int) -> Tensor:
    """HF (rotate_half) -> llama.cpp row order of q_proj / k_proj weights or biases.

    Per head of d rows: ``[0, d/2, 1, d/2 + 1, ...]`` of the HF rows, i.e. the two halves that
    rotate together become adjacent pairs.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rotary(w: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`permute_rotary`: llama.cpp -> HF row order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_names(arch: str, n_layer: int) -> Iterator[str]:
    """Every tensor name an ``arch`` file may hold, in the order llama.cpp's converter writes them."""
    top, block, _ = _LAYOUTS[arch]
    yield from top
    for i in range(n_layer):
        for part in block:
            yield f"blk.{i}.{part}.weight"
            yield f"blk.{i}.{part}.bias"


def _hf_name(arch: str, name: str) -> str:
    """The HF name of a GGUF tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    top, block, prefix = _LAYOUTS[arch]
    if name in top:
        return top[name]
    _, i, part, kind = name.split(".")
    return f"{prefix}.{i}.{block[part]}.{kind}"


def _relayout(arch: str, name: str, t: Tensor, n_head: int, n_kv_head: int, to_gguf: bool) -> Tensor:
    """GPT-2's Conv1D matrices are transposed; llama q/k rows are (un)permuted for llama.cpp's rope."""
    part = name.split(".")[-2]
    if arch == "gpt2" and part in _GPT2_CONV1D and name.endswith(".weight"):
        return t.t().contiguous()  # HF GPT-2's Conv1D stores (in, out)
    if arch == "llama" and part in ("attn_q", "attn_k"):  # GPT-J-style (adjacent-pair) rope in llama.cpp
        return (permute_rotary if to_gguf else unpermute_rotary)(t, n_head if part == "attn_q" else n_kv_head)
    return t


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class GGUFContents:
    """A parsed GGUF file: metadata values and (still packed) tensors by name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor
    types: dict[str, str] = field(default_factory=dict)  # name -> ggml type name

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, name: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def fail(self, message: str) -> FromzeroError:
        return FromzeroError(f"{self.path.name}: {message}")


def read_gguf(path: str | Path) -> GGUFContents:
    """Open and check a GGUF file: magic, every tensor's size within the file, supported types.

    Truncated or corrupt files make the gguf reader raise assorted exceptions (ValueError from a
    memmap reshape, IndexError, struct errors); all become one FromzeroError line.
    """
    path = Path(path)
    if not path.exists():
        raise FromzeroError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise FromzeroError(f"{path} is not a file; give a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise FromzeroError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise FromzeroError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
        metadata = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
    except FromzeroError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader's failures on bad bytes are of every kind
        raise FromzeroError(f"{path} is a corrupt or truncated GGUF file ({type(e).__name__}: {first_line(e)})") from None
    contents = GGUFContents(path, metadata, tensors)
    unsupported = {}
    for name, t in tensors.items():
        type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
        contents.types[name] = type_name
        if type_name not in READ_TYPES:
            unsupported.setdefault(type_name, name)
            continue
        block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        n = int(t.n_elements)
        expected = n // block * type_size
        if n % block or int(t.n_bytes) != expected or t.data.nbytes != expected \
                or int(t.data_offset) + expected > size:
            raise FromzeroError(f"{path} is a corrupt or truncated GGUF file (tensor {name} has "
                                f"{t.data.nbytes} of its {expected} bytes)")
    if unsupported:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(unsupported.items()))
        raise FromzeroError(f"{path.name}: unsupported tensor type {listed}; supported: {', '.join(READ_TYPES)}")
    return contents


def dequantize(contents: GGUFContents, name: str) -> Tensor:
    """One tensor as float32 in PyTorch's (row-major, reversed GGML) shape."""
    gguf = _gguf()
    t = contents.tensors[name]
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.array(arr, dtype=np.float32, copy=True).reshape(shape)  # a copy: off the memmap
    except Exception as e:  # noqa: BLE001
        raise contents.fail(f"cannot decode tensor {name} ({contents.types[name]}): {first_line(e)}") from None
    if not np.isfinite(arr).all():
        raise contents.fail(f"tensor {name} holds NaN or infinite values (a corrupt file)")
    return torch.from_numpy(arr)


def _int(contents: GGUFContents, key: str, default: int | None = None) -> int:
    value = contents.arch_key(key, default)
    if isinstance(value, list):
        raise contents.fail(f"{contents.architecture}.{key} differs per layer ({value[:4]}...): not supported")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        if value is None:
            raise contents.fail(f"metadata {contents.architecture}.{key} is missing")
        raise contents.fail(f"metadata {contents.architecture}.{key} must be a positive integer, got {value!r}")
    return value


def _float(contents: GGUFContents, key: str, default: float | None = None) -> float:
    value = contents.arch_key(key, default)
    if value is None:
        raise contents.fail(f"metadata {contents.architecture}.{key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise contents.fail(f"metadata {contents.architecture}.{key} must be a positive number, got {value!r}")
    return float(value)


def _check_tensors(contents: GGUFContents, shapes: dict[str, tuple[int, ...]], optional: set[str]) -> None:
    """Every required tensor present, nothing unknown, every shape as the metadata implies."""
    names = set(contents.tensors)
    if "rope_freqs.weight" in names:
        raise contents.fail("rope frequency factors (rope_freqs, Llama 3.1-style rope scaling) are not supported")
    mismatch = describe_mismatch(sorted(set(shapes) - optional - names), sorted(names - set(shapes)))
    if mismatch:
        raise contents.fail(f"tensors do not match the {contents.architecture} metadata ({mismatch})")
    for name, shape in shapes.items():
        if name in names:
            got = tuple(int(x) for x in reversed(contents.tensors[name].shape.tolist()))
            if got != shape:
                raise contents.fail(f"tensor {name} has shape {got}, the metadata implies {shape}")


def _special_ids(contents: GGUFContents) -> dict[str, int]:
    ids = {}
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = contents.metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(value, int) and not isinstance(value, bool):
            ids[ours] = value
    return ids


def _vocab_size(contents: GGUFContents) -> int:
    if "token_embd.weight" not in contents.tensors:
        raise contents.fail("no token_embd.weight tensor (not a language model)")
    V = int(contents.tensors["token_embd.weight"].shape.tolist()[-1])
    declared = contents.arch_key("vocab_size")
    if declared is not None and declared != V:
        raise contents.fail(f"{contents.architecture}.vocab_size is {declared} but token_embd has {V} rows")
    return V


def _tied(contents: GGUFContents) -> bool:
    """No output tensor (or one byte-identical to token_embd, as GPT-2 files carry) = tied head."""
    out = contents.tensors.get("output.weight")
    if out is None:
        return True
    emb = contents.tensors["token_embd.weight"]
    return out.tensor_type == emb.tensor_type and out.data.shape == emb.data.shape and np.array_equal(out.data, emb.data)


def gguf_to_hf(contents: GGUFContents) -> tuple[dict, dict[str, Tensor]]:
    """GGUF metadata + tensors -> (HF config.json dict, HF state dict), float32, rotary unpermuted."""
    arch = contents.architecture
    if arch not in ARCHITECTURES:
        raise contents.fail(f"unsupported architecture {arch!r} (supported: {ARCHITECTURES_HELP})")
    if arch == "gpt2":
        return _gpt2_to_hf(contents)
    return _llama_to_hf(contents)


def _llama_to_hf(c: GGUFContents) -> tuple[dict, dict[str, Tensor]]:
    arch = c.architecture
    C, L, H = _int(c, "embedding_length"), _int(c, "block_count"), _int(c, "attention.head_count")
    G = _int(c, "attention.head_count_kv", H)
    I = _int(c, "feed_forward_length")
    V = _vocab_size(c)
    if c.arch_key("attention.key_length") is not None:
        D = _int(c, "attention.key_length")
    elif C % H:
        raise c.fail(f"embedding_length {C} is not divisible by attention.head_count {H}")
    else:
        D = C // H
    if c.arch_key("attention.value_length", D) != D:
        raise c.fail("attention.value_length differs from attention.key_length: not supported")
    if H % G:
        raise c.fail(f"attention.head_count {H} is not a multiple of attention.head_count_kv {G}")
    rot = c.arch_key("rope.dimension_count", D)
    if rot != D:
        raise c.fail(f"partial rotary embeddings (rope.dimension_count {rot} of head size {D}) are not supported")
    if D % 2:
        raise c.fail(f"rotary embeddings need an even head size, got {D}")
    ctx = _int(c, "context_length")
    window = c.arch_key("attention.sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < ctx:
        ctx = window  # within the window, sliding attention is full attention
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _float(c, "rope.freq_base", 10000.0)}
    scaling = c.arch_key("rope.scaling.type")
    if scaling in (None, "none"):
        if c.arch_key("rope.scale_linear") not in (None, 1.0):
            rope.update(rope_type="linear", factor=_float(c, "rope.scale_linear"))
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=_float(c, "rope.scaling.factor"))
    else:
        raise c.fail(f"unsupported rope scaling {scaling!r} (supported: none, linear)")

    names = set(c.tensors)
    qkv_bias = "blk.0.attn_q.bias" in names
    other_bias = "blk.0.attn_output.bias" in names or "blk.0.ffn_up.bias" in names
    if arch == "qwen2" and not qkv_bias:
        raise c.fail("a qwen2 model needs q/k/v biases (blk.N.attn_q.bias ...): they are missing")
    # LLaMA with biases on q/k/v only is Qwen2's structure (after unpermuting).
    model_type = "qwen2" if arch == "qwen2" or (qkv_bias and not other_bias) else "llama"
    all_bias = model_type == "llama" and (qkv_bias or other_bias)

    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, C), "output_norm.weight": (C,), "output.weight": (V, C)}
    optional = {"output.weight"}
    for i in range(L):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (C,), p + "ffn_norm.weight": (C,), p + "attn_q.weight": (H * D, C),
            p + "attn_k.weight": (G * D, C), p + "attn_v.weight": (G * D, C), p + "attn_output.weight": (C, H * D),
            p + "ffn_gate.weight": (I, C), p + "ffn_up.weight": (I, C), p + "ffn_down.weight": (C, I),
        })
        if qkv_bias or all_bias:
            shapes.update({p + "attn_q.bias": (H * D,), p + "attn_k.bias": (G * D,), p + "attn_v.bias": (G * D,)})
        if all_bias:
            shapes.update({p + "attn_output.bias": (C,), p + "ffn_gate.bias": (I,), p + "ffn_up.bias": (I,),
                           p + "ffn_down.bias": (C,)})
    _check_tensors(c, shapes, optional)
    tied = _tied(c)
    config: dict[str, Any] = {
        "model_type": model_type, "vocab_size": V, "hidden_size": C, "intermediate_size": I,
        "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": G, "head_dim": D,
        "max_position_embeddings": ctx, "rms_norm_eps": _float(c, "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_parameters": rope, "tie_word_embeddings": tied, "hidden_act": "silu", "attention_dropout": 0.0,
        **_special_ids(c),
    }
    if model_type == "llama":
        config.update(attention_bias=all_bias, mlp_bias=all_bias)
    else:
        config.update(use_sliding_window=False)
    return config, _read_state(c, shapes, tied, H, G)


def _read_state(c: GGUFContents, shapes: dict[str, tuple[int, ...]], tied: bool, n_head: int,
                n_kv_head: int) -> dict[str, Tensor]:
    """The file's (checked) tensors under HF names, dequantized and in HF's layout."""
    return {_hf_name(c.architecture, name): _relayout(c.architecture, name, dequantize(c, name), n_head,
                                                      n_kv_head, to_gguf=False)
            for name in shapes if name in c.tensors and not (tied and name == "output.weight")}


def _gpt2_to_hf(c: GGUFContents) -> tuple[dict, dict[str, Tensor]]:
    C, L, H = _int(c, "embedding_length"), _int(c, "block_count"), _int(c, "attention.head_count")
    I = _int(c, "feed_forward_length", 4 * C)
    V = _vocab_size(c)
    if C % H:
        raise c.fail(f"embedding_length {C} is not divisible by attention.head_count {H}")
    if c.arch_key("attention.head_count_kv", H) != H:
        raise c.fail("GPT-2 with grouped-query attention (head_count_kv != head_count) is not supported")
    if "position_embd.weight" not in c.tensors:
        raise c.fail("no position_embd.weight tensor (GPT-2 has learned positions)")
    P = int(c.tensors["position_embd.weight"].shape.tolist()[-1])
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (V, C), "position_embd.weight": (P, C), "output_norm.weight": (C,),
        "output_norm.bias": (C,), "output.weight": (V, C)}
    for i in range(L):
        p = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            shapes[p + norm + ".weight"] = shapes[p + norm + ".bias"] = (C,)
        for part, (rows, cols) in (("attn_qkv", (3 * C, C)), ("attn_output", (C, C)), ("ffn_up", (I, C)),
                                   ("ffn_down", (C, I))):
            shapes[f"{p}{part}.weight"] = (rows, cols)  # nn.Linear layout (llama.cpp transposes Conv1D)
            shapes[f"{p}{part}.bias"] = (rows,)
    _check_tensors(c, shapes, {"output.weight"})
    tied = _tied(c)
    config = {
        "model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_embd": C, "n_layer": L, "n_head": H,
        "n_inner": I, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": _float(c, "attention.layer_norm_epsilon", 1e-5), "tie_word_embeddings": tied,
        **_special_ids(c),
    }
    return config, _read_state(c, shapes, tied, H, H)


# ---------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* -> tokenizer.json


def build_tokenizer(contents: GGUFContents, vocab_size: int) -> tuple[Any, dict]:
    """(``tokenizers.Tokenizer``, tokenizer_config dict) from the file's tokenizer metadata."""
    md = contents.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise contents.fail("the file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens): a GGUF "
                            "made without one cannot turn text into ids; convert the model from its Hugging Face "
                            "directory instead (fromzero convert from-hf)")
    if len(tokens) > vocab_size:
        raise contents.fail(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
    types = list(md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise contents.fail("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    if kind == "gpt2":
        backend = _byte_level_bpe(contents, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_bpe(contents, tokens, types)
    else:
        raise contents.fail(f"unsupported tokenizer model {kind!r} (supported: gpt2 = byte-level BPE, "
                            "llama = SentencePiece BPE)")

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    _post_processor(backend, token("bos_token_id") if add_bos else None, token("eos_token_id") if add_eos else None)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": int(contents.arch_key("context_length") or 0) or None,
        "clean_up_tokenization_spaces": False,
    }
    template = md.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        config["chat_template"] = template
    return backend, {k: v for k, v in config.items() if v is not None}


def _unique_vocab(contents: GGUFContents, tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:  # a duplicate would lose its id; give it a placeholder name instead
            t = f"<fromzero-duplicate-{i}>"
        vocab[t] = i
    return vocab


def _added_tokens(backend: Any, tokens: list[str], types: list[int], special: set[int]) -> None:
    from tokenizers import AddedToken

    added = [AddedToken(tokens[i], special=types[i] != USER_DEFINED, normalized=False)
             for i in range(len(tokens)) if types[i] in special]
    specials = [t for t in added if t.special]
    plain = [t for t in added if not t.special]
    if specials:
        backend.add_special_tokens(specials)
    if plain:
        backend.add_tokens(plain)


def _byte_level_bpe(contents: GGUFContents, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    md = contents.metadata
    pre = str(md.get("tokenizer.ggml.pre", "gpt-2"))
    pre = _PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise contents.fail(f"unsupported byte-level pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                            f"(supported: {', '.join(PRE_TOKENIZERS)})")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # Vocabulary entries are byte-level spelled; one that is not (a few files store raw text for a
    # normal token) is respelled from its UTF-8 bytes. Control / user-defined tokens stay as
    # written: they are matched whole in the text, never built from bytes.
    spelled = [t if types[i] in (CONTROL, USER_DEFINED) or set(t) <= alphabet
               else "".join(spelling[b] for b in t.encode("utf-8")) for i, t in enumerate(tokens)]
    vocab = _unique_vocab(contents, spelled)
    merges_raw = md.get("tokenizer.ggml.merges") or []
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise contents.fail(f"malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                           ignore_merges=pre == "llama-bpe")  # llama.cpp: llama3 vocab words skip merging
    except Exception as e:  # noqa: BLE001 - e.g. a merge naming a token not in the vocabulary
        raise contents.fail(f"the BPE vocabulary and merges do not fit together ({first_line(e)})") from None
    backend = Tokenizer(model)
    if pre == "gpt-2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 regex (= SmolLM's HF tokenizer.json)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _added_tokens(backend, spelled, types, {CONTROL, USER_DEFINED})
    return backend


def _sentencepiece_bpe(contents: GGUFContents, tokens: list[str], types: list[int]) -> Any:
    """SentencePiece BPE as llama.cpp runs it: merges in score order, byte fallback, '▁' for spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    md = contents.metadata
    scores = md.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise contents.fail("a SentencePiece tokenizer needs tokenizer.ggml.scores, one per token")
    vocab = _unique_vocab(contents, tokens)
    merges = md.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        # SentencePiece files list no merges: every split of a token into two tokens, ranked by the
        # token's score (llama.cpp merges the adjacent pair whose result scores best), ties as
        # transformers breaks them (longer left piece first, then vocabulary order).
        ranked = []
        for i, t in enumerate(tokens):
            if types[i] not in (NORMAL, USER_DEFINED):
                continue
            splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
            splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
            ranked.extend((float(scores[i]), left, right) for left, right in splits)
        ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
        pairs = [(left, right) for _, left, right in ranked]
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    try:
        model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    except Exception as e:  # noqa: BLE001
        raise contents.fail(f"the SentencePiece vocabulary does not load ({first_line(e)})") from None
    backend = Tokenizer(model)
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp (like SentencePiece's add_dummy_prefix) puts a space before every piece of text
    # between special tokens, even one that starts with spaces: a normalizer does exactly that
    # (transformers' Metaspace skips it when the text already starts with a space, and then
    # "  x" does not decode back to itself).
    steps_in = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence(steps_in + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _added_tokens(backend, tokens, types, {CONTROL, USER_DEFINED, UNKNOWN})
    return backend


def _post_processor(backend: Any, bos: str | None, eos: str | None) -> None:
    """Special tokens that encode(add_special_tokens=True) adds, as llama.cpp's add_bos/add_eos."""
    from tokenizers import processors

    if bos is None and eos is None:
        return
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---------------------------------------------------------------------------------------------
# from-gguf


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_from_gguf(src: str | Path, out: Path, force: bool = False, dtype: str = "float32",
                      extra_files: dict[str, str] | None = None) -> dict:
    """A .gguf file -> a fromzero checkpoint directory (written atomically). Returns the config."""
    from fromzero.models.convert_gpt import from_hf
    from fromzero.models.hf import _prepare_out, _write_dir, check_fits

    if dtype not in DTYPES:
        raise FromzeroError(f"unsupported --dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    out = Path(out)
    _prepare_out(out, force)
    contents = read_gguf(src)
    if contents.architecture not in ARCHITECTURES:
        raise contents.fail(f"unsupported architecture {contents.architecture!r} (supported: {ARCHITECTURES_HELP})")
    V = _vocab_size(contents)
    backend, tok_config = build_tokenizer(contents, V)  # before the weights: fail fast
    hf_config, hf_state = gguf_to_hf(contents)
    try:
        config, state = from_hf(hf_config, hf_state)
    except FromzeroError as e:
        raise contents.fail(str(e)) from None
    del hf_state
    check_fits(config, state, contents.path.name)
    state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    config["converted_from"] = {
        "format": "gguf", "file": contents.path.name, "architecture": contents.architecture,
        "name": contents.metadata.get("general.name"),
        "tensor_types": dict(sorted(Counter(contents.types.values()).items())),
    }
    files = {"tokenizer.json": backend.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n"}
    if "chat_template" in tok_config:
        files["chat_template.jinja"] = tok_config["chat_template"]
    files.update(extra_files or {})
    _write_dir(out, config, state, None, files)
    return config


# ---------------------------------------------------------------------------------------------
# to-gguf


def _gguf_error(why: str) -> FromzeroError:
    return FromzeroError(f"cannot write this checkpoint as GGUF: {why}")


def convert_to_gguf(src: str | Path, out: str | Path, qtype: str = "f16", force: bool = False) -> dict:
    """A fromzero GPT checkpoint -> one .gguf file llama.cpp / ollama / transformers load.

    Returns a summary: architecture, tensor type counts, file size.
    """
    from fromzero.models.convert_gpt import to_hf
    from fromzero.models.gpt import GPT, GPTConfig
    from fromzero.checkpoint import CONFIG_FILE, load_model, read_json

    gguf = _gguf()
    if qtype not in WRITE_TYPES:
        raise FromzeroError(f"unsupported --type {qtype!r} (supported: {', '.join(WRITE_TYPES)})")
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FromzeroError(f"{out} already exists; pass --force to replace it")
    if out.is_dir():
        raise FromzeroError(f"{out} is a directory; give a file name such as model.gguf")
    if not src.is_dir():
        raise FromzeroError(f"checkpoint directory not found: {src}")
    config = read_json(src / CONFIG_FILE, "model config")
    model_type = config.get("model_type")
    if model_type != "fromzero-gpt":
        kind = {"fromzero-bert": "an encoder (BERT)", "fromzero-vit": "a vision model (ViT)",
                "fromzero-cnn": "a vision model (CNN)"}.get(str(model_type), repr(model_type))
        raise _gguf_error(f"{src} is {kind}; GGUF export covers decoder language models (fromzero-gpt), "
                          "the models llama.cpp and ollama run")
    if config.get("quantization"):
        raise _gguf_error(f"{src} is already quantized by `fromzero quantize`; export the float checkpoint "
                          "it came from, with --type q8_0 or q4_0")
    cfg = GPTConfig.from_dict(config)
    shape = (cfg.pos_embedding, cfg.norm, cfg.mlp)
    if shape == ("learned", "layernorm", "gelu"):
        arch = "gpt2"
        if cfg.head_size * cfg.n_head != cfg.n_embd:
            raise _gguf_error(f"n_head {cfg.n_head} x head_dim {cfg.head_size} != n_embd {cfg.n_embd} (a structurally "
                              "pruned GPT-2): llama.cpp's gpt2 graph splits the fused qkv by n_embd")
        if cfg.kv_heads != cfg.n_head:
            raise _gguf_error("llama.cpp's gpt2 graph has no grouped-query attention (n_kv_head)")
        if (cfg.activation or "gelu_tanh") != "gelu_tanh":
            raise _gguf_error(f"GPT-2 in llama.cpp uses tanh-GELU; this model uses {cfg.activation}")
    elif shape == ("rope", "rmsnorm", "swiglu"):
        arch = "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
        if (cfg.activation or "silu") != "silu":
            raise _gguf_error(f"llama.cpp's LLaMA graph uses SiLU; this model uses {cfg.activation}")
        if cfg.rope_scaling == "llama3":
            raise _gguf_error("llama3 rope scaling (llama.cpp stores it as a rope_freqs tensor) is not supported")
    else:
        raise _gguf_error(f"pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp} matches neither "
                          "GPT-2 (learned, layernorm, gelu) nor LLaMA (rope, rmsnorm, swiglu)")
    tokenizer = _export_tokenizer(src, cfg.vocab_size)  # before the weights: fail fast
    model = load_model(src)
    if not isinstance(model, GPT):
        raise _gguf_error(f"{src} does not load as a GPT")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    del model
    hf_config, hf_state = to_hf(config, state)
    del state
    special = dict(config.get("hf_special_tokens") or {})
    template = _export_template(src)

    ggml_type, file_type = WRITE_TYPES[qtype]
    tensors = _hf_to_gguf_tensors(arch, cfg, hf_state)
    del hf_state

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temp_file_beside(out, f".{out.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(str(config.get("converted_from", {}).get("name") or src.resolve().name))
        writer.add_file_type(file_type)
        if qtype.startswith("q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(writer, arch, cfg)
        _write_tokenizer(writer, tokenizer, special, template)
        for name, tensor in tensors.items():
            data, type_name = _encode(gguf, name, tensor, ggml_type, qtype)
            counts[type_name] = counts.get(type_name, 0) + 1
            if data.dtype == np.uint8:
                writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
            else:
                writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:  # mode 0666 & ~umask already (temp_file_beside)
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FromzeroError(f"could not write {out}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"architecture": arch, "type": qtype, "tensor_types": dict(sorted(counts.items())),
            "bytes": out.stat().st_size, "tokens": len(tokenizer["tokens"]), "pre": tokenizer["pre"]}


def _hf_to_gguf_tensors(arch: str, cfg: Any, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF-named state (from convert_gpt.to_hf) -> llama.cpp-named tensors, q/k permuted for llama."""
    if arch == "gpt2":  # llama.cpp's own converter writes GPT-2's tied head as an output tensor too
        hf = {"lm_head.weight": hf["transformer.wte.weight"], **hf}
    return {name: _relayout(arch, name, hf[_hf_name(arch, name)], cfg.n_head, cfg.kv_heads, to_gguf=True)
            for name in _gguf_names(arch, cfg.n_layer) if _hf_name(arch, name) in hf}


def _encode(gguf: Any, name: str, tensor: Tensor, ggml_type: str, qtype: str) -> tuple[np.ndarray, str]:
    """Bytes of one tensor: 1-D tensors and position tables F32, matrices in the chosen type.

    q4_0 keeps the embedding / output matrices at Q8_0 (llama.cpp's quantizer also keeps the
    output layer at higher precision); a matrix whose rows are not whole blocks falls back to F16.
    """
    arr = tensor.detach().float().cpu().numpy()
    if arr.ndim < 2 or name == "position_embd.weight":
        return arr.astype(np.float32), "F32"
    target = ggml_type
    if qtype == "q4_0" and name in ("token_embd.weight", "output.weight"):
        target = "Q8_0"
    if target == "F16":
        return arr.astype(np.float16), "F16"
    qt = gguf.GGMLQuantizationType[target]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    if arr.shape[-1] % block:
        return arr.astype(np.float16), "F16"
    return gguf.quants.quantize(np.ascontiguousarray(arr), qt), target


def _write_hparams(writer: Any, arch: str, cfg: Any) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size or 4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_size)
    if cfg.head_size * cfg.n_head != cfg.n_embd:  # e.g. structurally pruned heads keep their width
        writer.add_key_length(cfg.head_size)
        writer.add_value_length(cfg.head_size)
    if cfg.rope_scaling == "linear":
        gguf = _gguf()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling_factor)


def _export_tokenizer(src: Path, vocab_size: int) -> dict[str, Any]:
    """tokens, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer.json."""
    path = src / "tokenizer.json"
    if not path.is_file():
        raise _gguf_error(f"{src} has no tokenizer.json; GGUF files carry their tokenizer")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _gguf_error(f"{path} is not readable JSON: {e}") from None
    model = data.get("model") or {}
    mtype = model.get("type")
    if mtype == "WordLevel":
        raise _gguf_error("fromzero's char tokenizer cannot be described in GGUF (its tokenizers are byte-level BPE "
                          "or SentencePiece; a character vocabulary has no byte fallback and no merges for "
                          "multi-byte characters, so llama.cpp could not encode text); train the model with "
                          "--tokenizer bpe:N")
    if mtype != "BPE":
        raise _gguf_error(f"a {mtype} tokenizer has no GGUF counterpart here (supported: byte-level BPE)")
    pre = _pre_name(data.get("pre_tokenizer"))
    if pre is None or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise _gguf_error("only byte-level BPE tokenizers with a pre-tokenizer llama.cpp knows can be written "
                          f"({', '.join(PRE_TOKENIZERS)}); this one (e.g. SentencePiece-style BPE) is not supported")
    normalizer = data.get("normalizer")
    if normalizer not in (None, {}) and normalizer.get("type") != "NFC":
        raise _gguf_error(f"llama.cpp has no {normalizer.get('type')} normalizer for byte-level BPE")
    id_to_token: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        i = int(added["id"])
        id_to_token[i] = added["content"]
        types[i] = CONTROL if added.get("special") else USER_DEFINED
    if id_to_token and max(id_to_token) >= vocab_size:
        raise _gguf_error(f"the tokenizer has ids up to {max(id_to_token)} but the model only {vocab_size} embeddings")
    tokens, token_types = [], []
    for i in range(vocab_size):  # ids the tokenizer never produces (a padded vocabulary): unused
        tokens.append(id_to_token.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, NORMAL if i in id_to_token else UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    add_bos = False
    post = data.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        single = proc.get("single") if isinstance(proc, dict) else None
        if proc.get("type") == "TemplateProcessing" and single and "SpecialToken" in single[0]:
            add_bos = True
    return {"tokens": tokens, "types": token_types, "merges": merges, "pre": pre, "add_bos": add_bos,
            "ids": {t: i for i, t in enumerate(tokens)}}


def _pre_name(pre: Any) -> str | None:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre_tokenizer, or None."""
    if not isinstance(pre, dict):
        return None

    def byte_level(p: dict, regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and bool(p.get("use_regex", True)) == regex)

    if byte_level(pre, True):
        return "gpt-2"
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not items or len(items) != 2:
        return None
    first, second = items
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return "smollm"
    if first.get("type") == "Split" and byte_level(second, False) and str(first.get("behavior", "")).lower() == "isolated":
        pattern = (first.get("pattern") or {}).get("Regex")
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _export_template(src: Path) -> str | None:
    """The checkpoint's own Jinja chat template, or a fromzero SFT template written as Jinja."""
    from fromzero.data.chat_template import load_jinja_template

    template = load_jinja_template(src)
    if template is not None:
        return template.source
    info_path = src / "info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if info.get("task") == "sft" and isinstance(info.get("template"), dict):
            return sft_template_jinja(**info["template"])
    return None


def sft_template_jinja(system_prefix: str = "", user_prefix: str = "USER:\n", assistant_prefix: str = "ASSISTANT:\n",
                       turn_end: str = "\n\n", **_: Any) -> str:
    """fromzero's ChatTemplate (``prefix + content + turn_end`` per message) as Jinja source."""
    lit = lambda s: json.dumps(s, ensure_ascii=False)  # noqa: E731 - a JSON string is a Jinja string literal
    return (
        "{% for message in messages %}"
        f"{{% if message['role'] == 'system' %}}{{{{ {lit(system_prefix)} }}}}"
        f"{{% elif message['role'] == 'user' %}}{{{{ {lit(user_prefix)} }}}}"
        f"{{% else %}}{{{{ {lit(assistant_prefix)} }}}}{{% endif %}}"
        f"{{{{ message['content'] + {lit(turn_end)} }}}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {lit(assistant_prefix)} }}}}{{% endif %}}"
    )


def _write_tokenizer(writer: Any, tok: dict[str, Any], special: dict, template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    ids = tok["ids"]
    eos = special.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    fallback = ids.get("<|endoftext|>")  # fromzero's BPE: GPT-2's one document separator
    bos = special.get("bos_token_id")
    pad = special.get("pad_token_id")
    for value, add in ((bos if bos is not None else fallback, writer.add_bos_token_id),
                       (eos if eos is not None else fallback, writer.add_eos_token_id),
                       (pad, writer.add_pad_token_id)):
        if isinstance(value, int) and 0 <= value < len(tok["tokens"]):
            add(value)
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)
