"""The ``fromzero`` command: one subcommand per verb, each a thin layer over the package.

Exit codes: 0 success; 2 bad input, reported as one line ``error: ...`` on stderr (add
``--debug`` for the traceback); 130 interrupted.

One module per group of verbs (data, train, generate, predict, retrieval, serve, models); each adds its
verbs' parsers (``PARSERS``) and holds their handlers (``_cmd_<verb>``), which parse, call a
library function and print. This module holds what they share: the parser and help formatter,
:func:`build_parser` and :func:`main` (error handling). Heavy libraries (torch, transformers,
numpy) are imported inside the handlers only, so that ``fromzero --help`` starts without them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from fromzero import __version__
from fromzero.errors import FromzeroError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (exit 2) like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise FromzeroError(f"{self.prog}: {message} (see {self.prog} --help)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults after every option and keep the hand-written layout of descriptions.

    A help text that already says "(default: ...)" in words keeps its own wording: no second,
    machine-made "(default: None)" after it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or "%(default)" in text:
            return text
        return super()._get_help_string(action)


# Appended to a help text that states its default in words: formats to nothing, and stops the
# formatter from adding "(default: None)" after it.
_OWN_DEFAULT = "%(default).0s"


def _add_parser(sub: argparse._SubParsersAction, name: str, help: str, description: str = "",
                epilog: str | None = None, func: Callable | None = None,
                **defaults: Any) -> argparse.ArgumentParser:
    """A verb's parser; ``func`` (its handler) and ``defaults`` go into the parsed arguments."""
    parser = sub.add_parser(name, help=help, description=description or help, epilog=epilog,
                            formatter_class=_Formatter)
    if func is not None:
        parser.set_defaults(func=func, **defaults)
    return parser


# The verbs in the order `fromzero --help` lists them (a module's verbs need not be adjacent).
HELP_ORDER = ("data", "tokenizer", "pretrain", "generate", "generate-image", "chat", "convert", "embed", "finetune",
              "crossval", "distill", "tune", "runs", "evaluate", "predict", "translate", "index", "ask", "explain",
              "serve", "merge-lora", "export", "prune", "quantize", "ui")


def build_parser(with_pretrain_help: bool = True, with_finetune_help: bool = True) -> argparse.ArgumentParser:
    # The verb modules import the parser classes above from this package: import them once it is loaded.
    from fromzero.cli import data, generate, models, predict, retrieval, serve, train, ui

    parser = _Parser(
        prog="fromzero",
        description="Develop large neural models from zero: prepare data, train tokenizers, "
        "pretrain GPTs, generate text, fine-tune, evaluate and predict.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"fromzero {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    adders = {**data.PARSERS, **generate.PARSERS, **models.PARSERS, **predict.PARSERS, **retrieval.PARSERS,
              **serve.PARSERS, **ui.PARSERS,
              **train.parsers(with_pretrain_help, with_finetune_help)}
    for verb in HELP_ORDER:
        adders[verb](sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(with_pretrain_help="pretrain" in argv,
                          with_finetune_help="finetune" in argv or "crossval" in argv)
    # --debug (a traceback instead of the one-line error) works before or after the verb.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        args, extra = parser.parse_known_args(argv)
        if not getattr(args, "func", None):
            # A group without an action (``fromzero data``) or no command: show help.
            sub_help = {"data": "data", "tokenizer": "tokenizer"}.get(getattr(args, "command", None) or "")
            parser.parse_args([sub_help, "--help"] if sub_help else ["--help"])
            return 2
        if getattr(args, "takes_overrides", False):
            return args.func(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if getattr(args, "checkpoint", None):  # a built-in model name or a .gguf file works too
            from fromzero.models.builtin import resolve_model

            args.checkpoint = str(resolve_model(args.checkpoint))
        return args.func(args)
    except FromzeroError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

