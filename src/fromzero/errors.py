"""The one exception type that means "the user gave us something we cannot use".

Anything raised as :class:`FromzeroError` is reported by the CLI as a single line
``error: <message>`` on stderr with exit code 2 (no traceback unless ``--debug``).
Everything else is a bug in fromzero and keeps its traceback.
"""

from __future__ import annotations


class FromzeroError(Exception):
    """Bad input: a missing or corrupt file, an invalid config, an impossible shape, ..."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): the part of
    a library's error worth putting in a one-line ``error:``."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
