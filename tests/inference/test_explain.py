"""Explanations (fromzero.inference.explain*, ``fromzero explain``).

Sanity checks on tasks whose answer is known by construction:

* text: a tiny BERT is fine-tuned on the sentiment sentences of tests/finetune (the label is set
  by ONE sentiment word among neutral filler); Integrated Gradients must put its largest
  attribution on that word, and the attributions must add up to the logit difference.
* images: 24 x 24 noise images, class "square" holds a white 6 x 6 square at a random place
  (class "empty" none), both hold a one-colour distractor square elsewhere. The simple CNN and a
  tiny ViT are fine-tuned on them; the Grad-CAM peak must land on the white square.
* attention: the recomputed attention probabilities equal Hugging Face's ``output_attentions``
  for BERT, ViT, GPT-2 and LLaMA (rotary, grouped-query) models, and the PNG grid has one panel
  per layer and head.

Plus the command line: outputs, HTML escaping, and the one-line errors for bad input.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fromzero.inference.explain import ExplainConfig, Explainer, explain
from fromzero.inference.explain_attention import attention_figure, attention_maps
from fromzero.inference.explain_text import TokenAttribution, render_html

# The tiny base checkpoints and data of the fine-tuning tests (pytest puts tests/ on sys.path).
from finetune.conftest import NEGATIVE, POSITIVE, sentiment_rows, text_config, write_bert_base, write_gpt_base

SENTIMENT_WORDS = set(POSITIVE) | set(NEGATIVE)
SIZE, SQUARE = 24, 6  # image side, side of the squares


# ---------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_base(tmp_path_factory.mktemp("explain-bert") / "base")


@pytest.fixture(scope="module")
def text_classifier(bert_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT fine-tuned on the sentiment sentences (test accuracy 1.0)."""
    from fromzero.finetune.text import finetune_text_classification

    root = tmp_path_factory.mktemp("explain-text")
    data = root / "sentiment.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(sentiment_rows())
    result = finetune_text_classification(text_config(bert_base, data, root / "run", epochs=8))
    assert result["test"]["accuracy"] == 1.0
    return Path(result["checkpoint"])


