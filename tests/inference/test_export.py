"""ONNX export (fromzero.inference.export, ``fromzero export``).

Each model family is exported once from a tiny random checkpoint, then the file is run in
onnxruntime at two batch sizes and two sequence lengths (images: two batch sizes, CNNs also two
image sizes) that differ from the traced sample, and compared with the PyTorch model at atol
1e-4. Text inputs are padded batches from the checkpoint's own tokenizer, so the comparison
covers the eager fast paths (BERT's packing of padded batches) against the exported general
graph. The bad-input cases check the one-line errors and that nothing is left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fromzero.inference.export as export_module
from fromzero.inference.export import export_onnx, sidecar_path
from fromzero.checkpoint import load_model, save_checkpoint

# The tiny base checkpoints of the fine-tuning tests (pytest puts tests/ on sys.path).
from finetune.conftest import VOCAB, write_bert_base, write_gpt_base

ATOL = 1e-4
SENTENCES = ["the film was good", "my day was so very awful and it felt bad again", "our trip",
             "this book was nice", "the food was really quite boring today"]


def run_onnx(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in session.get_inputs()) == sorted(feeds)
    (out,) = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    return out


def assert_matches(onnx_out: np.ndarray, torch_out: torch.Tensor) -> None:
    torch.testing.assert_close(torch.from_numpy(onnx_out), torch_out.float(), atol=ATOL, rtol=0)


def encode(sentences: list[str]) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] ids right-padded with [PAD] (0), the mask and all-zero segment ids."""
    rows = [[VOCAB.index("[CLS]"), *(VOCAB.index(w) for w in s.split()), VOCAB.index("[SEP]")] for s in sentences]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-ckpts")


@pytest.fixture(scope="module")
def bert_base(ckpts: Path) -> Path:
    return write_bert_base(ckpts / "bert-base")


@pytest.fixture(scope="module")
def bert_classifier(ckpts: Path, bert_base: Path) -> Path:
    """A text-classification checkpoint as fine-tuning writes it: head, labels, info.json, tokenizer."""
    from fromzero.finetune.lora import load_base
    from fromzero.models.bert import Bert, BertConfig

    config = BertConfig.from_dict({**json.loads((bert_base / "config.json").read_text()), "head": "classification",
                                   "num_labels": 3, "labels": ["neg", "neutral", "pos"]})
    torch.manual_seed(1)
    model = Bert(config)
    load_base(model, bert_base)
    out = ckpts / "bert-classifier"
    save_checkpoint(out, model, config.to_dict(), tokenizer_file=bert_base / "tokenizer.json",
                    info={"task": "text-classification", "max_length": 32})
    return out


def image_checkpoint(directory: Path, kind: str) -> Path:
    from fromzero.models.cnn import CNNConfig, build_cnn
    from fromzero.models.vit import ViT, ViTConfig

    torch.manual_seed(2)
    if kind == "vit":
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, num_labels=3, labels=["a", "b", "c"])
        save_checkpoint(directory, ViT(config), config.to_dict(),
                        info={"task": "image-classification", "image_size": 32, "channels": 3})
        return directory
    arch, channels, size = ("simple", 1, 28) if kind == "cnn" else ("resnet18", 3, 32)
    model = build_cnn(arch, 4, in_channels=channels)
    if arch == "resnet18":  # random BatchNorm statistics, so eval-mode normalisation is exercised
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(directory, model, CNNConfig(arch, 4, channels, labels=list("wxyz")).to_dict(),
                    info={"task": "image-classification", "image_size": size, "channels": channels,
                          "mean": [0.5] * channels, "std": [0.25] * channels})
    return directory


