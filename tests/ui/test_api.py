"""`fromzero ui` without a browser: its security rules (host, token, traversal, POST header), the
recipe form and the commands it builds, the runs folder readers, and the CLI's refusals."""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fromzero.errors import FromzeroError
from fromzero.ui import UIConfig, create_app
from fromzero.ui.launch import override_args, recipe_form
from fromzero.ui.runs import config_diff, inside, read_metrics

POST = {"X-Fromzero": "1"}


def client(tmp_path: Path, **options) -> TestClient:
    runs = tmp_path / "runs"
    runs.mkdir(exist_ok=True)
    options.setdefault("recipes", None)
    return TestClient(create_app(UIConfig(runs=runs, **options)), base_url="http://127.0.0.1")


def raw_get(url: str, path: str, headers: dict | None = None) -> int:
    """GET exactly ``path`` (no client-side normalisation of ``..`` or percent escapes)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers=headers or {})
    status = conn.getresponse().status
    conn.close()
    return status


def test_files_outside_the_runs_folder_are_404_whatever_the_spelling(ui_server, ui_fixture, tmp_path):
    runs = ui_fixture["runs"]
    secret = ui_fixture["root"] / "secret.json"
    secret.write_text('{"secret": 1}')
    (runs / "done" / "plots" / "leak.json").symlink_to(secret)  # a link leading out of the runs folder
    os.symlink(ui_fixture["root"], runs / "escape")
    try:
        assert raw_get(ui_server.url, "/files/done/plots/loss.png") == 200
        for path in ["/files/../secret.json", "/files/done/../../secret.json", "/files/%2e%2e/secret.json",
                     "/files/done/%2e%2e/%2e%2e/secret.json", "/files/done%2f..%2f..%2fsecret.json",
                     "/files/..%5csecret.json", "/files/%2fetc%2fpasswd", "//etc/passwd", "/files//etc/passwd",
                     "/files/done/plots/leak.json", "/files/escape/secret.json", "/files/done/checkpoints/last",
                     "/files/done/checkpoints/last/model.safetensors", "/files/done/%00.png",
                     "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"]:
            assert raw_get(ui_server.url, path) == 404, path
    finally:
        (runs / "done" / "plots" / "leak.json").unlink()
        (runs / "escape").unlink()


def test_inside_refuses_dot_segments_absolute_paths_and_links_out(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "a.png").write_bytes(b"x")
    (tmp_path / "run" / "in.png").symlink_to(tmp_path / "run" / "a.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(b"x")
    (tmp_path / "run" / "out.png").symlink_to(outside)
    assert inside(tmp_path, "run/a.png") == (tmp_path / "run" / "a.png").resolve()
    assert inside(tmp_path, "run/in.png") is not None  # a link that stays inside is fine
    for bad in ("run/out.png", "../x", "run/../run/a.png", "/etc/passwd", "run\\..\\..\\x", "run", "", "run/./a.png"):
        assert inside(tmp_path, bad) is None, bad


def test_token_is_needed_on_every_request_when_given(tmp_path):
    c = client(tmp_path, token="s3cret-token")
    assert c.get("/").status_code == 401
    assert c.get("/api/runs").status_code == 401
    assert c.get("/static/app.js").status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    # the printed URL sets a cookie, then the pages work without the token in the URL
    r = c.get("/?token=s3cret-token", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert c.get("/api/runs").status_code == 200


def test_without_a_token_only_loopback_host_names_are_served(tmp_path):
    c = client(tmp_path)
    assert c.get("/api/runs").status_code == 200
    assert c.get("/api/runs", headers={"Host": "localhost:7860"}).status_code == 200
    assert c.get("/api/runs", headers={"Host": "[::1]:7860"}).status_code == 200
    r = c.get("/api/runs", headers={"Host": "attacker.example:7860"})  # DNS rebinding
    assert r.status_code == 403 and "loopback" in r.json()["error"]


def test_posts_need_the_interface_header(tmp_path):
    c = client(tmp_path)
    r = c.post("/api/stop", json={"job": "1"})  # what a cross-site form could send
    assert r.status_code == 403
    r = c.post("/api/stop", json={"job": "1"}, headers=POST)
    assert r.status_code == 400 and r.json()["error"] == "no job 1"


def test_unknown_runs_recipes_and_chat_models_are_404_or_400(tmp_path):
    c = client(tmp_path)
    assert c.get("/api/run", params={"name": "../runs"}).status_code == 404
    assert c.get("/api/metrics", params={"name": "nope"}).status_code == 404
    assert c.get("/api/recipe", params={"name": "../pyproject.toml"}).status_code == 404
    r = c.post("/api/launch", json={"recipe": "x.yaml", "values": {}}, headers=POST)
    assert r.status_code == 400 and "--recipes" in r.json()["error"]
    r = c.post("/api/chat", json={"model": "/etc", "messages": []}, headers=POST)
    assert r.status_code == 400 and "no chat model" in r.json()["error"]
    assert c.get("/api/compare", params={"names": "a"}).status_code == 400


def test_recipe_form_has_types_defaults_docstrings_and_recipe_values():
    form = recipe_form(Path("recipes/digits-cnn.yaml"))
    assert form["verb"] == "finetune" and form["task"] == "image-classification"
    fields = {f["key"]: f for f in form["fields"]}
    lr = fields["train.lr"]
    assert lr["type"] == "float" and lr["value"] == 3e-3 and lr["in_recipe"] and lr["doc"]
    assert fields["train.epochs"]["type"] == "int" and fields["train.epochs"]["value"] == 40
    assert fields["data.source"]["value"] == "digits"
    assert not {"out_dir", "force"} & set(fields)  # the interface owns these
    keys = list(fields)
    assert keys.index("model.arch") < keys.index("data.source") < keys.index("train.lr")  # by section
    pre = recipe_form(Path("recipes/shakespeare-char.yaml"))
    pfields = {f["key"]: f for f in pre["fields"]}
    assert pre["verb"] == "pretrain" and pfields["model.n_layer"]["value"] == 4
    assert pfields["train.compile"]["type"] == "bool"


def test_launched_commands_are_argument_lists_from_the_schema():
    form = recipe_form(Path("recipes/digits-cnn.yaml"))
    args = override_args(form, {"train.lr": 0.01, "train.epochs": 40, "data.source": "a b; rm -rf /"})
    assert args == ["--train.lr=0.01", "--data.source=a b; rm -rf /"]  # unchanged keys are not passed
    with pytest.raises(FromzeroError, match="unknown recipe key 'out_dir'"):
        override_args(form, {"out_dir": "/etc"})
    with pytest.raises(FromzeroError, match="unknown recipe key"):
        override_args(form, {"--force": True})
    with pytest.raises(FromzeroError, match="train.epochs: expected int"):
        override_args(form, {"train.epochs": "3; ls"})
    with pytest.raises(FromzeroError, match="one line"):
        override_args(form, {"data.source": "a\n--force"})


def test_read_metrics_continues_from_an_offset_and_leaves_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    rows, offset = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    with open(path, "a") as f:
        f.write('ss": 1.0}\n')
    rows, offset = read_metrics(tmp_path, offset)
    assert rows == [{"step": 3, "loss": 1.0}]
    assert read_metrics(tmp_path, offset) == ([], offset)
    assert len(read_metrics(tmp_path, 10**9)[0]) == 3  # a file that shrank (a restart) is read again


def test_config_diff_lists_the_keys_that_differ():
    diff = config_diff({"a": {"train": {"lr": 1, "seed": 0}, "model": {"n": 2}},
                        "b": {"train": {"lr": 2, "seed": 0}, "model": {"n": 2, "extra": True}}})
    assert diff == [{"key": "model.extra", "values": {"a": None, "b": True}},
                    {"key": "train.lr", "values": {"a": 1, "b": 2}}]


def test_cli_refuses_a_public_host_without_a_token(cli, one_line_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FROMZERO_UI_TOKEN", raising=False)
    one_line_error(cli("ui", "--host", "0.0.0.0"), "--host 0.0.0.0", "--token")
    one_line_error(cli("ui", "--recipes", "nowhere"), "recipes folder not found")
    one_line_error(cli("ui", "--host", "0.0.0.0", "--token", "short"), "at least 8")
    assert not (tmp_path / "runs").exists()  # nothing created by a refused start


def test_run_table_has_task_model_status_best_and_duration(ui_server):
    with ui_server.client() as c:
        rows = {r["name"]: r for r in c.get("/api/runs").json()["runs"]}
        done = rows["done"]
        assert (done["task"], done["status"], done["metric"], done["step"]) == ("pretrain", "finished", "val_loss", 10)
        assert done["model"] == "GPT 2L x 32" and done["duration_s"] > 0 and done["best"] > 0
        detail = c.get("/api/run", params={"name": "done"}).json()
        assert {c["name"] for c in detail["checkpoints"]} >= {"last", "best"}
        assert "plots/loss.png" in detail["plots"] and "train:" in detail["config_text"]
        assert json.loads(json.dumps(detail))  # all JSON


def test_model_names_of_run_configs():
    from fromzero.ui.runs import _model_name

    assert _model_name({"model": {"init_from": "runs/shakespeare-char/checkpoints/best"}}) == "shakespeare-char:best"
    assert _model_name({"model": {"init_from": "smollm2-135m-instruct"}}) == "smollm2-135m-instruct"
    assert _model_name({"model": {"init_from": "", "arch": "simple"}}) == "simple"
    assert _model_name({"model": {"n_layer": 4, "n_embd": 128}}) == "GPT 4L x 128"
    assert _model_name({}) == "-"