def square_image(rng: np.random.Generator, square: bool) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(24, 24, 3) uint8 noise with a one-colour distractor square in one quadrant and, if
    ``square``, a white square in another; returns the image and the white square's corner."""
    img = rng.uniform(0, 60, size=(SIZE, SIZE, 3))
    quadrants = [(0, 0), (0, 1), (1, 0), (1, 1)]
    order = rng.permutation(4)

    def corner(q: int) -> tuple[int, int]:
        qr, qc = quadrants[q]
        half = SIZE // 2
        return (qr * half + int(rng.integers(0, half - SQUARE + 1)), qc * half + int(rng.integers(0, half - SQUARE + 1)))

    r, c = corner(order[1])
    img[r:r + SQUARE, c:c + SQUARE, int(rng.integers(0, 3))] = 220
    box = None
    if square:
        box = corner(order[0])
        img[box[0]:box[0] + SQUARE, box[1]:box[1] + SQUARE] = 235
    return np.clip(img, 0, 255).astype(np.uint8), box


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    for split, n in {"train": 48, "val": 12, "test": 4}.items():
        for cls in ("empty", "square"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(square_image(rng, cls == "square")[0]).save(folder / f"{i:02d}.png")
    return root


def train_images(data: Path, out: Path, arch: str, **kw) -> Path:
    from fromzero.finetune.images import ImageFinetuneConfig, finetune_images

    cfg = ImageFinetuneConfig(data_dir=str(data), arch=arch, image_size=SIZE, resize_size=SIZE, batch_size=16,
                              weight_decay=0.0, seed=0, device="cpu", dtype="float32", out_dir=str(out),
                              progress=False, vit_patch_size=4, vit_hidden_size=32, vit_layers=2, vit_heads=2, **kw)
    result = finetune_images(cfg)
    assert result["val"]["accuracy"] == 1.0
    return Path(result["checkpoint"])


@pytest.fixture(scope="module")
def cnn_classifier(squares: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_images(squares, tmp_path_factory.mktemp("cnn") / "run", "simple", epochs=6, lr=3e-3)


@pytest.fixture(scope="module")
def vit_classifier(squares: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_images(squares, tmp_path_factory.mktemp("vit") / "run", "vit", epochs=25, lr=1e-3)


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt_base(tmp_path_factory.mktemp("explain-gpt") / "base")


# ---------------------------------------------------------------------------------------------
# text: Integrated Gradients


def test_ig_puts_the_top_attribution_on_the_sentiment_word(text_classifier: Path, tmp_path: Path) -> None:
    texts = [t for t, _ in sentiment_rows(20, seed=123)]
    records = explain(ExplainConfig(str(text_classifier), out=str(tmp_path), device="cpu"), texts=texts,
                      echo=lambda line: None)
    hits = 0
    for text, record in zip(texts, records):
        words = [(tok, a) for tok, a, s in zip(record["tokens"], record["attributions"], record["special"]) if not s]
        top = max(words, key=lambda ta: ta[1])[0]
        hits += top in SENTIMENT_WORDS and top in text.split()
        # completeness: the attributions add up to F(input) - F(baseline), up to the reported delta
        assert sum(record["attributions"]) == pytest.approx(record["logit_difference"] + record["delta"], abs=1e-5)
        assert abs(record["delta"]) < 1e-3
        assert record["target"] == record["label"]
        assert record["tokens"][0] == "[CLS]" and record["tokens"][-1] == "[SEP]"
        assert record["special"][0] and record["special"][-1] and not any(record["special"][1:-1])
    assert hits >= 16, f"the sentiment word was the top token in {hits} of 20 sentences"
    assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["001.ig.html", "001.ig.json"]
    assert len(list(tmp_path.glob("*.ig.html"))) == 20
    assert json.loads((tmp_path / "001.ig.json").read_text())["tokens"] == records[0]["tokens"]


def test_ig_explains_the_requested_target(text_classifier: Path, tmp_path: Path) -> None:
    """Asked about the other class, the sentiment word counts against it."""
    texts = [t for t, lab in sentiment_rows(10, seed=7)]
    explainer = Explainer(ExplainConfig(str(text_classifier), target="neg", device="cpu"))
    against = 0
    for text in texts:
        data = explainer.explain_text(text).data
        assert data["target"] == "neg"
        word = next(w for w in text.split() if w in SENTIMENT_WORDS)
        value = data["attributions"][data["tokens"].index(word)]
        against += (value < 0) == (word in POSITIVE)
    assert against >= 8


def test_ig_on_a_lora_adapter_checkpoint(bert_base: Path, tmp_path: Path, cli) -> None:
    """An adapter directory (base + LoRA) is explained as the merged model."""
    from fromzero.finetune.lora import apply_lora, load_base, save_adapter
    from fromzero.finetune.methods import MethodConfig
    from fromzero.models.bert import Bert, BertConfig

    config = BertConfig.from_dict({**json.loads((bert_base / "config.json").read_text()), "head": "classification",
                                   "num_labels": 2, "labels": ["neg", "pos"]})
    torch.manual_seed(4)
    model = Bert(config)
    load_base(model, bert_base)
    peft_model = apply_lora(model, config.to_dict(), MethodConfig(method="lora", lora_rank=4),
                            modules_to_save=["classifier"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    adapter = tmp_path / "lora"
    save_adapter(adapter, peft_model, config.to_dict(), bert_base, bert_base / "tokenizer.json",
                 {"task": "text-classification"})
    result = cli("explain", "--checkpoint", adapter, "--text", "the film was good", "--out", tmp_path / "out",
                 "--steps", "20", "--device", "cpu")
    assert result.code == 0, result
    data = json.loads((tmp_path / "out" / "001.ig.json").read_text())
    assert data["steps"] == 20 and data["label"] in ("neg", "pos")
    assert sum(data["attributions"]) == pytest.approx(data["logit_difference"] + data["delta"], abs=1e-5)


def test_html_is_escaped_and_self_contained() -> None:
    text = "the <script>alert('x')</script> & good"
    tokens = ["[CLS]", "the", "<", "script", ">", "&", "good", "[SEP]"]
    spans = [[0, 0], [0, 3], [4, 5], [5, 11], [11, 12], [32, 33], [34, 38], [0, 0]]
    result = TokenAttribution(text=text, tokens=tokens, spans=spans, special=[True] + [False] * 6 + [True],
                              attributions=[0, -0.1, 0.0, 0.05, 0.0, 0.0, 0.9, 0], label="<b>pos</b>",
                              target="<b>pos</b>", probabilities={"neg": 0.1, "<b>pos</b>": 0.9}, delta=1e-6,
                              logit_difference=0.85, steps=50, baseline="pad")
    page = render_html(result, "Why <script>?")
    assert "<script" not in page and "<b>pos" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;pos&lt;/b&gt;" in page and "&amp;" in page
    assert "http" not in page and "<link" not in page  # self-contained: no external resources
    # the strongest word is drawn in full green, a negative one in red
    assert 'rgba(22, 163, 74, 0.85)" title="good: +0.9000">good</span>' in page
    assert 'rgba(220, 38, 38,' in page.split(">the<")[0].rsplit("<span", 1)[1]


# ---------------------------------------------------------------------------------------------
# images: Grad-CAM


def probes(tmp_path: Path, n: int = 20) -> list[tuple[Path, tuple[int, int]]]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        img, box = square_image(rng, True)
        path = tmp_path / f"probe{i:02d}.png"
        Image.fromarray(img).save(path)
        out.append((path, box))
    return out


def on_square(peak: list[int], box: tuple[int, int], margin: int = 1) -> bool:
    (r, c), (r0, c0) = peak, box
    return r0 - margin <= r < r0 + SQUARE + margin and c0 - margin <= c < c0 + SQUARE + margin


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_gradcam_peak_lands_on_the_square(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    checkpoint = request.getfixturevalue(f"{kind}_classifier")
    cases = probes(tmp_path)
    records = explain(ExplainConfig(str(checkpoint), method="gradcam", target="square", out=str(tmp_path / "out"),
                                    device="cpu"), images=[p for p, _ in cases], echo=lambda line: None)
    hits = sum(on_square(r["peak"], box) for r, (_, box) in zip(records, cases))
    assert hits >= (18 if kind == "cnn" else 16), f"Grad-CAM peak on the square in {hits} of 20 images"
    first = records[0]
    assert first["layer"] == ("conv2" if kind == "cnn" else "blocks.1 input")
    assert first["image_size"] == [SIZE, SIZE]
    grid = np.array(first["grid"])
    assert grid.shape == ((SIZE, SIZE) if kind == "cnn" else (6, 6)) and (grid >= 0).all()
    with Image.open(tmp_path / "out" / "001.gradcam.png") as png:
        assert png.format == "PNG" and png.size == (640, 360)


def test_gradcam_of_the_other_class_looks_elsewhere(cnn_classifier: Path, tmp_path: Path) -> None:
    """Asked about "empty", the heat map is not on the white square (evidence against it)."""
    cases = probes(tmp_path, 10)
    records = explain(ExplainConfig(str(cnn_classifier), target="empty", out=str(tmp_path / "out"), device="cpu"),
                      images=[p for p, _ in cases], echo=lambda line: None)
    assert all(r["target"] == "empty" and r["label"] == "square" for r in records)
    assert sum(on_square(r["peak"], box) for r, (_, box) in zip(records, cases)) <= 2


# ---------------------------------------------------------------------------------------------
# attention maps


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # sharper-than-uniform attention, so the comparison means something
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "vit", "gpt2", "llama"])
def test_attention_maps_equal_hugging_face(family: str) -> None:
    transformers = pytest.importorskip("transformers")
    from fromzero.models import build_model, convert_bert, convert_gpt, convert_vit

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (1, 9))
    eager = {"attn_implementation": "eager"}  # the path that returns attention probabilities
    if family == "bert":
        hf = transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **eager))
        converter, inputs = convert_bert, ids
    elif family == "vit":
        hf = transformers.ViTModel(transformers.ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, **eager))
        converter, inputs = convert_vit, torch.randn(1, 3, 16, 16)
    elif family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32,
                                                                  n_layer=2, n_head=4, **eager))
        converter, inputs = convert_gpt, ids
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, **eager))
        converter, inputs = convert_gpt, ids
    hf = _randomized(hf)
    config, state = converter.from_hf(hf.config.to_dict(), hf.state_dict())
    model = build_model(config)
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        expected = torch.stack(hf(inputs, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    maps = attention_maps(model.eval(), inputs)
    assert maps.shape == expected.shape
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
    assert float(maps.max()) > 0.3  # not uniform: the check above could not pass by accident


def test_gpt_attention_grid_via_cli(gpt_checkpoint: Path, tmp_path: Path, cli) -> None:
    text = "hello there"
    result = cli("explain", "--checkpoint", gpt_checkpoint, "--text", text, "--out", tmp_path, "--device", "cpu")
    assert result.code == 0, result
    assert result.out.startswith(f"wrote {tmp_path / '001.attention.png'}, {tmp_path / '001.attention.json'}: "
                                 "2 layers x 2 heads over 11 tokens")
    data = json.loads((tmp_path / "001.attention.json").read_text())
    assert data["shape"] == [2, 2, 11, 11] and data["layers"] == 2 and data["heads"] == 2
    assert "".join(data["tokens"]) == text
    weights = np.array(data["weights"])
    assert weights.shape == (2, 2, 11, 11)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
    assert np.all(np.triu(weights, k=1) == 0)  # causal: nobody attends to the future
    # the PNG: one panel per (layer, head), at the figure size
    maps = torch.tensor(weights, dtype=torch.float32)
    fig = attention_figure(maps, data["tokens"], "t")
    panels = [ax for ax in fig.axes if ax.images]  # the colour bar draws no image
    assert len(panels) == 2 * 2
    with Image.open(tmp_path / "001.attention.png") as png:
        expected = tuple(round(v) for v in fig.get_size_inches() * fig.dpi)
        assert png.size == expected


def test_text_classifier_attention_and_bigger_grid(text_classifier: Path, tmp_path: Path) -> None:
    """BERT: every token attends (no causal mask); the grid grows with layers x heads."""
    records = explain(ExplainConfig(str(text_classifier), method="attention", out=str(tmp_path), device="cpu"),
                      texts=["the film was good"], echo=lambda line: None)
    data = records[0]
    assert data["shape"] == [2, 4, 6, 6] and data["tokens"] == ["[CLS]", "the", "film", "was", "good", "[SEP]"]
    assert data["label"] == "pos"
    assert np.array(data["weights"])[..., 1:].min() > 0  # bidirectional: the future is visible
    fig = attention_figure(torch.tensor(data["weights"]), data["tokens"])
    assert len([ax for ax in fig.axes if ax.images]) == 2 * 4  # one panel per (layer, head)
    with Image.open(tmp_path / "001.attention.png") as png:
        wide, tall = png.size
    assert wide > tall  # 4 heads across, 2 layers down


def test_vit_attention_over_patches(vit_classifier: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = tmp_path / "x.png"
    Image.fromarray(square_image(rng, True)[0]).save(image)
    records = explain(ExplainConfig(str(vit_classifier), method="attention", out=str(tmp_path / "o"), device="cpu"),
                      images=[image], echo=lambda line: None)
    assert records[0]["shape"] == [2, 2, 37, 37] and records[0]["patch_grid"] == [6, 6]
    assert "weights" in records[0] and records[0]["tokens"][:2] == ["[CLS]", "0,0"]


# ---------------------------------------------------------------------------------------------
# command line: bad input


def test_method_the_model_does_not_support(cli, one_line_error, text_classifier: Path, cnn_classifier: Path,
                                           gpt_checkpoint: Path, tmp_path: Path) -> None:
    image, out = tmp_path / "x.png", tmp_path / "out"
    Image.fromarray(square_image(np.random.default_rng(0), True)[0]).save(image)
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--method", "gradcam", "--out", out),
                   "--method gradcam does not apply to a text classifier (fromzero-bert); use ig or attention")
    one_line_error(cli("explain", "--checkpoint", cnn_classifier, "--image", image, "--method", "attention",
                       "--out", out), "does not apply to a CNN image classifier; use gradcam")
    one_line_error(cli("explain", "--checkpoint", gpt_checkpoint, "--text", "hi", "--method", "ig", "--out", out),
                   "does not apply to a GPT language model; use attention")
    one_line_error(cli("explain", "--checkpoint", gpt_checkpoint, "--text", "hi", "--method", "shap", "--out", out),
                   "unknown --method 'shap'", "ig, gradcam, attention")
    assert not out.exists()


def test_bad_inputs_are_one_line_errors(cli, one_line_error, text_classifier: Path, cnn_classifier: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    one_line_error(cli("explain", "--checkpoint", tmp_path / "nope", "--text", "hi"), "checkpoint directory not found")
    one_line_error(cli("explain", "--checkpoint", text_classifier), "give exactly one of --text, --image or --input")
    one_line_error(cli("explain", "--checkpoint", cnn_classifier, "--image", tmp_path / "missing.png", "--out", out),
                   "image not found", "missing.png")
    one_line_error(cli("explain", "--checkpoint", cnn_classifier, "--text", "hi", "--out", out),
                   "a CNN image classifier: give --image FILE or --input FOLDER")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--image", tmp_path / "x.png", "--out", out),
                   "a text classifier (fromzero-bert): give --text TEXT or --input FILE")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--input", tmp_path / "none.txt", "--out", out),
                   "input file not found")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--target", "meh", "--out", out),
                   "unknown --target 'meh' (labels: neg, pos)")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--steps", "0", "--out", out),
                   "--steps must be positive")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--method", "attention",
                       "--target", "pos", "--out", out), "--target applies to ig and gradcam")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--baseline", "zero", "--out", out),
                   "unknown --baseline 'zero' (choose from pad, mask)")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--text", "hi", "--baseline", "mask", "--out", out),
                   "this tokenizer has no [MASK] token")
    quantized = tmp_path / "quantized"
    shutil.copytree(text_classifier, quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization": {"method": "int8-weight"}}))
    one_line_error(cli("explain", "--checkpoint", quantized, "--text", "hi", "--out", out),
                   "is quantized (int8-weight); ig needs the gradients of a float model")
    assert not out.exists()


def test_existing_outputs_need_force(cli, one_line_error, text_classifier: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "texts.txt"
    inputs.write_text("the film was good\nmy day was awful\n", encoding="utf-8")
    out = tmp_path / "out"
    first = cli("explain", "--checkpoint", text_classifier, "--input", inputs, "--out", out, "--steps", "10",
                "--device", "cpu")
    assert first.code == 0, first
    assert len(first.out.splitlines()) == 2 and "top token 'good'" in first.out.splitlines()[0]
    (out / "002.ig.html").write_text("mine", encoding="utf-8")
    one_line_error(cli("explain", "--checkpoint", text_classifier, "--input", inputs, "--out", out),
                   f"{out / '001.ig.html'} already exists (and 3 more); pass --force to overwrite")
    assert (out / "002.ig.html").read_text(encoding="utf-8") == "mine"  # nothing was touched
    again = cli("explain", "--checkpoint", text_classifier, "--input", inputs, "--out", out, "--steps", "10",
                "--force", "--device", "cpu")
    assert again.code == 0, again
    assert "awful" in (out / "002.ig.html").read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["001.ig.html", "001.ig.json", "002.ig.html", "002.ig.json"]
