"""``fromzero serve``: an OpenAI-compatible HTTP API over one checkpoint.

* :mod:`fromzero.serving.app` -- the FastAPI app (routes, limits, errors, streaming) and
  :func:`run_server` (uvicorn, graceful SIGTERM);
* :mod:`fromzero.serving.engine` -- the scheduler: a bounded queue and one worker thread that
  decodes every running request as one batch (continuous batching over a ragged KV cache);
* :mod:`fromzero.serving.backends` -- loading a checkpoint: GPT (completions, chat for SFT
  checkpoints), BERT encoder (embeddings), text classifier (classify);
* :mod:`fromzero.serving.schemas` -- the request bodies (pydantic), in OpenAI's shapes;
* :mod:`fromzero.serving.metrics` -- the Prometheus metrics of GET /metrics.

Try it::

    fromzero serve --checkpoint runs/latest/checkpoints/best --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}'

or with the official client: ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")``.
"""

from fromzero.serving.app import APIError, ServeConfig, create_app, run_server

__all__ = ["APIError", "ServeConfig", "create_app", "run_server"]
