"""Launching runs from the web interface: a recipe's form, and training subprocesses.

:func:`recipe_form` lists every key of a recipe's config dataclass (pretraining's nested
``PretrainConfig``, or a fine-tuning task's flat config with its ``RECIPE_KEYS``) with its type,
built-in default, the recipe's value and the docstring that ``--help`` shows. :class:`Launcher`
starts ``python -m fromzero pretrain|finetune --config RECIPE --out_dir RUN --key=value ...`` as
an argument list (never a shell string) built from that schema: only known keys, values checked
against their types. Stop sends SIGINT, which makes the training loop save ``checkpoints/last``
and exit; Resume runs ``--resume RUN``.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import typing
from pathlib import Path
from typing import Any

from fromzero.errors import FromzeroError

# Keys the form does not offer: the interface chooses the run directory and never overwrites one.
RESERVED = {"out_dir", "force", "name", "progress"}
LOG_LINES = 400  # lines of a job's output kept for the page


def _kind(tp: Any) -> tuple[str, bool]:
    """(bool | int | float | str | list | dict | other, optional) of a type hint."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "str", optional
    if tp in (bool, int, float, str):
        return tp.__name__, optional
    if origin in (list, tuple) or tp in (list, tuple):
        return "list", optional
    if origin is dict or tp is dict:
        return "dict", optional
    return "str", optional


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _leaves(cls: type, instance: Any, prefix: str, keys: dict[str, str] | None) -> list[dict[str, Any]]:
    from fromzero.config import field_docs

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    unused = getattr(cls, "UNUSED_KEYS", frozenset())
    out = []
    for f in dataclasses.fields(cls):
        if f.name in unused:
            continue
        default = getattr(instance, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, default, prefix + f.name + ".", None)
            continue
        key = prefix + (keys.get(f.name, f.name) if keys else f.name)
        kind, optional = _kind(tp)
        out.append({"key": key, "field": prefix + f.name, "type": kind, "optional": optional,
                    "default": _jsonable(default), "doc": docs.get(f.name, "")})
    return out


def _lookup(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def recipe_form(path: Path) -> dict[str, Any]:
    """The form of recipe ``path``: its task, the command it runs and every key (see module doc)."""
    from fromzero.config import PretrainConfig, load_yaml, recipe_keys
    from fromzero.finetune.recipe import task_config_class

    data = load_yaml(path)
    task = str(data.get("task") or "")
    if task in ("", "pretrain"):
        verb, fields = "pretrain", _leaves(PretrainConfig, PretrainConfig(), "", None)
    else:
        cls = task_config_class(task)
        verb, fields = "finetune", _leaves(cls, cls(), "", recipe_keys(cls))
    for f in fields:
        found, value = _lookup(data, f["key"])
        if not found and "." in f["key"]:  # the old flat recipe shape: the bare field name
            found, value = _lookup(data, f["key"].rpartition(".")[2])
        f["value"] = _jsonable(value) if found else f["default"]
        f["in_recipe"] = found
    from fromzero.options import RECIPE_ORDER

    order = {name: i for i, name in enumerate(RECIPE_ORDER)}
    fields = sorted((f for f in fields if f["key"] not in RESERVED),  # grouped by section, as --help lists them
                    key=lambda f: order.get(f["key"].partition(".")[0], len(order)) if "." in f["key"] else len(order) + 1)
    return {"recipe": path.name, "task": task or "pretrain", "verb": verb, "fields": fields,
            "text": path.read_text(encoding="utf-8")}


def _check_value(field: dict[str, Any], value: Any) -> str:
    """``value`` as the text of a ``--key=value`` override, after checking it has the field's type."""
    key, kind = field["key"], field["type"]
    if value is None:
        if field["optional"]:
            return "null"
        raise FromzeroError(f"{key}: a value is required")
    if kind == "bool":
        if isinstance(value, bool):
            return "true" if value else "false"
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return repr(float(value))
    elif kind in ("list", "dict"):
        if isinstance(value, list if kind == "list" else dict):
            return json.dumps(value)
    elif isinstance(value, str):
        if any(c in value for c in "\x00\r\n"):
            raise FromzeroError(f"{key}: the value must be one line of text")
        return value
    raise FromzeroError(f"{key}: expected {kind}, got {json.dumps(value)[:60]}")


def override_args(form: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """``--key=value`` for each changed key (unknown or reserved keys are refused)."""
    by_key = {f["key"]: f for f in form["fields"]}
    args = []
    for key, value in values.items():
        if key not in by_key:
            raise FromzeroError(f"unknown recipe key {key!r} for {form['recipe']}")
        if value == by_key[key]["value"]:
            continue
        args.append(f"--{key}={_check_value(by_key[key], value)}")
    return args


@dataclasses.dataclass
class Job:
    """One training subprocess started by the interface."""

    id: str
    run: str  # the run's name under the runs folder
    argv: list[str]
    process: subprocess.Popen
    started: float
    log: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LOG_LINES))
    stopping: bool = False

    def info(self) -> dict[str, Any]:
        code = self.process.poll()
        state = "running" if code is None else ("stopped" if code == 130 or self.stopping else
                                                "finished" if code == 0 else "failed")
        return {"id": self.id, "run": self.run, "argv": self.argv, "pid": self.process.pid, "state": state,
                "returncode": code, "started": self.started, "log": list(self.log)}


