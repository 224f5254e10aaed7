"""``fromzero serve``: an OpenAI-compatible HTTP API over one checkpoint.

:mod:`~fromzero.serving.app` (routes, limits, errors, streaming; :func:`run_server`),
:mod:`~fromzero.serving.engine` (continuous batching on one worker thread),
:mod:`~fromzero.serving.backends` (loading a checkpoint), :mod:`~fromzero.serving.schemas`
(request bodies) and :mod:`~fromzero.serving.metrics` (GET /metrics). Any OpenAI client works:
``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")``.
"""

from fromzero.serving.app import APIError, ServeConfig, create_app, run_server

__all__ = ["APIError", "ServeConfig", "create_app", "run_server"]
