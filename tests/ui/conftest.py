"""Fixtures for `fromzero ui`: a runs folder a fixture trained (tiny), a recipes folder, a tiny chat
checkpoint, a live interface server, and Debian's chromium driven by Playwright.

``browser``: Playwright's Python API with ``executable_path`` at the system chromium (apt-get install
chromium; Playwright's own browser download is not used). Without either, browser tests skip with
one line saying what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.serving.conftest import TEMPLATE, LiveServer, write_bert, write_gpt

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("FROMZERO_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.fixture(scope="session")
def ui_fixture(tmp_path_factory: pytest.TempPathFactory, recipe_writer: Any) -> dict[str, Path]:
    """runs/ with ``done`` (a tiny GPT pretrained for 10 steps) and ``other`` (its copy with
    another lr and other curves: a second run to compare), recipes/ with ``tiny.yaml`` (a long
    tiny pretraining, for launching and stopping), a tiny SFT chat checkpoint, a tiny BERT text
    classifier (neg / pos) and a tiny BERT encoder."""
    from fromzero.cli import main

    root = tmp_path_factory.mktemp("ui")
    runs, recipes = root / "runs", root / "recipes"
    runs.mkdir()
    recipes.mkdir()
    write = recipe_writer(recipes)
    done = write("done-recipe", out_dir=runs / "done", train={"max_steps": 10, "eval_every": 5, "log_interval": 2})
    assert main(["pretrain", "--config", str(done), "--quiet"]) == 0
    done.unlink()
    other = runs / "other"
    shutil.copytree(runs / "done", other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["lr"] = 1e-3
    (other / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("loss", "val_loss"):
            if key in row:
                row[key] *= 1.1
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Launched from the page: long enough to be stopped while it trains; the interface sets out_dir.
    write("tiny", out_dir=runs / "unused", train={"max_steps": 100000, "eval_every": 20, "log_interval": 2,
                                                  "decay_steps": 100000})
    chat = write_gpt(root / "chat" / "sft", info={"task": "sft", "template": TEMPLATE}, block_size=64)
    (root / "models").mkdir()
    classifier = write_bert(root / "models" / "classifier", classifier=True)
    encoder = write_bert(root / "models" / "encoder")
    return {"root": root, "runs": runs, "recipes": recipes, "chat": chat, "classifier": classifier, "encoder": encoder}


@pytest.fixture(scope="module")
def ui_server(ui_fixture: dict[str, Path]) -> Iterator[LiveServer]:
    from fromzero.ui import UIConfig, create_app

    config = UIConfig(runs=ui_fixture["runs"], recipes=ui_fixture["recipes"], device="cpu",
                      models={"tiny-sft": ui_fixture["chat"], "tiny-classifier": ui_fixture["classifier"],
                              "tiny-encoder": ui_fixture["encoder"]})
    server = LiveServer(create_app(config))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium found (apt-get install chromium, or set FROMZERO_CHROMIUM): browser tests skipped")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]'): browser tests skipped")
    with sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # a browser that cannot start here (no display libraries, ...)
            pytest.skip(f"chromium at {executable} does not start ({str(e).splitlines()[0]}): browser tests skipped")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
