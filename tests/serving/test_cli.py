"""``fromzero serve`` as users run it: options, one-line errors, and a graceful SIGTERM.

The SIGTERM test starts the real command in a subprocess (``python -m fromzero serve``), streams a
long generation, sends SIGTERM mid-stream and checks that the request still completes in full,
that no new connection is accepted meanwhile, and that the process then exits with code 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def test_help_explains_every_option(cli):
    result = cli("serve", "--help")
    assert result.code == 0
    for option in ("--checkpoint", "--host", "--port", "--api-key", "FROMZERO_API_KEY", "--max-batch-size",
                   "--max-queue", "--max-tokens-cap", "--max-prompt-tokens", "--request-timeout", "--max-body-bytes",
                   "--sliding-window", "--device", "(default: 8)", "(default: 64)", "(default: 127.0.0.1)"):
        assert option in result.out, option


def test_bad_options_are_one_line_errors(cli, one_line_error, gpt_ckpt: Path, tmp_path: Path):
    one_line_error(cli("serve", "--checkpoint", tmp_path / "missing"), "checkpoint directory not found")
    one_line_error(cli("serve", "--checkpoint", gpt_ckpt, "--max-batch-size", "0"), "--max-batch-size must be positive")
    one_line_error(cli("serve", "--checkpoint", gpt_ckpt, "--request-timeout", "-1"), "--request-timeout")
    one_line_error(cli("serve", "--checkpoint", gpt_ckpt, "--max-tokens-cap", "100"),
                   "exceeds the model's context of 32 tokens", "--sliding-window")
    (tmp_path / "cnn").mkdir()
    (tmp_path / "cnn" / "config.json").write_text(json.dumps({"model_type": "fromzero-cnn"}))
    (tmp_path / "cnn" / "info.json").write_text(json.dumps({"task": "image-classification"}))
    one_line_error(cli("serve", "--checkpoint", tmp_path / "cnn"), "cannot serve", "image-classification")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(cli("serve", "--checkpoint", gpt_ckpt, "--port", str(port), "--device", "cpu"),
                       f"cannot listen on 127.0.0.1:{port}")


def _wait_for_port(log: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return int(match.group(1))
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"server did not start: {log.read_text()}")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(gpt_ckpt: Path, tmp_path: Path):
    log = tmp_path / "server.log"
    env = dict(os.environ, FROMZERO_API_KEY="k3y")
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fromzero", "serve", "--checkpoint", str(gpt_ckpt), "--port", "0",
             "--device", "cpu", "--sliding-window", "--max-tokens-cap", "100000", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        port = _wait_for_port(log, proc)
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}).status_code == 401  # key from the env
        n = 1500
        body = {"prompt": "hi", "max_tokens": n, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer k3y"}, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                first = next(lines)
                assert first.startswith("data: ")
                proc.send_signal(signal.SIGTERM)  # mid-stream
                time.sleep(0.5)
                with pytest.raises(httpx.ConnectError):  # no new connections while draining
                    httpx.get(f"{url}/health", timeout=5)
                events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == n  # the request in flight was finished in full
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()
