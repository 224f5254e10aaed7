"""``fromzero quantize``: int8-dynamic, int8-weight and int4-weight on tiny random models.

Three kinds of checks:

* the arithmetic: each quantized layer computes what a straightforward dequantised reference
  (written out here, group by group) computes, and stays close to the float layer;
* whole models (GPT with a tied head, BERT classifier, simple CNN) written by the CLI: outputs
  close to fp32, the saved directory reloads through ``load_model`` to *identical* outputs of
  the in-memory quantized model, the file shrinks, and generate / predict / evaluate run on it;
* bad input: one-line errors with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from fromzero.models.quantized import (INT8_DYNAMIC, METHODS, Int4WeightLinear, Int8DynamicLinear, Int8Embedding,
                                       Int8WeightLinear, QuantizeOptions, quantize_int4_groups, quantize_int8_rows,
                                       quantize_model, unpack_int4)
from fromzero.models.bert import Bert, BertConfig
from fromzero.models.cnn import CNNConfig, build_cnn
from fromzero.models.gpt import GPT, GPTConfig
from fromzero.checkpoint import load_model, save_checkpoint

from finetune.conftest import VOCAB, write_bert_base

LABELS = ["neg", "pos"]
# Relative error ||y_q - y|| / ||y|| of whole-model outputs against fp32.
INT8_TOLERANCE = 0.03
INT4_TOLERANCE = 0.15


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# The arithmetic against references written out here


def test_int8_rows_round_to_the_nearest_level_of_a_per_row_scale() -> None:
    w = torch.randn(6, 40) * torch.logspace(-3, 1, 6)[:, None]  # rows of very different sizes
    w[2] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    expected_scale = w.abs().amax(dim=1) / 127
    nonzero = expected_scale > 0
    torch.testing.assert_close(scale[nonzero], expected_scale[nonzero])
    assert int(q.abs().max()) == 127 and not q[2].any()
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())


def test_int4_groups_match_a_group_by_group_reference() -> None:
    torch.manual_seed(0)
    N, K, G = 5, 64, 16
    w = torch.randn(N, K)
    packed, scale, offset = quantize_int4_groups(w, G)
    assert packed.shape == (N, K // 2) and packed.dtype == torch.uint8
    assert scale.shape == offset.shape == (N, K // G)
    q = unpack_int4(packed)
    assert int(q.max()) <= 15
    # the packing: column 2j in the low nibble, 2j + 1 in the high one
    assert torch.equal(packed, q[:, 0::2] | (q[:, 1::2] << 4))
    reference = torch.empty(N, K)
    for n in range(N):
        for g in range(K // G):
            block = w[n, g * G:(g + 1) * G]
            lo, step = block.min(), (block.max() - block.min()) / 15
            levels = torch.round((block - lo) / step).clamp(0, 15)
            reference[n, g * G:(g + 1) * G] = levels * step + lo
            assert float((reference[n, g * G:(g + 1) * G] - block).abs().max()) <= float(step) / 2 + 1e-6
    layer = Int4WeightLinear.from_linear(_linear(w), G)
    torch.testing.assert_close(layer.dequantized_weight(), reference, atol=1e-6, rtol=0)


def _linear(w: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(w.size(1), w.size(0), bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("kind", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_quantized_linear_computes_its_dequantized_weight(kind: str) -> None:
    torch.manual_seed(0)
    float_layer = _linear(torch.randn(48, 64) * 0.1)
    x = torch.randn(3, 7, 64)
    if kind == "int4-weight":
        layer = Int4WeightLinear.from_linear(float_layer, 32)
    else:
        layer = (Int8DynamicLinear if kind == INT8_DYNAMIC else Int8WeightLinear).from_linear(float_layer)
    # The reference: the int values times their scales, by hand, through a float Linear.
    if kind == "int4-weight":
        q = unpack_int4(layer.qweight).float().view(48, 2, 32)
        w_ref = (q * layer.scale[..., None] + layer.offset[..., None]).view(48, 64)
    else:
        w_ref = layer.qweight.float() * layer.scale[:, None]
    reference = F.linear(x, w_ref, float_layer.bias)
    with torch.no_grad():
        y = layer(x)
        exact = float_layer(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.float32
    if kind == INT8_DYNAMIC:  # activations are rounded to 256 levels too
        assert rel_error(y, reference) < 0.01
    else:
        torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
    assert rel_error(y, exact) < (0.02 if kind.startswith("int8") else 0.1)


@pytest.mark.parametrize("kind", ["int8-weight", "int4-weight"])
@pytest.mark.parametrize("rows", [1, 5, 200])
def test_bf16_decoding_kernels_match_the_generic_path(kind: str, rows: int) -> None:
    """bf16 activations with few rows run PyTorch's packed int8 / int4 CPU kernels (decoding);
    they give the generic dequantize-then-matmul result up to bf16 rounding, biases included,
    and a .to() / deepcopy rebuilds their packed copy instead of carrying a stale one."""
    import copy

    torch.manual_seed(1)
    float_layer = _linear(torch.randn(96, 128) * 0.1)
    layer = (Int4WeightLinear.from_linear(float_layer, 64) if kind == "int4-weight"
             else Int8WeightLinear.from_linear(float_layer))
    layer = layer.to(torch.bfloat16)
    x = torch.randn(rows, 128).to(torch.bfloat16)
    w_ref = layer.dequantized_weight().float() if kind == "int8-weight" else layer.dequantized_weight(torch.float32)
    reference = F.linear(x.float(), w_ref, layer.bias.float())
    with torch.no_grad():
        y = layer(x)
        y_copy = copy.deepcopy(layer)(x[None])[0]
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
    assert rel_error(y.float(), reference) < 0.01
    torch.testing.assert_close(y_copy, y)


def test_int8_embedding_rows_and_bf16_inputs() -> None:
    torch.manual_seed(0)
    table = nn.Embedding(30, 16, padding_idx=0)
    q = Int8Embedding.from_embedding(table)
    ids = torch.tensor([[0, 5, 29], [3, 3, 1]])
    expected = q.qweight[ids].float() * q.scale[ids][..., None]
    torch.testing.assert_close(q(ids), expected)
    assert rel_error(q(ids[:, 1:]), table(ids[:, 1:]).detach()) < 0.01
    # under bf16 autocast the layers take bf16 inputs and give bf16 back
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for layer in (Int8DynamicLinear.from_linear(nn.Linear(16, 8)), Int8WeightLinear.from_linear(nn.Linear(16, 8)),
                  Int4WeightLinear.from_linear(nn.Linear(16, 8), 16)):
        assert layer(x).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints


def _gpt_checkpoint(directory: Path, data_dir: Path) -> Path:
    """A random GPT (tied head) over the char tokenizer of ``data_dir`` (so evaluate can score it)."""
    from fromzero.data.tokenizers import TextTokenizer

    tokenizer = TextTokenizer.load(data_dir / "tokenizer.json")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config)
    with torch.no_grad():  # a range of logits instead of near-uniform ones through the tied head
        model.transformer.wte.weight.mul_(20.0)
    save_checkpoint(directory, model, config.to_dict(), tokenizer_file=data_dir / "tokenizer.json",
                    info={"task": "language-model"})
    return directory


def _bert_checkpoint(directory: Path) -> Path:
    """A random 2-layer, 128-wide BERT classifier with the WordPiece tokenizer of the fine-tuning tests."""
    base = write_bert_base(directory.parent / f"{directory.name}-base")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, head="classification",
                        num_labels=2, labels=LABELS)
    model = Bert(config)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)  # confident predictions, so a label flip would show
    save_checkpoint(directory, model, config.to_dict(), tokenizer_file=base / "tokenizer.json",
                    info={"task": "text-classification", "max_length": 32})
    return directory


def _cnn_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    config = CNNConfig("simple", num_classes=3, in_channels=1, labels=["a", "b", "c"])
    model = build_cnn("simple", 3, in_channels=1)
    save_checkpoint(directory, model, config.to_dict(),
                    info={"task": "image-classification", "image_size": 16, "channels": 1})
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp32")
    return {"gpt": _gpt_checkpoint(root / "gpt", tiny_data_dir), "bert": _bert_checkpoint(root / "bert"),
            "cnn": _cnn_checkpoint(root / "cnn")}


def _inputs(name: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if name == "gpt":
        return (torch.randint(0, 20, (2, 24), generator=g),)
    if name == "bert":
        ids = torch.randint(4, len(VOCAB), (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        ids[0, 0] = ids[1, 0] = ids[2, 0] = VOCAB.index("[CLS]")
        return ids * mask, mask
    return (torch.randn(4, 1, 16, 16, generator=g),)


@torch.no_grad()
def _outputs(model: nn.Module, name: str) -> torch.Tensor:
    out = model(*_inputs(name))
    return out[0] if isinstance(out, tuple) else out


GROUP = {"gpt": 32, "bert": 64, "cnn": 64}


@pytest.fixture(scope="module")
def quantized(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every (model, method) quantized through the CLI."""
    from fromzero.cli import main

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for name, src in checkpoints.items():
        for method in METHODS:
            out[(name, method)] = root / f"{name}-{method}"
            argv = ["quantize", "--checkpoint", str(src), "--method", method, "--out", str(out[(name, method)]),
                    "--group-size", str(GROUP[name])]
            assert main(argv) == 0
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["gpt", "bert", "cnn"])
def test_quantized_checkpoint_is_close_to_fp32_and_reloads_identically(
    name: str, method: str, checkpoints: dict[str, Path], quantized: dict[tuple[str, str], Path]
) -> None:
    src, out = checkpoints[name], quantized[(name, method)]
    reference = _outputs(load_model(src), name)
    in_memory = load_model(src)
    quantize_model(in_memory, QuantizeOptions(method, group_size=GROUP[name]))
    expected = _outputs(in_memory, name)
    reloaded = load_model(out)
    assert any(isinstance(m, (Int8DynamicLinear, Int8WeightLinear, Int4WeightLinear)) for m in reloaded.modules())
    assert torch.equal(_outputs(reloaded, name), expected)
    limit = INT4_TOLERANCE if method == "int4-weight" else INT8_TOLERANCE
    assert rel_error(expected, reference) < limit, (name, method, rel_error(expected, reference))


