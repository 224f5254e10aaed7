"""``fromzero ui``: one FastAPI process serving the pages (plain HTML/JS/CSS from ``static/``, no
build step, uPlot vendored for the charts) and the JSON API they call.

Pages (one page app, ``#/...`` routes): Runs, Run (live curves by polling metrics.jsonl from a
byte offset), Compare, Launch, Chat. API under ``/api``; run files under ``/files/RUN/PATH``.

Security: the server binds 127.0.0.1 unless told otherwise, and refuses another address without a
token. With a token every request must carry it (``Authorization: Bearer T``, or the cookie set by
opening ``/?token=T`` once); without one, only requests whose Host is a loopback name are served
(a web page elsewhere cannot reach the interface through DNS rebinding). Requests that change
anything (POST) need the ``X-Fromzero: 1`` header, which a cross-site form cannot send. Files are
served only from inside the runs folder (symlinks followed, then checked) with an allowed suffix;
anything else is 404.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from fromzero.errors import FromzeroError
from fromzero.ui.chat import ChatModels, chat_checkpoints
from fromzero.ui.launch import Launcher, recipe_form
from fromzero.ui.playground import Playground, decode_image, playground_models
from fromzero.ui.runs import SERVABLE, config_diff, inside, read_metrics, run_detail, run_dir_of, run_table

STATIC = Path(__file__).parent / "static"
COOKIE = "fromzero_ui_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass
class UIConfig:
    """Options of ``fromzero ui``: each is the command-line flag of the same name."""

    runs: Path = Path("runs")
    recipes: Path | None = Path("recipes")
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    models: dict[str, Path] = field(default_factory=dict)  # name -> checkpoint directory (--model)
    device: str = "auto"  # of the chat and playground models

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FromzeroError(f"--port must be in 0..65535, got {self.port}")
        if self.token is not None and len(self.token) < 8:
            raise FromzeroError("--token must be at least 8 characters")
        if not is_loopback(self.host) and not self.token:
            raise FromzeroError(f"--host {self.host} is reachable from other machines: the interface can start "
                                "training runs, so it needs --token T there (or keep the default 127.0.0.1)")
        if self.recipes is not None and not self.recipes.is_dir():
            raise FromzeroError(f"recipes folder not found: {self.recipes} (pass --recipes DIR)")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Guard:
    """Token / Host / POST-header checks before any route (see the module docstring)."""

    def __init__(self, app: Any, config: UIConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        token = self.config.token
        if token:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() \
                or request.cookies.get(COOKIE, "") or request.query_params.get("token", "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return await JSONResponse({"error": "a token is needed: open the URL printed by fromzero ui "
                                                    "(…/?token=T)"}, 401)(scope, receive, send)
        else:
            host = _host_name(request.headers.get("host", ""))
            if host not in LOOPBACK_NAMES:
                return await JSONResponse({"error": f"host {host!r} refused: without --token the interface "
                                                    "answers loopback names only"}, 403)(scope, receive, send)
        if request.method not in ("GET", "HEAD") and request.headers.get("x-fromzero") != "1":
            return await JSONResponse({"error": "missing X-Fromzero header"}, 403)(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def create_app(config: UIConfig) -> FastAPI:
    config.validate()
    runs_root = Path(config.runs)
    launcher = Launcher(runs_root, config.recipes)
    chat = ChatModels(config.device)
    playground = Playground(config.device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, launcher.shutdown)
            chat.close()

    app = FastAPI(title="fromzero ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.launcher, app.state.chat = config, launcher, chat
    app.add_middleware(_Guard, config=config)

    @app.exception_handler(FromzeroError)
    async def bad_input(request: Request, exc: FromzeroError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/")
    async def index(request: Request) -> Response:
        if config.token and request.query_params.get("token"):  # the printed URL: remember it, then drop it
            response: Response = RedirectResponse("/", 303)
            response.set_cookie(COOKIE, config.token, httponly=True, samesite="strict")
            return response
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- runs -------------------------------------------------------------------------------
    @app.get("/api/runs")
    async def runs() -> Any:
        return {"root": str(runs_root), "runs": run_table(runs_root)}

    @app.get("/api/run")
    async def run(name: str) -> Any:
        detail = run_detail(runs_root, name)
        if detail is None:
            return _error(404, f"no run {name!r} under {runs_root}")
        job = launcher.job_of_run(name)
        detail["job"] = job.info() if job else None
        return detail

    @app.get("/api/metrics")
    async def metrics(name: str, offset: int = 0) -> Any:
        run_dir = run_dir_of(runs_root, name)
        if run_dir is None:
            return _error(404, f"no run {name!r}")
        rows, offset = read_metrics(run_dir, offset)
        return {"rows": rows, "offset": offset}

    @app.get("/api/compare")
    async def compare(names: str) -> Any:
        wanted = [n for n in names.split(",") if n]
        if not 2 <= len(wanted) <= 6:
            return _error(400, "compare takes 2 to 6 runs")
        details = {}
        for name in wanted:
            detail = run_detail(runs_root, name)
            if detail is None:
                return _error(404, f"no run {name!r}")
            details[name] = detail
        return {"runs": [{k: d[k] for k in ("name", "task", "status", "metric", "best", "model")} for d in details.values()],
                "diff": config_diff({n: d["config"] for n, d in details.items()})}

    @app.get("/files/{path:path}")
    async def files(path: str) -> Response:
        target = inside(runs_root, path)
        if target is None or target.suffix.lower() not in SERVABLE:
            return _error(404, "not found")
        return FileResponse(target, media_type=SERVABLE[target.suffix.lower()])

    # -- launch -----------------------------------------------------------------------------
    @app.get("/api/recipes")
    async def recipes() -> Any:
        return {"root": str(config.recipes) if config.recipes else None,
                "recipes": [p.name for p in launcher.recipes()]}

    @app.get("/api/recipe")
    async def recipe(name: str) -> Any:
        if name not in {p.name for p in launcher.recipes()}:
            return _error(404, f"no recipe {name!r}")
        return recipe_form(launcher.recipe_path(name))

    @app.post("/api/launch")
    async def launch(request: Request) -> Any:
        body = await _json(request)
        values = body.get("values") or {}
        if not isinstance(values, dict) or not isinstance(body.get("recipe"), str):
            return _error(400, "launch takes {recipe: NAME, values: {key: value}}")
        return launcher.launch(body["recipe"], values).info()

    @app.post("/api/resume")
    async def resume(request: Request) -> Any:
        body = await _json(request)
        name = str(body.get("run", ""))
        detail = run_detail(runs_root, name)
        if detail is None:
            return _error(404, f"no run {name!r}")
        if detail["status"] in ("running", "finished"):
            return _error(400, f"run {name} is {detail['status']}: nothing to resume")
        return launcher.resume(name, runs_root / name, detail["task"]).info()

    @app.post("/api/stop")
    async def stop(request: Request) -> Any:
        body = await _json(request)
        return launcher.stop(str(body.get("job", ""))).info()

    @app.get("/api/jobs")
    async def jobs() -> Any:
        return {"jobs": [j.info() for j in launcher.jobs.values()]}

    # -- chat -------------------------------------------------------------------------------
    def checkpoints() -> dict[str, Path]:
        return chat_checkpoints(runs_root, config.models)

    @app.get("/api/chat/models")
    async def chat_models() -> Any:
        return {"models": list(checkpoints()), "loaded": chat.name}

    async def loaded(body: dict) -> Any:
        import asyncio

        name = str(body.get("model", ""))
        found = checkpoints()
        if name not in found:
            raise FromzeroError(f"no chat model {name!r}")
        return await asyncio.get_running_loop().run_in_executor(None, chat.load, name, found[name])

    def messages_of(body: dict) -> list[dict]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     and m.get("role") in ("system", "user", "assistant")
                                                     for m in messages):
            raise FromzeroError("messages must be a list of {role: system|user|assistant, content: text}")
        return [{"role": m["role"], "content": m["content"]} for m in messages if m["content"] or m["role"] != "system"]

    @app.post("/api/chat/load")
    async def chat_load(request: Request) -> Any:
        backend = await loaded(await _json(request))
        return {"model": chat.name, "description": backend.description, "context": backend.block_size}

    @app.post("/api/chat/prompt")
    async def chat_prompt(request: Request) -> Any:
        body = await _json(request)
        await loaded(body)
        return {"prompt": chat.prompt(messages_of(body))}

    @app.post("/api/chat")
    async def chat_reply(request: Request) -> Any:
        body = await _json(request)
        await loaded(body)
        messages = messages_of(body)
        try:
            temperature = float(body.get("temperature", 0.8))
            top_p = float(body.get("top_p", 1.0))
            max_tokens = int(body.get("max_tokens", 128))
        except (TypeError, ValueError):
            raise FromzeroError("temperature, top_p and max_tokens must be numbers") from None
        if not (0 <= temperature <= 5 and 0 < top_p <= 1 and max_tokens >= 1):
            raise FromzeroError("need 0 <= temperature <= 5, 0 < top_p <= 1, max_tokens >= 1")
        events = chat.reply(messages, temperature, top_p, max_tokens)
        first = await events.__anext__()  # errors before the stream starts are plain 400s

        async def stream() -> AsyncIterator[str]:
            yield f"data: {json.dumps(first)}\n\n"
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # -- playground -------------------------------------------------------------------------
    @app.get("/api/playground/models")
    async def playground_list() -> Any:
        return {"models": [{"name": n, "kind": k} for n, (_, k) in playground_models(runs_root, config.models).items()]}

    @app.post("/api/playground/{action}")
    async def playground_run(action: str, request: Request) -> Any:
        import asyncio

        body = await _json(request)
        found = playground_models(runs_root, config.models)
        name = str(body.get("model", ""))
        if name not in found:
            raise FromzeroError(f"no playground model {name!r}")
        directory, kind = found[name]
        text = body.get("text")
        if text is not None and not isinstance(text, str):
            raise FromzeroError("text must be a string")
        image = decode_image(body["image"]) if isinstance(body.get("image"), str) else None
        run = asyncio.get_running_loop().run_in_executor
        if action == "embed":
            if kind != "encoder":
                raise FromzeroError(f"{name} is a {kind}, not an encoder")
            texts = body.get("texts")
            if not (isinstance(texts, list) and 1 <= len(texts) <= 8 and all(isinstance(t, str) and t for t in texts)):
                raise FromzeroError("texts must be 1 to 8 non-empty strings")
            return await run(None, playground.embed, directory, texts)
        if action not in ("classify", "explain"):
            return _error(404, f"no playground action {action!r}")
        if kind == "encoder":
            raise FromzeroError(f"{name} is an encoder: it embeds texts, it does not classify them")
        if (kind == "image-classifier") != (image is not None):
            raise FromzeroError(f"{name} is a {kind}: give it {'an image' if kind == 'image-classifier' else 'a text'}")
        fn = playground.classify if action == "classify" else playground.explain
        return await run(None, fn, name, directory, text, image)

    return app


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise FromzeroError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise FromzeroError("the request body must be a JSON object")
    return body


def run_ui(config: UIConfig) -> int:
    """Serve until Ctrl-C / SIGTERM; the runs started from the page are stopped (SIGINT: they save)."""
    import uvicorn

    from fromzero.serving.app import _listen

    app = create_app(config)
    sock = _listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={config.token}" if config.token else "")
    print(f"fromzero ui: runs in {config.runs}, recipes in {config.recipes or '-'}; open {url}",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])
    return 0
