"""docs/own-data.md's four worked examples run as written (with each line's ``quick:`` overrides),
in order, in a fresh folder holding a copy of examples/: the page cannot drift from the CLI.

Each example is a fenced bash block between ``<!-- example: NAME -->`` and ``<!-- /example -->``.
The chat example starts from the text example's GPT, so both run in one shared folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "own-data.md"
EXAMPLES = ("text", "classifier", "chat", "images")


def example_script(name: str, quick: bool = True) -> str:
    """The bash block of example ``name`` as a script: comment-only lines dropped, each line's
    ``quick:`` overrides appended when ``quick``."""
    text = DOC.read_text(encoding="utf-8")
    start = f"<!-- example: {name} -->"
    assert text.count(start) == 1, f"{DOC.name} needs exactly one {start} marker"
    block = text.split(start, 1)[1].split("<!-- /example -->", 1)[0]
    fenced = re.search(r"```bash\n(.*?)```", block, re.S)
    assert fenced, f"example {name}: no ```bash block between its markers"
    lines = []
    for line in fenced.group(1).splitlines():
        command, _, comment = line.partition("  #")
        if not command.strip() or command.lstrip().startswith("#"):
            continue
        quick_overrides = re.search(r"quick: (.*)$", comment)
        if quick and quick_overrides:
            command = f"{command.rstrip()} {quick_overrides.group(1)}"
        lines.append(command.rstrip())
    return "\n".join(lines) + "\n"


def run_example(name: str, folder: Path) -> subprocess.CompletedProcess:
    script = example_script(name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = env.get("FROMZERO_TEST_THREADS", "2")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (name, script, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def fresh_folder(path: Path) -> Path:
    shutil.copytree(ROOT / "examples", path / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    return path


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """Example 1 (text -> tokenizer -> GPT -> generate), run once: example 3 fine-tunes its model."""
    folder = fresh_folder(tmp_path_factory.mktemp("own-data"))
    return folder, run_example("text", folder)


def test_every_example_is_in_the_page_and_parses() -> None:
    for name in EXAMPLES:
        script = example_script(name)
        assert "fromzero " in script, name
        assert "runs/" in script, name  # everything the examples make goes under runs/ (and data/)
    text = DOC.read_text(encoding="utf-8")
    for path in re.findall(r"\bexamples/[\w./-]+\.\w+", text):
        assert (ROOT / path).exists(), f"{DOC.name} names {path}, which is not in the repository"


def test_sample_files_are_small() -> None:
    for path in (ROOT / "examples").rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 300_000, path
    total = sum(p.stat().st_size for p in (ROOT / "examples").rglob("*") if p.is_file())
    assert total < 1_000_000


def test_make_shapes_regenerates_the_committed_images(tmp_path: Path) -> None:
    from PIL import Image

    subprocess.run([sys.executable, str(ROOT / "examples" / "make_shapes.py"), "--out", str(tmp_path / "shapes")],
                   check=True, capture_output=True)
    committed = ROOT / "examples" / "shapes"
    names = sorted(str(p.relative_to(committed)) for p in committed.rglob("*.*"))
    assert names == sorted(str(p.relative_to(tmp_path / "shapes")) for p in (tmp_path / "shapes").rglob("*.*"))
    assert len(names) == 180
    for name in names:
        if name.endswith(".png"):  # lossless: the same pixels (JPEG bytes may differ between libjpeg builds)
            assert Image.open(committed / name).tobytes() == Image.open(tmp_path / "shapes" / name).tobytes(), name


@pytest.mark.slow
def test_text_example_trains_a_tokenizer_and_a_gpt_that_generates(keeper) -> None:
    folder, proc = keeper
    assert json.loads((folder / "data" / "keeper-tokenizer.json").read_text())["model"]["type"] == "BPE"
    meta = json.loads((folder / "data" / "keeper" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["train_tokens"] > 1000
    best = folder / "runs" / "keeper-gpt" / "checkpoints" / "best"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (best / name).is_file(), name
    rows = [json.loads(line) for line in (folder / "runs" / "keeper-gpt" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0]  # it learned something
    assert "Day 41." in proc.stdout and len(proc.stdout.split("Day 41.", 1)[1].strip()) > 20  # generate printed text


@pytest.mark.slow
def test_classifier_example_beats_chance_and_predicts(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    proc = run_example("classifier", folder)
    run = folder / "runs" / "tickets"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    test = json.loads((run / "test.json").read_text())
    assert test["labels"] == ["account", "billing", "shipping"]
    assert test["n"] >= 10 and test["accuracy"] > 0.5, test["accuracy"]  # chance is 1/3
    predictions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    inputs = [p["input"] for p in predictions]
    assert len(predictions) == 1 + len((folder / "examples" / "new-tickets.txt").read_text().strip().splitlines())
    assert all(p["label"] in test["labels"] for p in predictions), inputs


@pytest.mark.slow
def test_chat_example_fine_tunes_the_text_gpt_and_chats(keeper) -> None:
    folder, _ = keeper
    proc = run_example("chat", folder)
    run = folder / "runs" / "keeper-chat"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    info = json.loads((run / "checkpoints" / "best" / "info.json").read_text())
    assert info["task"] == "sft"
    assert "test: response loss" in proc.stdout
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) >= 3  # two chat replies (one per piped line) and generate --chat's reply


@pytest.mark.slow
def test_image_example_splits_the_folder_and_beats_chance(tmp_path: Path) -> None:
    folder = fresh_folder(tmp_path)
    proc = run_example("images", folder)
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (folder / "data" / "shapes" / split).iterdir()) == ["circle", "square", "triangle"]
    run = folder / "runs" / "shapes"
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    test = json.loads((run / "test.json").read_text())
    assert test["n"] == 27 and test["accuracy"] > 0.5  # chance is 1/3
    predictions = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(predictions) == 9 and all(p["label"] in test["labels"] for p in predictions)