def test_files_are_int8_safetensors_with_a_plan_and_a_report(checkpoints, quantized) -> None:
    out = quantized[("bert", "int8-dynamic")]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "info.json", "model.safetensors",
                                                     "quantization.json", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    block = config["quantization"]
    assert block["method"] == "int8-dynamic" and block["embeddings"] is True
    assert block["layers"]["embeddings.word"] == {"kind": "int8-embedding"}
    assert block["layers"]["layers.0.attn.query"]["kind"] == "int8-dynamic"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["layers.0.mlp.fc.qweight"] == "I8" and dtypes["layers.0.mlp.fc.scale"] == "F32"
    assert dtypes["embeddings.word.qweight"] == "I8"
    assert set(dtypes.values()) <= {"I8", "U8", "F32"}
    report = json.loads((out / "quantization.json").read_text())
    size = (out / "model.safetensors").stat().st_size
    assert report["size"]["quantized_bytes"] == size
    assert report["size"]["fp32_bytes"] == (checkpoints["bert"] / "model.safetensors").stat().st_size
    # Linear + embeddings dominate this model: int8 is about a quarter of fp32, int4 smaller still
    assert report["size"]["ratio"] <= 0.30
    int4 = json.loads((quantized[("bert", "int4-weight")] / "quantization.json").read_text())
    assert int4["size"]["quantized_bytes"] < 0.8 * size
    with safe_open(str(quantized[("bert", "int4-weight")] / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("layers.0.mlp.fc.qweight").get_dtype() == "U8"
        assert f.get_slice("layers.0.mlp.fc.qweight").get_shape() == [256, 64]  # two weights a byte


@pytest.mark.parametrize("method", METHODS)
def test_tied_gpt_head_reads_the_one_int8_table(method: str, quantized) -> None:
    out = quantized[("gpt", method)]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "transformer.wte.qweight" in names and not any(n.startswith("lm_head") for n in names)
    model = load_model(out)
    assert isinstance(model.transformer.wte, Int8Embedding)
    assert model.lm_head.qweight is model.transformer.wte.qweight
    assert model.lm_head.scale is model.transformer.wte.scale
    # int4 keeps the shared table int8 (embeddings are int8 per row)
    assert isinstance(model.lm_head, Int8DynamicLinear if method == INT8_DYNAMIC else Int8WeightLinear)


def test_skip_embeddings_keeps_tables_and_the_tied_head_float(cli, checkpoints, tmp_path) -> None:
    out = tmp_path / "q"
    assert cli("quantize", "--checkpoint", checkpoints["gpt"], "--method", "int8-weight", "--out", out,
               "--skip-embeddings").code == 0
    model = load_model(out)
    assert type(model.transformer.wte) is nn.Embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8WeightLinear)
    assert rel_error(_outputs(model, "gpt"), _outputs(load_model(checkpoints["gpt"]), "gpt")) < INT8_TOLERANCE


def test_int4_layers_that_the_group_size_does_not_divide_fall_back_to_int8(cli, checkpoints, tmp_path) -> None:
    out = tmp_path / "q"
    result = cli("quantize", "--checkpoint", checkpoints["bert"], "--method", "int4-weight", "--out", out,
                 "--group-size", "256")
    assert result.code == 0, result
    plan = json.loads((out / "config.json").read_text())["quantization"]["layers"]
    assert plan["layers.0.mlp.proj"] == {"kind": "int4-weight", "group_size": 256}  # in_features 256
    assert plan["layers.0.attn.query"]["kind"] == "int8-weight" and "128" in plan["layers.0.attn.query"]["fallback"]
    assert "layers.0.attn.query: int8 weight-only" in result.out
    assert isinstance(load_model(out).layers[0].attn.query, Int8WeightLinear)


# ---------------------------------------------------------------------------------------------
# The commands that read checkpoints, on quantized ones


@pytest.mark.parametrize("method", METHODS)
def test_generate_runs_on_a_quantized_gpt(cli, method: str, quantized) -> None:
    result = cli("generate", "--checkpoint", quantized[("gpt", method)], "--prompt", "The miller",
                 "--max-new-tokens", "20", "--device", "cpu", "--temperature", "0")
    assert result.code == 0, result
    assert result.out.startswith("The miller") and len(result.out.strip()) > len("The miller")


def test_cached_and_uncached_decoding_agree_on_a_quantized_gpt(quantized) -> None:
    model = load_model(quantized[("gpt", "int8-dynamic")])
    idx = _inputs("gpt")[0][:1, :5]
    cached = model.generate(idx, 12, temperature=0, use_cache=True)
    uncached = model.generate(idx, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", METHODS)
def test_predict_on_a_quantized_bert_classifier_matches_fp32(cli, method: str, checkpoints, quantized) -> None:
    texts = ["the film was good", "this book was very boring and bad", "our trip was lovely"]
    args = [a for t in texts for a in ("--text", t)] + ["--device", "cpu"]
    fp32 = cli("predict", "--checkpoint", checkpoints["bert"], *args)
    quant = cli("predict", "--checkpoint", quantized[("bert", method)], *args)
    assert quant.code == 0, quant
    rows, expected = [json.loads(line) for line in quant.out.splitlines()], [json.loads(line) for line in fp32.out.splitlines()]
    assert [r["input"] for r in rows] == texts
    for row, ref in zip(rows, expected):
        assert row["label"] == ref["label"]
        for label in LABELS:
            assert abs(row["probabilities"][label] - ref["probabilities"][label]) < 0.05


def test_predict_on_a_quantized_cnn(cli, checkpoints, quantized, tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "x.png"
    Image.fromarray((torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(path)
    fp32 = cli("predict", "--checkpoint", checkpoints["cnn"], "--image", path, "--device", "cpu")
    quant = cli("predict", "--checkpoint", quantized[("cnn", "int8-dynamic")], "--image", path, "--device", "cpu")
    assert quant.code == 0, quant
    assert json.loads(quant.out)["label"] == json.loads(fp32.out)["label"]


def test_eval_reports_the_loss_change_and_evaluate_reads_the_output(cli, checkpoints, tiny_data_dir, tmp_path) -> None:
    out = tmp_path / "q"
    result = cli("quantize", "--checkpoint", checkpoints["gpt"], "--method", "int8-dynamic", "--out", out,
                 "--eval", "--data", tiny_data_dir, "--device", "cpu")
    assert result.code == 0, result
    report = json.loads((out / "quantization.json").read_text())
    loss = report["eval"]["loss"]
    assert report["eval"]["split"] == "val"
    assert loss["fp32"] > 0 and abs(loss["change"]) < 0.05 * loss["fp32"]
    assert "quality on" in result.out and "loss" in result.out
    evaluated = cli("evaluate", "--checkpoint", out, "--data", tiny_data_dir, "--split", "val", "--device", "cpu")
    assert evaluated.code == 0, evaluated
    assert json.loads(evaluated.out)["loss"] == pytest.approx(loss["quantized"], rel=1e-6)


def test_a_lora_adapter_is_merged_then_quantized(cli, tmp_path) -> None:
    from finetune.conftest import sentiment_rows, text_config
    from fromzero.finetune.text import finetune_text_classification

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in sentiment_rows(60)))
    base = write_bert_base(tmp_path / "base")
    run = finetune_text_classification(text_config(base, data, tmp_path / "run", method="lora", epochs=1))
    adapter = Path(run["run_dir"]) / "checkpoints" / "best"
    assert (adapter / "adapter_config.json").is_file()
    out = tmp_path / "q"
    assert cli("quantize", "--checkpoint", adapter, "--method", "int8-weight", "--out", out).code == 0
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([[VOCAB.index("[CLS]"), VOCAB.index("good"), VOCAB.index("[SEP]")]])
    with torch.no_grad():
        merged, _ = load_model(adapter)(ids)
        quant, _ = load_model(out)(ids)
    assert rel_error(quant, merged) < INT8_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_one_line_with_exit_2(cli, one_line_error, checkpoints, quantized, tmp_path,
                                            monkeypatch) -> None:
    src = checkpoints["bert"]
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int9-dynamic", "--out", tmp_path / "a"),
                   "unknown quantization method 'int9-dynamic'", "did you mean int8-dynamic?")
    taken = quantized[("bert", "int8-weight")]
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int8-weight", "--out", taken),
                   "already exists", "--force")
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int8-weight", "--out", src, "--force"),
                   "--out must be a new directory")
    one_line_error(cli("quantize", "--checkpoint", taken, "--method", "int8-dynamic", "--out", tmp_path / "b"),
                   "already quantized (int8-weight)")
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int4-weight", "--out", tmp_path / "c",
                       "--group-size", "96"), "--group-size 96 divides the in_features of no Linear layer")
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int4-weight", "--out", tmp_path / "c",
                       "--group-size", "7"), "--group-size must be a positive even number")
    one_line_error(cli("quantize", "--checkpoint", tmp_path / "nowhere", "--method", "int8-weight",
                       "--out", tmp_path / "d"), "checkpoint directory not found")
    assert not any((tmp_path / n).exists() for n in "abcd")
    # int8-dynamic has CPU kernels only
    with pytest.raises(Exception, match="int8-dynamic runs on CPU only"):
        load_model(quantized[("bert", "int8-dynamic")], "cuda")
    # a PyTorch build without quantized engines cannot run int8-dynamic at all
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", property(lambda self: ["none"]))
    one_line_error(cli("quantize", "--checkpoint", src, "--method", "int8-dynamic", "--out", tmp_path / "e"),
                   "no quantized CPU engine", "int8-weight")
    assert cli("quantize", "--checkpoint", src, "--method", "int8-weight", "--out", tmp_path / "e").code == 0


