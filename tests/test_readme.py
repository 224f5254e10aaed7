"""The README's first-hour block runs as written (with each line's ``quick:`` overrides), in order,
in a fresh folder: the README cannot drift from the code again."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def first_hour_script(quick: bool = True) -> str:
    """The block between the README's first-hour markers as a bash script: comments dropped,
    each line's quick overrides appended when ``quick``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- first-hour -->", 1)[1].split("<!-- /first-hour -->", 1)[0]
    lines = []
    for line in block.strip().strip("`").removeprefix("bash").strip().splitlines():
        command, _, comment = line.partition("  #")
        quick_overrides = re.search(r"quick: (.*)$", comment)
        if quick and quick_overrides:
            command = f"{command} {quick_overrides.group(1)}"
        lines.append(command.rstrip())
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's client call uses curl")
def test_first_hour_block_runs_in_order_in_a_fresh_folder(tmp_path: Path) -> None:
    script = first_hour_script(quick=True)
    assert script.startswith("source .venv/bin/activate\n")
    assert script.count("fromzero ") >= 10 and "curl" in script and "fromzero runs" in script
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    script = script.replace("8011", str(_free_port()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OMP_NUM_THREADS"] = env.get("FROMZERO_TEST_THREADS", "2")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    for made in ("data/shakespeare-char/train.bin", "runs/shakespeare-char/checkpoints/best/model.safetensors",
                 "runs/genre/checkpoints/best/model.safetensors", "runs/genre-lora/checkpoints/best",
                 "runs/genre/test.json", "runs/genre-int8", "runs/genre.onnx", "runs/genre-explained"):
        assert (tmp_path / made).exists(), made
    assert '"choices"' in proc.stdout  # the server answered the client call
    listing = [line.split()[:3] for line in proc.stdout.splitlines() if line.startswith(("shakespeare-char ", "genre "))]
    assert ["shakespeare-char", "pretrain", "finished"] in listing and ["genre", "text-classification", "finished"] in listing
