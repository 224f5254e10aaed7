"""`fromzero ui` in a real browser (Debian's chromium via Playwright): runs, a live curve, launch and
stop (and resume) from the form, compare, chat with streamed text, and a path traversal that gets 404.

Each test saves a screenshot of its page in its tmp dir. To refresh the README's screenshots:
``FROMZERO_UI_SCREENSHOTS=docs/images pytest tests/ui/test_browser.py`` (docs/images/ui-*.png).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import find_chromium

pytestmark = pytest.mark.slow

# One line in the summary when the machine has no browser (the fixture skips too, for other reasons).
if find_chromium() is None:
    pytest.skip("no chromium found (apt-get install chromium, or set FROMZERO_CHROMIUM): browser tests skipped",
                allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]'): browser "
                    "tests skipped")


def shot(page: Any, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"ui-{name}.png"), full_page=True)
    target = os.environ.get("FROMZERO_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(target) / f"ui-{name}.png"))


def test_runs_page_lists_the_run_a_fixture_trained(page, ui_server, tmp_path):
    page.goto(ui_server.url + "/#/runs")
    row = page.locator('tr[data-run="done"]')
    row.wait_for()
    assert row.locator('[data-status="finished"]').count() == 1
    assert "val_loss" in row.inner_text() and "pretrain" in row.inner_text()
    page.fill("#runs-filter", "other")
    page.locator('tr[data-run="done"]').wait_for(state="detached")
    assert page.locator('tr[data-run="other"]').count() == 1
    page.fill("#runs-filter", "")
    page.locator('tr[data-run="done"]').wait_for()
    shot(page, tmp_path, "runs")


def test_a_curve_gains_points_while_metrics_rows_arrive(page, ui_server, ui_fixture, tmp_path):
    import shutil

    live = ui_fixture["runs"] / "live"
    live.mkdir()
    shutil.copy(ui_fixture["runs"] / "done" / "config.yaml", live / "config.yaml")
    (live / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) + "\n"
                                                for s in (2, 4)))
    page.goto(ui_server.url + "/#/run/live")
    chart = page.locator('[data-chart="loss"]')
    chart.wait_for()
    page.wait_for_function("document.querySelector('[data-chart=\"loss\"]').dataset.points === '2'")
    with open(live / "metrics.jsonl", "a") as f:  # the training loop appends rows
        for s in (6, 8, 10):
            f.write(json.dumps({"step": s, "loss": 3.0 - s / 10, "lr": 1e-3}) + "\n")
    page.wait_for_function("document.querySelector('[data-chart=\"loss\"]').dataset.points === '5'")
    shutil.rmtree(live)


def test_launch_a_tiny_run_from_the_form_stop_it_and_resume_it(page, ui_server, ui_fixture, tmp_path):
    page.goto(ui_server.url + "/#/launch")
    page.select_option("#recipe-select", "tiny.yaml")
    page.locator('tr[data-key="train.lr"] input').fill("0.002")
    page.locator('tr[data-key="train.lr"].changed').wait_for()  # the changed key stands out
    page.click("#launch-run")
    job = page.locator('#jobs-table tr[data-job]').first
    job.wait_for()
    shot(page, tmp_path, "launch")
    run = job.locator("a").inner_text()
    run_dir = ui_fixture["runs"] / run
    # follow it: its page shows a loss curve that grows while it trains
    page.goto(ui_server.url + "/#/run/" + run)
    page.locator('[data-chart="loss"]').wait_for(timeout=90_000)
    page.wait_for_function("+document.querySelector('[data-chart=\"loss\"]').dataset.points >= 2", timeout=60_000)
    shot(page, tmp_path, "run")
    page.click("#stop-run")
    page.locator('#run-status [data-status="stopped"]').wait_for(timeout=60_000)
    assert (run_dir / "checkpoints" / "last" / "info.json").is_file()  # SIGINT made it save
    assert float(_config(run_dir)["train"]["lr"]) == 0.002  # the form's value reached the run
    step = json.loads((run_dir / "checkpoints" / "last" / "info.json").read_text())["step"]
    # resume continues the same run directory from checkpoints/last
    page.click("#resume-run")
    page.locator("#stop-run").wait_for(timeout=30_000)
    deadline = time.monotonic() + 90
    while _last_step(run_dir) <= step and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _last_step(run_dir) > step
    page.click("#stop-run")
    page.locator('#run-status [data-status="stopped"]').wait_for(timeout=60_000)


def _config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def _last_step(run_dir: Path) -> int:
    steps = [json.loads(line).get("step", 0) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return max(steps, default=0)


def test_compare_two_runs(page, ui_server, tmp_path):
    page.goto(ui_server.url + "/#/runs")
    page.locator('tr[data-run="done"] input[type=checkbox]').check()
    page.locator('tr[data-run="other"] input[type=checkbox]').check()
    page.click("#compare-selected")
    page.locator("#config-diff").wait_for()
    chart = page.locator("#compare-chart")
    assert chart.get_attribute("data-series") == "2"
    assert chart.locator(".u-legend .u-series").count() == 3  # step + one line per run
    diff = page.locator("#config-diff").inner_text()
    assert "train.lr" in diff and "0.001" in diff
    page.select_option("#compare-metric", "val_loss")
    shot(page, tmp_path, "compare")


def test_chat_with_a_tiny_model_streams_text(page, ui_server, tmp_path):
    page.goto(ui_server.url + "/#/chat")
    page.locator("#chat-info").filter(has_text="context 64 tokens").wait_for()
    page.fill("#chat-system", "be brief")
    page.fill("#chat-max-tokens", "20")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "hello there")
    page.click("#chat-send")
    reply = page.locator(".msg.assistant").last
    page.wait_for_function("document.querySelector('.msg.assistant:last-child')?.dataset.finish")
    assert reply.get_attribute("data-chunks") not in (None, "0")
    assert len(reply.inner_text().replace("assistant", "", 1).strip()) > 0
    page.check("#chat-show-prompt")
    prompt = page.locator("#chat-prompt")
    prompt.filter(has_text="USER:").wait_for()
    assert "hello there" in prompt.inner_text() and "be brief" in prompt.inner_text()
    shot(page, tmp_path, "chat")


def test_a_path_traversal_attempt_gets_404(page, ui_server):
    ok = page.goto(ui_server.url + "/files/done/plots/loss.png")
    assert ok.status == 200
    for path in ("/files/done/..%2f..%2f..%2fetc%2fpasswd", "/files/%2e%2e/%2e%2e/etc/passwd",
                 "/files/done/%2e%2e%2fconfig.yaml/../../../../etc/passwd"):
        response = page.goto(ui_server.url + path)
        assert response.status == 404, path


def test_playground_classifies_explains_and_embeds(page, ui_server, tmp_path):
    page.goto(ui_server.url + "/#/playground")
    page.select_option("#pg-model", "tiny-classifier")
    page.fill("#pg-text", "a very good film")
    page.click("#pg-classify")
    assert page.locator("#pg-label").inner_text() in ("neg", "pos")
    page.click("#pg-explain")
    page.locator("#pg-explanation iframe").wait_for()
    assert "good" in page.frame_locator("#pg-explanation iframe").locator("body").inner_text()
    shot(page, tmp_path, "playground")
    page.select_option("#pg-model", "tiny-encoder")
    page.fill("#pg-text-a", "a good film")
    page.fill("#pg-text-b", "a bad day")
    page.click("#pg-embed")
    assert "cosine similarity" in page.locator("#pg-result h2").inner_text()
