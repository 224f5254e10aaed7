"""``fromzero ui``: the web interface (runs, a run's live curves, compare, launch, chat)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fromzero.cli import _OWN_DEFAULT, _add_parser
from fromzero.errors import FromzeroError


def _add_ui(sub: argparse._SubParsersAction) -> None:
    p = _add_parser(
        sub, "ui", "a web interface: follow, compare, launch, stop and resume runs; chat with a model",
        func=_cmd_ui,
        description="Serves a web interface (FastAPI; works offline) and prints its URL. Pages: Runs (every run "
        "under --runs with its task, model, status, best metric, duration), a run (live loss / lr / validation "
        "curves, config, checkpoints, plots, test metrics), Compare (2-6 runs overlaid, config differences), "
        "Launch (a recipe from --recipes as a form; Stop sends SIGINT so the run saves; Resume), Chat (a chat "
        "checkpoint from the runs or --model, streamed replies), Playground (classify a text or an image, explain "
        "it, embed texts).\n"
        "Binds 127.0.0.1; another --host needs --token. Stopping the interface stops the runs it started "
        "(they save first).\n\n"
        "examples:\n  fromzero ui\n  fromzero ui --runs runs --recipes recipes --port 7860\n"
        "  fromzero ui --host 0.0.0.0 --token \"$(openssl rand -hex 16)\"",
    )
    p.add_argument("--runs", default="runs", help="folder of run directories to show (and where launched runs go)")
    p.add_argument("--recipes", default="recipes", help="folder of recipe YAML files the Launch page offers")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (not a loopback one: needs --token)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (0: any free port; the URL is printed)")
    p.add_argument("--token", default=None,
                   help="require this token on every request (default: $FROMZERO_UI_TOKEN, else none)" + _OWN_DEFAULT)
    p.add_argument("--model", action="append", default=[], metavar="CHECKPOINT",
                   help="a checkpoint (directory or built-in name) to offer besides the runs': a chat model on the "
                   "Chat page, a classifier or encoder on the Playground (repeatable)")
    p.add_argument("--device", default="auto", help="device of the chat and playground models: auto | cpu | cuda | mps")


def _cmd_ui(args: argparse.Namespace) -> int:
    from fromzero.models.builtin import resolve_model
    from fromzero.ui import UIConfig, run_ui

    token = args.token if args.token is not None else (os.environ.get("FROMZERO_UI_TOKEN") or None)
    recipes = Path(args.recipes)
    if args.recipes == "recipes" and not recipes.is_dir():
        recipes = None  # the default folder is optional; one given by name must exist
    models = {}
    for name in args.model:
        path = Path(resolve_model(name))
        if not (path / "config.json").is_file():
            raise FromzeroError(f"--model {name}: not a checkpoint directory (no config.json)")
        models[name] = path
    runs = Path(args.runs)
    config = UIConfig(runs=runs, recipes=recipes, host=args.host, port=args.port, token=token,
                      models=models, device=args.device)
    config.validate()
    if not runs.is_dir():
        if runs.exists():
            raise FromzeroError(f"--runs {runs} is not a folder")
        runs.mkdir(parents=True)
    return run_ui(config)


PARSERS = {"ui": _add_ui}
