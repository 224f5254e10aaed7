"""The family-independent part of HF interop: sources, weight files, shards, safety, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fromzero.cli import main
from fromzero.errors import FromzeroError
from fromzero.models import hf
from fromzero.checkpoint import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out)
    return out


def _reference_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(ids).logits


def _ours(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(directory)(ids)[0]


IDS = torch.tensor([[1, 5, 7, 9, 2, 3]])


def test_sharded_safetensors_are_read(gpt2_dir, tmp_path):
    state = hf.read_hf_state(gpt2_dir)
    names = sorted(state)
    half = len(names) // 2
    src = tmp_path / "sharded"
    src.mkdir()
    (src / "config.json").write_text((gpt2_dir / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(src / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf.convert_from_hf(str(src), tmp_path / "out")
    torch.testing.assert_close(_ours(tmp_path / "out", IDS), _reference_logits(gpt2_dir, IDS), atol=1e-5, rtol=1e-4)


def test_pytorch_bin_weights_are_read_with_weights_only(gpt2_dir, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((gpt2_dir / "config.json").read_text())
    torch.save(hf.read_hf_state(gpt2_dir), src / "pytorch_model.bin")
    hf.convert_from_hf(str(src), tmp_path / "out")
    torch.testing.assert_close(_ours(tmp_path / "out", IDS), _reference_logits(gpt2_dir, IDS), atol=1e-5, rtol=1e-4)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_refused(gpt2_dir, tmp_path, capsys):
    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text((gpt2_dir / "config.json").read_text())
    torch.save({"x": _Exploit()}, src / "pytorch_model.bin")
    assert main(["convert", "from-hf", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "weights_only=True" in err[0]
    assert not (tmp_path / "out").exists()


def test_no_weights_is_a_clear_error(gpt2_dir, tmp_path):
    src = tmp_path / "noweights"
    src.mkdir()
    (src / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(FromzeroError, match="has no weights"):
        hf.convert_from_hf(str(src), tmp_path / "out")


def test_existing_output_needs_force_and_survives_failures(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "from-hf", str(gpt2_dir), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["convert", "from-hf", str(gpt2_dir), str(out), "--force"]) == 0
    torch.testing.assert_close(_ours(out, IDS), _reference_logits(gpt2_dir, IDS), atol=1e-5, rtol=1e-4)


def test_hub_id_offline_names_hf_hub_offline_and_the_local_alternative(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(
        [sys.executable, "-m", "fromzero", "convert", "from-hf", "some-org/some-model", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "HF_HUB_OFFLINE" in lines[0] and "local model directory" in lines[0]
    assert not (tmp_path / "out").exists()


def test_supported_types_are_listed_for_an_unknown_one(gpt2_dir, tmp_path):
    src = tmp_path / "t5"
    src.mkdir()
    config = json.loads((gpt2_dir / "config.json").read_text())
    config["model_type"] = "t5"
    (src / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(src / "model.safetensors"))
    with pytest.raises(FromzeroError) as e:
        hf.convert_from_hf(str(src), tmp_path / "out")
    for name in ("bert", "gpt2", "llama", "mistral", "qwen2", "vit"):
        assert name in str(e.value)