class Launcher:
    """The training subprocesses of one interface: start, follow, stop (SIGINT), resume."""

    def __init__(self, runs_root: Path, recipes_root: Path | None, python: str = sys.executable) -> None:
        self.runs_root = runs_root
        self.recipes_root = recipes_root
        self.python = python
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _start(self, run: str, argv: list[str]) -> Job:
        with self._lock:
            for job in self.jobs.values():
                if job.run == run and job.process.poll() is None:
                    raise FromzeroError(f"run {run} is already being trained (job {job.id})")
            env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1")
            # Its own session: Ctrl-C in the terminal of the interface does not reach it (the
            # interface stops its jobs itself, with SIGINT, when it exits).
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
            job = Job(str(next(self._ids)), run, argv, process, time.time())
            self.jobs[job.id] = job
        threading.Thread(target=self._follow, args=(job,), daemon=True, name=f"fromzero-ui-job-{job.id}").start()
        return job

    @staticmethod
    def _follow(job: Job) -> None:
        assert job.process.stdout is not None
        for raw in job.process.stdout:
            job.log.append(raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1])
        job.process.wait()

    def launch(self, recipe: str, values: dict[str, Any]) -> Job:
        """Start recipe ``recipe`` (a file name in the recipes folder) with ``values`` changed."""
        if self.recipes_root is None:
            raise FromzeroError("no recipes folder: start fromzero ui with --recipes DIR")
        path = self.recipe_path(recipe)
        form = recipe_form(path)
        overrides = override_args(form, values)
        run = f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        while (self.runs_root / run).exists():
            run += "-1"
        argv = [self.python, "-m", "fromzero", form["verb"], "--config", str(path),
                f"--out_dir={self.runs_root / run}", "--quiet", *overrides]
        return self._start(run, argv)

    def recipe_path(self, name: str) -> Path:
        if self.recipes_root is None:
            raise FromzeroError("no recipes folder")
        names = {p.name: p for p in self.recipes()}
        if name not in names:
            raise FromzeroError(f"no recipe {name!r} in {self.recipes_root}")
        return names[name]

    def recipes(self) -> list[Path]:
        if self.recipes_root is None or not self.recipes_root.is_dir():
            return []
        root = self.recipes_root.resolve()
        # A link leading out of the recipes folder is not offered (nor read: recipe_path checks this list).
        return sorted(p for p in self.recipes_root.glob("*.yaml") if p.is_file() and p.resolve().is_relative_to(root))

    def resume(self, run: str, run_dir: Path, task: str) -> Job:
        """Continue stopped run ``run`` (its directory ``run_dir``) from its checkpoints/last."""
        if not (run_dir / "checkpoints" / "last").is_dir():
            raise FromzeroError(f"run {run} has no checkpoints/last to resume from")
        verb = "pretrain" if task == "pretrain" else "finetune"
        return self._start(run, [self.python, "-m", "fromzero", verb, "--resume", str(run_dir), "--quiet"])

    def stop(self, job_id: str) -> Job:
        """SIGINT: the training loop saves checkpoints/last and exits (exit code 130)."""
        job = self.jobs.get(job_id)
        if job is None:
            raise FromzeroError(f"no job {job_id}")
        if job.process.poll() is None:
            job.stopping = True
            job.process.send_signal(signal.SIGINT)
        return job

    def job_of_run(self, run: str) -> Job | None:
        found = [j for j in self.jobs.values() if j.run == run]
        return found[-1] if found else None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop (SIGINT, so they save) every job still running, and wait for them."""
        running = [j for j in self.jobs.values() if j.process.poll() is None]
        for job in running:
            job.stopping = True
            job.process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout
        for job in running:
            try:
                job.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                job.process.kill()
                job.process.wait()