def test_force_replaces_an_existing_output(cli, checkpoints, tmp_path) -> None:
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert cli("quantize", "--checkpoint", checkpoints["cnn"], "--method", "int4-weight", "--out", out,
               "--group-size", "64", "--force").code == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("method", METHODS)
def test_llama_style_gpt_and_vit_quantize_in_memory(method: str) -> None:
    """An untied LLaMA-style GPT (RMSNorm, RoPE, SwiGLU, GQA: its lm_head is a plain Linear) and
    a ViT (its patch convolution stays float) quantize and stay close to fp32."""
    from fromzero.models.gpt import LLAMA_STYLE
    from fromzero.models.vit import ViT, ViTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                        **LLAMA_STYLE)).eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    reference = gpt(idx)[0].detach()
    quantize_model(gpt, QuantizeOptions(method, group_size=32))
    expected_head = {"int8-dynamic": Int8DynamicLinear, "int8-weight": Int8WeightLinear, "int4-weight": Int4WeightLinear}
    assert isinstance(gpt.lm_head, expected_head[method])
    with torch.no_grad():
        assert rel_error(gpt(idx)[0], reference) < (INT4_TOLERANCE if method == "int4-weight" else INT8_TOLERANCE)
        prompt = idx[:1, :4]
        assert torch.equal(gpt.generate(prompt, 8, temperature=0), gpt.generate(prompt, 8, temperature=0, use_cache=False))

    vit = ViT(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, num_labels=3)).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = vit(images)
        quantize_model(vit, QuantizeOptions(method, group_size=32))
        assert isinstance(vit.patch_embed, nn.Conv2d)
        assert rel_error(vit(images), reference) < (INT4_TOLERANCE if method == "int4-weight" else INT8_TOLERANCE)


def test_export_refuses_an_int8_dynamic_checkpoint_in_one_line(cli, one_line_error, quantized, tmp_path) -> None:
    result = cli("export", "--checkpoint", quantized[("bert", "int8-dynamic")], "--out", tmp_path / "q.onnx")
    one_line_error(result, "int8-dynamic quantized", "cannot be exported")
    assert not (tmp_path / "q.onnx").exists()
