"""The FastAPI app: OpenAI Chat Completions, models, health and metrics, over one Engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import MQTEdgeError
from ..prompt import check_question
from . import images, policy
from .config import ServeConfig
from .engine import Cancel, Engine
from .errors import APIError, from_library, internal
from .metrics import Metrics
from .openapi import CHAT, HEALTH, METRICS, MODEL, MODELS, publish
from .schema import Conversation, Envelope, Usage, conversation, parse_chat

log = logging.getLogger("mqt_edge.serve")
STATIC = Path(__file__).parent / "static"
# The page loads nothing from other hosts (it must work offline); the browser enforces that too.
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
DISCONNECT_POLL_S = 0.25
_END = object()


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit, by Content-Length or as they stream in."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"the request body is over the server's limit of {self.limit:,} bytes",
                           "request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _json(too_big.status, too_big.body(), {})(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_big
            return message

        await self.app(scope, counted, send)


def _json(status: int, body: dict, headers: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class _State:
    """What every route reads: the settings, the engine and its metrics."""

    cfg: ServeConfig
    engine: Engine
    metrics: Metrics


def create_app(cfg: ServeConfig, engine: Engine | None = None, load: bool = True) -> FastAPI:
    """The server as an ASGI app. load=False leaves starting the Engine to the caller (Ray's replicas)."""
    metrics = engine.metrics if engine else Metrics()
    engine = engine or Engine(cfg, metrics)
    state = _State(cfg, engine, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        if load:
            engine.start_loading()
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="mqt-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=int(cfg.max_body_mb * 2**20))
    _errors(app, metrics)
    publish(app, cfg.model_id, secured=cfg.key is not None)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", **HEALTH)
    async def health():
        return _health(state)

    @app.get("/metrics", **METRICS)
    async def metrics_endpoint(request: Request):
        _auth(state, request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", **MODELS)
    async def models(request: Request):
        _auth(state, request)
        metrics.requests.labels("models", "200").inc()
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}", **MODEL)
    async def model(request: Request):  # the name is read by hand: no FastAPI validation, no 422 of its shape
        _auth(state, request)
        name = request.path_params["name"]
        if name != cfg.model_id:
            raise APIError(404, f"the model {name!r} does not exist (this server has {cfg.model_id!r})",
                           "model_not_found", "model")
        return _model_card(state)

    @app.post("/v1/chat/completions", **CHAT)
    async def chat(request: Request):
        try:
            return await _chat(state, request)
        except (APIError, MQTEdgeError):
            raise
        except Exception as exc:  # a bug: converted here so that no middleware logs a traceback
            raise internal(exc, "/v1/chat/completions") from None

    return app


def _auth(state: _State, request: Request) -> None:
    key = state.cfg.key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    # compare_digest on bytes: constant time in the token's content
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "invalid_api_key")


def _health(state: _State):
    cfg, engine = state.cfg, state.engine
    try:
        engine.check_ready()
    except APIError as exc:
        return _json(503, {"status": "error" if engine.load_error else "loading", "detail": exc.message},
                     exc.headers())
    s, held = engine.start, engine.pipe.scheduler.stats()
    return {"status": "ok", "model": cfg.model_id, "pid": os.getpid(), "m": s.m, "profile": s.profile,
            "slots": cfg.parallel,
            "cache": {"budget_bytes": s.budget_bytes, "conversation_bytes": s.conversation_bytes,
                      "position_bytes": held.position_bytes, "context_positions": held.n_ctx,
                      "positions_used": held.cells_used, "in_context": held.resident, "on_host": held.parked,
                      "host_bytes": held.parked_bytes, "image_bytes": engine.pipe.scheduler.images.bytes,
                      "idle": engine.cache.idle, "dropped": held.drops, "forks": engine.cache.forks}}


def _model_card(state: _State) -> dict:
    cfg, engine = state.cfg, state.engine
    card = {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "mqt-edge"}
    if engine.ready.is_set():
        card["mqt"] = {"max_m": engine.pipe.max_tokens, "default_m": engine.start.m,
                       "profile": engine.start.profile}
    return card


async def _body(request: Request) -> bytes:
    try:
        return await request.body()
    except ClientDisconnect:  # the client's doing, not a bug: its own code in mqt_errors_total
        raise APIError(499, "the client closed the connection before its request body arrived; send the whole body",
                       "client_disconnected") from None


def _length_param(req) -> str:
    """The field a context overflow is the fault of: the length limit the request sent, else its messages."""
    if req.max_completion_tokens is not None:
        return "max_completion_tokens"
    return "max_tokens" if req.max_tokens is not None else "messages"


async def _chat(state: _State, request: Request):
    cfg, engine, metrics = state.cfg, state.engine, state.metrics
    arrived = time.monotonic()
    _auth(state, request)
    req = parse_chat(await _body(request))
    if req.model != cfg.model_id:
        raise APIError(404, f"the model {req.model!r} does not exist (this server has {cfg.model_id!r})",
                       "model_not_found", "model")
    conv = conversation(req)
    engine.check_ready()
    length_param = _length_param(req)
    try:
        ask = await _ask(engine, cfg, req, conv)
        env = Envelope(cfg.model_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await _stream(engine, metrics, ask, env, request, arrived, include_usage, length_param)
        return await _complete(engine, metrics, ask, env, request, arrived)
    except MQTEdgeError as exc:
        raise from_library(exc, length_param=length_param) from None


async def _ask(engine: Engine, cfg: ServeConfig, req, conv: Conversation) -> policy.Ask:
    pipe = engine.pipe
    for q, _ in conv.turns:
        check_question(q)
    check_question(conv.question)
    img = await asyncio.to_thread(_fetch_checked, conv.image_url, cfg, pipe.max_pixels)
    opts = req.mqt
    m = pipe.check_tokens(opts.m if opts and opts.m else engine.start.m)
    refine = pipe.check_tokens(opts.refine) if opts and opts.refine else None
    if refine is not None and refine <= m:
        raise APIError(422, f"mqt.refine {refine} is not above the m of {m}", "invalid_m", "mqt.refine")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    # Any 64-bit seed: folded into the 0..2**63-1 the library's generator takes (-1 and 2**63-1 sample alike)
    seed = req.seed % 2**63 if req.seed is not None else secrets.randbits(31)
    return policy.Ask(image=img.sha256, load_image=lambda: img.data,
                      turns=conv.turns, question=conv.question, m=m, refine=refine,
                      confidence=opts.confidence if opts else 0.5,
                      max_new_tokens=req.max_completion_tokens or req.max_tokens,
                      temperature=cfg.temperature if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p, seed=seed, stop=stops)


def _fetch_checked(url: str, cfg: ServeConfig, max_pixels: int) -> images.ImageBytes:
    img = images.fetch(url, cfg.media_dir, cfg.allow_remote_images, cfg.remote_timeout_s,
                       int(cfg.max_body_mb * 2**20))
    images.check_image(img, max_pixels)  # refuse bad or too large images before they wait for a slot
    return img


def _usage(out: policy.Outcome) -> Usage:
    return Usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)


def _finished(metrics: Metrics, out: policy.Outcome, arrived: float, first: list) -> None:
    metrics.total.observe(time.monotonic() - arrived)
    if first:
        metrics.ttft.observe(first[0] - arrived)
    if out.info:
        metrics.observe_answer(out.info)


def _cancelled_error(cancel: Cancel, cfg: ServeConfig) -> APIError:
    return APIError(504, f"the request ran past the server's {cfg.timeout_s:g} s timeout", "timeout")


async def _complete(engine, metrics, ask, env, request: Request, arrived: float):
    cancel, first = Cancel(), []
    fut = await engine.submit(ask, lambda _p: first or first.append(time.monotonic()), cancel,
                              arrived + engine.cfg.timeout_s)
    while not fut.done():
        await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
        if not fut.done() and await request.is_disconnected():
            cancel.set("disconnect")
    out = fut.result()
    if out.finish == "cancelled":
        metrics.cancelled.labels(cancel.reason or "disconnect").inc()
        if cancel.reason == "timeout":
            raise _cancelled_error(cancel, engine.cfg)
        return Response(status_code=499)  # nobody is listening
    _finished(metrics, out, arrived, first)
    metrics.requests.labels("chat", "200").inc()
    return env.completion(out.text, out.finish, _usage(out), out.info)


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(engine, metrics, ask, env, request: Request, arrived: float, include_usage: bool,
                  length_param: str):
    loop, queue, cancel, first = asyncio.get_running_loop(), asyncio.Queue(), Cancel(), []

    def emit(piece: str) -> None:  # on the slot thread
        if not first:
            first.append(time.monotonic())
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    fut = await engine.submit(ask, emit, cancel, arrived + engine.cfg.timeout_s)
    fut.add_done_callback(lambda _f: queue.put_nowait(_END))
    head = await queue.get()  # the first piece, or the end: errors before it are plain HTTP errors
    if head is _END and fut.exception() is not None:
        raise fut.exception()

    async def body():
        item, done = head, False
        try:
            yield _sse(env.chunk({"role": "assistant", "content": ""}))
            while item is not _END:
                if item:  # "" marks the first token, before any text (the role chunk above)
                    yield _sse(env.chunk({"content": item}))
                item = await queue.get()
            done = True
            try:
                out = fut.result()
            except (APIError, MQTEdgeError) as exc:
                err = exc if isinstance(exc, APIError) else from_library(exc, length_param=length_param)
                yield _sse(err.body())
                yield b"data: [DONE]\n\n"
                return
            except Exception as exc:  # a bug: one line in the log, a bland error to the client
                yield _sse(internal(exc, "stream").body())
                yield b"data: [DONE]\n\n"
                return
            if out.finish == "cancelled":
                metrics.cancelled.labels(cancel.reason or "disconnect").inc()
                yield _sse(_cancelled_error(cancel, engine.cfg).body())
            else:
                _finished(metrics, out, arrived, first)
                metrics.requests.labels("chat_stream", "200").inc()
                extra = {"usage": None} if include_usage else {}
                yield _sse(env.chunk({}, out.finish, mqt=out.info, **extra))
                if include_usage:
                    yield _sse(env.usage_chunk(_usage(out), out.info))
            yield b"data: [DONE]\n\n"
        finally:
            if not done:  # the client went away mid-stream: stop generating, free the slot
                cancel.set("disconnect")
                if not fut.done():
                    metrics.cancelled.labels("disconnect").inc()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _errors(app: FastAPI, metrics: Metrics) -> None:
    def reply(err: APIError) -> JSONResponse:
        metrics.errors.labels(err.code or str(err.status)).inc()
        metrics.requests.labels("any", str(err.status)).inc()
        return _json(err.status, err.body(), err.headers())

    @app.exception_handler(APIError)
    async def api_error(_r, exc: APIError):
        if exc.status >= 500:
            log.warning("%d %s: %s", exc.status, exc.code, exc.message)
        return reply(exc)

    @app.exception_handler(MQTEdgeError)
    async def library_error(_r, exc: MQTEdgeError):
        return reply(from_library(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # RFC 9110: a 405 lists the methods the path takes (Starlette puts them in the exception's Allow)
        headers = dict(exc.headers or {})
        message = str(exc.detail)
        if exc.status_code == 405 and "Allow" in headers:
            message = f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
        elif exc.status_code == 404:
            message = f"no route {request.url.path}; the routes are in /openapi.json"
        return reply(APIError(exc.status_code, message, code, extra_headers=headers))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return reply(internal(exc, request.url.path))