# ---------------------------------------------------------------------------------------------
# decoders


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gpt_logits_match_pytorch_at_two_shapes(style: str, ckpts: Path, tmp_path: Path) -> None:
    from fromzero.models.gpt import GPT, GPTConfig, LLAMA_STYLE

    if style == "gpt2":
        ckpt = write_gpt_base(ckpts / "gpt2")
    else:  # rope, rmsnorm, swiglu, grouped-query attention, untied head
        torch.manual_seed(3)
        config = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **LLAMA_STYLE)
        ckpt = ckpts / "llama"
        save_checkpoint(ckpt, GPT(config), config.to_dict())
    result = export_onnx(ckpt, tmp_path / "lm.onnx")
    model = load_model(ckpt)
    V, block = model.config.vocab_size, model.config.block_size

    assert [(s.name, s.dtype, s.shape) for s in result.inputs] == [("input_ids", "int64", ["batch", "sequence"])]
    assert [(s.name, s.shape) for s in result.outputs] == [("logits", ["batch", "sequence", V])]
    assert result.max_abs_diff is not None and result.max_abs_diff <= ATOL
    gen = torch.Generator().manual_seed(0)
    for B, T in ((1, 5), (4, block)):
        ids = torch.randint(0, V, (B, T), generator=gen)
        with torch.no_grad():
            expected, _ = model(ids)
        assert_matches(run_onnx(result.path, {"input_ids": ids}), expected)

    side = json.loads(sidecar_path(result.path).read_text())
    assert side["model_type"] == "fromzero-gpt" and side["task"] == "language-model"
    assert side["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    assert side["max_sequence_length"] == block
    assert side["tokenizer"] == (str((ckpt / "tokenizer.json").resolve()) if style == "gpt2" else None)


def test_gpt_in_decode_layout_exports_the_same_graph(ckpts: Path, tmp_path: Path) -> None:
    """generate() may leave a model's Linear weights column-major; export switches that off."""
    from fromzero.inference.export import export_plan

    ckpt = write_gpt_base(ckpts / "gpt2-layout")
    model = load_model(ckpt)
    model.use_decode_layout(True)
    plan = export_plan(model, json.loads((ckpt / "config.json").read_text()), ckpt, {})
    assert not model._decode_layout
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert plan.output_names == ["logits"]


# ---------------------------------------------------------------------------------------------
# encoders


def test_bert_classifier_logits_match_pytorch_on_padded_batches(bert_classifier: Path, tmp_path: Path) -> None:
    result = export_onnx(bert_classifier, tmp_path / "cls.onnx")
    model = load_model(bert_classifier)
    assert [s.name for s in result.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [(s.name, s.shape) for s in result.outputs] == [("logits", ["batch", 3])]
    for sentences in (SENTENCES[:2], SENTENCES + ["good", "the show was great and so was the food again today"]):
        feeds = encode(sentences)
        assert int(feeds["attention_mask"].sum()) < feeds["attention_mask"].numel()  # padding is present
        with torch.no_grad():  # eager: packs the real tokens and computes [CLS] only in the last layer
            expected, _ = model(feeds["input_ids"], feeds["attention_mask"])
        assert_matches(run_onnx(result.path, feeds), expected)

    side = json.loads(sidecar_path(result.path).read_text())
    assert side["labels"] == ["neg", "neutral", "pos"]
    assert side["task"] == "text-classification" and side["max_length"] == 32
    assert side["tokenizer"] == str((bert_classifier / "tokenizer.json").resolve())
    assert side["dynamic_axes"]["attention_mask"] == {"0": "batch", "1": "sequence"}
    assert side["dynamic_axes"]["logits"] == {"0": "batch"}


def test_bert_encoder_exports_sentence_embeddings(bert_base: Path, tmp_path: Path) -> None:
    from fromzero.models.bert import embed_checkpoint

    result = export_onnx(bert_base, tmp_path / "embed.onnx")
    assert [(s.name, s.shape) for s in result.outputs] == [("sentence_embedding", ["batch", 32])]
    for sentences in (SENTENCES[:1], SENTENCES):
        expected = torch.tensor(embed_checkpoint(bert_base, sentences))
        assert_matches(run_onnx(result.path, encode(sentences)), expected)


def test_the_sidecar_tokenizer_recipe_gives_the_embeddings_with_a_padding_tokenizer(bert_base: Path,
                                                                                  tmp_path: Path) -> None:
    """Follow the sidecar's tokenizer note word for word with a tokenizer.json that pads every
    text to a fixed length (as MiniLM's does): ids + its attention_mask (+ type ids) through
    onnxruntime give `fromzero embed`'s vectors; a mask of ones would not."""
    import shutil

    from tokenizers import Tokenizer

    from fromzero.models.bert import embed_checkpoint

    padded = tmp_path / "padded"
    shutil.copytree(bert_base, padded)
    tok = Tokenizer.from_file(str(padded / "tokenizer.json"))
    tok.enable_padding(length=24, pad_id=0, pad_token=VOCAB[0])
    tok.save(str(padded / "tokenizer.json"))
    result = export_onnx(padded, tmp_path / "embed.onnx")
    side = json.loads(sidecar_path(result.path).read_text())
    note = side["tokenizer_note"]
    assert "attention_mask = enc.attention_mask" in note and "never a mask of ones" in note
    encs = Tokenizer.from_file(side["tokenizer"]).encode_batch(SENTENCES)
    feeds = {"input_ids": torch.tensor([e.ids for e in encs]),
             "attention_mask": torch.tensor([e.attention_mask for e in encs])}
    if any(i.name == "token_type_ids" for i in result.inputs):
        feeds["token_type_ids"] = torch.tensor([e.type_ids for e in encs])
    assert feeds["input_ids"].shape == (len(SENTENCES), 24)
    expected = torch.tensor(embed_checkpoint(bert_base, SENTENCES))
    assert_matches(run_onnx(result.path, feeds), expected)
    ones = dict(feeds, attention_mask=torch.ones_like(feeds["attention_mask"]))
    assert (torch.from_numpy(run_onnx(result.path, ones)) - expected).abs().max() > 10 * ATOL


def test_lora_adapter_checkpoint_exports_merged(bert_base: Path, ckpts: Path, tmp_path: Path) -> None:
    from fromzero.finetune.lora import apply_lora, load_base, save_adapter
    from fromzero.finetune.methods import MethodConfig
    from fromzero.models.bert import Bert, BertConfig

    config = BertConfig.from_dict({**json.loads((bert_base / "config.json").read_text()), "head": "classification",
                                   "num_labels": 2, "labels": ["neg", "pos"]})
    torch.manual_seed(4)
    model = Bert(config)
    load_base(model, bert_base)
    feeds = encode(SENTENCES)
    with torch.no_grad():
        before, _ = model.eval()(feeds["input_ids"], feeds["attention_mask"])
    peft_model = apply_lora(model, config.to_dict(), MethodConfig(method="lora", lora_rank=4),
                            modules_to_save=["classifier"])
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = ckpts / "lora"
    save_adapter(adapter, peft_model, config.to_dict(), bert_base, bert_base / "tokenizer.json",
                 {"task": "text-classification"})
    assert not (adapter / "model.safetensors").exists()

    result = export_onnx(adapter, tmp_path / "lora.onnx")
    merged = load_model(adapter)
    with torch.no_grad():
        expected, _ = merged(feeds["input_ids"], feeds["attention_mask"])
    got = run_onnx(result.path, feeds)
    assert_matches(got, expected)
    assert not np.allclose(got, before.numpy(), atol=1e-3)  # the adapter is in the graph
    assert json.loads(sidecar_path(result.path).read_text())["labels"] == ["neg", "pos"]


# ---------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("kind", ["cnn", "resnet"])  # the ViT: see the first command-line test
def test_image_classifier_logits_match_pytorch(kind: str, ckpts: Path, tmp_path: Path) -> None:
    ckpt = image_checkpoint(ckpts / kind, kind)
    result = export_onnx(ckpt, tmp_path / f"{kind}.onnx")
    model = load_model(ckpt)
    channels, size = {"cnn": (1, 28), "resnet": (3, 32)}[kind]
    # global average pooling takes any image size: height and width are dynamic too
    assert [(s.name, s.shape) for s in result.inputs] == [("pixel_values", ["batch", channels, "height", "width"])]
    assert [(s.name, s.shape) for s in result.outputs] == [("logits", ["batch", 4])]
    gen = torch.Generator().manual_seed(0)
    for B, H, W in [(1, size, size), (5, size, size), (2, 20, 45)]:
        x = torch.randn(B, channels, H, W, generator=gen)
        with torch.no_grad():
            expected = model(x)
        assert_matches(run_onnx(result.path, {"pixel_values": x}), expected)
    side = json.loads(sidecar_path(result.path).read_text())
    assert side["task"] == "image-classification" and side["labels"] == list("wxyz")
    assert side["preprocessing"] == {"image_size": size, "channels": channels, "mean": [0.5] * channels,
                                     "std": [0.25] * channels}


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_exports_a_vit_refuses_overwrite_and_replaces_with_force(cli, one_line_error, ckpts: Path,
                                                                      tmp_path: Path) -> None:
    """One line on stdout; the ViT matches PyTorch at two batch sizes (its image size is fixed)."""
    import onnx

    ckpt = image_checkpoint(ckpts / "vit-cli", "vit")
    out = tmp_path / "out" / "vit.onnx"
    r = cli("export", "--checkpoint", ckpt, "--format", "onnx", "--out", out)
    assert r.code == 0, r
    assert len(r.out.strip().splitlines()) == 1
    line = r.out.strip()
    assert line.startswith(f"wrote {out} (") and "opset 20" in line
    assert "inputs pixel_values[batch,3,32,32] float32" in line and "outputs logits[batch,3] float32" in line
    assert "max abs diff" in line
    assert onnx.load(str(out)).opset_import[0].version == 20
    model = load_model(ckpt)
    for B in (1, 5):
        x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(B))
        with torch.no_grad():
            assert_matches(run_onnx(out, {"pixel_values": x}), model(x))
    side = json.loads(sidecar_path(out).read_text())
    assert side["labels"] == ["a", "b", "c"] and side["model_type"] == "fromzero-vit"
    assert side["dynamic_axes"] == {"pixel_values": {"0": "batch"}, "logits": {"0": "batch"}}
    assert side["verification"]["max_abs_diff"] <= ATOL
    first = out.read_bytes()

    r = cli("export", "--checkpoint", ckpt, "--out", out)
    one_line_error(r, str(out), "already exists", "--force")
    assert out.read_bytes() == first

    r = cli("export", "--checkpoint", ckpt, "--out", out, "--force", "--opset", "23", "--no-verify")
    assert r.code == 0, r
    assert "max abs diff" not in r.out
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 23
    assert json.loads(sidecar_path(out).read_text())["verification"] is None
    assert sorted(p.name for p in out.parent.iterdir()) == ["vit.onnx", "vit.onnx.json"]  # no temp files left


def test_cli_verification_failure_writes_nothing(cli, one_line_error, ckpts: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that disagrees with PyTorch (simulated: the reference shifted by 1e-3) is not written,
    and an existing file stays as it was even with --force."""
    ckpt = image_checkpoint(ckpts / "vit-bad", "vit")
    out = tmp_path / "vit.onnx"
    out.write_bytes(b"previous export")
    real = export_module.torch_outputs
    monkeypatch.setattr(export_module, "torch_outputs", lambda m, x: [t + 1e-3 for t in real(m, x)])
    r = cli("export", "--checkpoint", ckpt, "--out", out, "--force")
    one_line_error(r, "differs from PyTorch by up to 1.00e-03", "nothing written")
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.onnx"]


@pytest.mark.parametrize("case", ["missing", "bad-config", "bad-weights", "format", "opset-low", "opset-high",
                                  "out-is-dir", "device"])
def test_cli_bad_input_is_one_line(case: str, cli, one_line_error, bert_classifier: Path, tmp_path: Path) -> None:
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(bert_classifier, ckpt)
    out = tmp_path / "model.onnx"
    extra: list[str] = []
    if case == "missing":
        ckpt, expected = tmp_path / "nope", ("checkpoint directory not found", "nope")
    elif case == "bad-config":
        (ckpt / "config.json").write_text("{not json")
        expected = ("config.json", "is not valid JSON")
    elif case == "bad-weights":
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 20)
        expected = ("cannot read weights", "model.safetensors")
    elif case == "format":
        extra, expected = ["--format", "tflite"], ("unknown export format 'tflite'", "onnx")
    elif case in ("opset-low", "opset-high"):
        opset = "17" if case == "opset-low" else "24"
        extra, expected = ["--opset", opset], (f"opset {opset} is not supported", "18..23")
    elif case == "out-is-dir":
        out.mkdir()
        expected = ("is a directory",)
    else:
        extra, expected = ["--device", "cuda"], ("export runs on the CPU",)
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(cli("export", "--checkpoint", ckpt, "--out", out, *extra), *expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp files
