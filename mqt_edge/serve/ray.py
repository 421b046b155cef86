"""Scale-out on Ray Serve (extra: `mqt-edge[ray]`): the same FastAPI app, one Pipeline per replica.

    mqt-edge serve --bundle B --ray --replicas 2                  # a local Ray instance
    ray start --head; mqt-edge serve --bundle B --ray --ray-address auto --replicas 4
    serve run mqt_edge.serve.ray:build bundle=/path/to/bundle replicas=2

Two deployments. The ingress (one light replica, no CPU reserved) reads each request's body, derives
its routing key (the `x-session-id` header, else a hash of the request's image) and calls the model
deployment through a DeploymentHandle with that key as Ray's session id. The model deployment's
request router (ray_router.AffinityRouter, a Ray RequestRouter) sends a key back to the replica it
went to before, where the conversation's session is cached, and to another replica when that one's
queue is full. Ray's proxy cannot route on the body itself: it hands a replica the ASGI scope only and
the body streams in after the replica is chosen.

Each model replica builds the app itself, so nothing native is pickled: its Pipeline, slots and session
cache live in that replica's process, with as many threads as the CPUs Ray reserved for it.
"""

import asyncio
import hashlib
import json
import logging
import os
import signal
import threading
import time

from ..errors import require
from .config import ServeConfig

MODEL, INGRESS = "mqt-edge", "mqt-edge-ingress"
REPLICA_HEADER = b"x-mqt-replica"
SESSION_HEADER = "x-session-id"  # Ray's default session header (RAY_SERVE_SESSION_ID_HEADER_KEY)
ROUTER = "mqt_edge.serve.ray_router.AffinityRouter"
MAX_KEY_CHARS = 256  # a longer x-session-id is hashed: it only has to tell sessions apart
SHUTDOWN_S = 20.0
_NO_CRASH_HANDLER = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"  # SIGTERM to exit: Serve's drain, then Ray's own shutdown, then a sweep

log = logging.getLogger("mqt_edge.serve")


def routing_key(headers: dict[str, str], body: bytes) -> str | None:
    """The key a conversation keeps across turns: the client's session id, else its first image's hash.

    Every turn of an OpenAI-style conversation resends the image, so the image's hash finds the replica
    that served the earlier turns with no header at all. None: no key (Ray then spreads the request).
    """
    sid = headers.get(SESSION_HEADER, "").strip()
    if sid:
        return "s:" + (sid if len(sid) <= MAX_KEY_CHARS else hashlib.sha256(sid.encode()).hexdigest())
    url = _first_image_url(body)
    return "i:" + hashlib.sha256(url.encode()).hexdigest()[:32] if url else None


def _first_image_url(body: bytes) -> str | None:
    try:
        messages = json.loads(body).get("messages")
    except (ValueError, AttributeError, RecursionError):  # the app answers the bad body; routing does not care
        return None
    for msg in messages if isinstance(messages, list) else ():
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else ():
            image = part.get("image_url") if isinstance(part, dict) else None
            url = image.get("url") if isinstance(image, dict) else image
            if isinstance(url, str) and url:
                return url
    return None


def replica_threads(cfg: ServeConfig, assigned_cpus: float) -> int:
    """llama.cpp threads per slot: the CPUs Ray reserved for this replica shared among its slots."""
    return cfg.threads or max(1, int(assigned_cpus) // cfg.parallel)


def _replica_logging() -> None:
    # A replica is a fresh worker process whose root logger has no handler: without one the start-up
    # line ("ready in ... m = ...") is dropped. Its stderr reaches the driver's console (log_to_driver).
    logger = logging.getLogger("mqt_edge")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_mqt", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._mqt = True
        logger.addHandler(handler)


class ModelReplica:
    """One Pipeline with its slots and session cache; the ingress calls `asgi` with a request's scope and body."""

    def __init__(self, cfg: ServeConfig) -> None:
        import ray

        from .app import create_app

        _replica_logging()
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.app = create_app(cfg.with_(threads=replica_threads(cfg, cpus)), load=False)
        self.engine = self.app.state.engine
        self.engine.start_loading()
        self._running: set[asyncio.Task] = set()
        self.name = str(os.getpid()).encode()  # as /health reports it

    def __del__(self) -> None:  # Ray calls it when the replica is stopped
        self.engine.close()

    async def asgi(self, scope: dict, body: bytes):
        """Run the app on one request, yielding its ASGI messages as they are sent."""
        out: asyncio.Queue = asyncio.Queue()
        gone, sent = asyncio.Event(), False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app polls for a disconnect: report one once the caller went away
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            if msg["type"] == "http.response.start":  # which replica answered: what routing is judged by
                msg = {**msg, "headers": [*msg.get("headers", ()), (REPLICA_HEADER, self.name)]}
            await out.put(msg)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                out.put_nowait(None)

        task = asyncio.create_task(run())
        self._running.add(task)  # the app finishes on its own (it cancels its generation on the disconnect)
        task.add_done_callback(self._running.discard)
        try:
            while (msg := await out.get()) is not None:
                yield msg
        finally:
            gone.set()


def _plain_scope(scope: dict) -> dict:
    """What the model replica's app needs of the ASGI scope, in plain picklable values."""
    keep = ("type", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
            "headers", "client", "server")
    out = {k: scope[k] for k in keep if k in scope}
    out["root_path"] = ""
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    out["asgi"] = {"version": "3.0"}
    return out


def _ingress_class(serve, limit: int):
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    class Relay(Response):
        """Sends the model replica's ASGI messages on as they come (status, headers, body chunks)."""

        def __init__(self, messages) -> None:  # noqa: the status and headers come in the messages
            self.messages, self.background = messages, None

        async def __call__(self, scope, receive, send) -> None:
            async for msg in self.messages:
                await send(msg)

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"]

    @serve.ingress(app)
    class Ingress:
        def __init__(self, model) -> None:
            self.model = model

        @app.api_route("/{path:path}", methods=methods, include_in_schema=False)
        async def forward(self, request: Request):
            body = bytearray()
            async for chunk in request.stream():  # limit + 1 is enough for the model's app to answer 413
                body += chunk
                if len(body) > limit:
                    break
            key = routing_key({k.lower(): v for k, v in request.headers.items()}, bytes(body))
            handle = self.model.options(stream=True, **({"session_id": key} if key else {}))
            return Relay(handle.asgi.remote(_plain_scope(request.scope), bytes(body)))

    return Ingress


def deployment(cfg: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0, affinity: bool = True):
    """A bound Ray Serve application: the ingress and `replicas` model replicas.

    affinity=False keeps Ray's default router (power of two choices) for comparison.
    """
    serve = require("ray.serve", "ray")
    from ray.serve.config import RequestRouterConfig

    router = {"request_router_config": RequestRouterConfig(request_router_class=ROUTER)} if affinity else {}
    per_replica = cfg.parallel + cfg.queue
    model = serve.deployment(ModelReplica, name=MODEL, num_replicas=replicas, max_ongoing_requests=per_replica,
                             ray_actor_options={"num_cpus": cpus_per_replica}, graceful_shutdown_timeout_s=10,
                             **router)
    ingress = serve.deployment(_ingress_class(serve, int(cfg.max_body_mb * 2**20)), name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4 * replicas * per_replica)
    return ingress.bind(model.bind(cfg))


def build(args: dict):
    """`serve run mqt_edge.serve.ray:build bundle=B [replicas=N] [cpus_per_replica=C] [ServeConfig field=value]`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1))
    return deployment(ServeConfig.from_args(args), replicas, cpus)


class _Stop(BaseException):
    """SIGTERM/SIGINT: leave whatever the main thread is doing (start-up included) and shut down."""


class _QuietReconnect(logging.Filter):
    # serve.run always goes through serve_start, which logs that the http_options serve.start just set
    # "will not be applied" although they are the ones in force; serve.run itself takes none.
    def filter(self, record: logging.LogRecord) -> bool:
        return "will not be applied" not in record.getMessage()


def run_on_ray(cfg: ServeConfig, replicas: int, address: str | None = None, cpus_per_replica: float = 1.0) -> None:
    """Start (or join) Ray, serve on cfg.host:cfg.port through Ray's proxy, until SIGTERM or Ctrl-C."""
    # Every replica's start-up line, not Ray's "[repeated 2x across cluster]" for identical ones
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray, serve = _import_ray()

    def stop(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    started_ray = False
    try:
        started_ray = not ray.is_initialized()
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
        for s in previous:  # ray.init puts its own on SIGTERM (sys.exit), which skips the sweep below
            signal.signal(s, stop)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        quiet = _QuietReconnect()
        logging.getLogger("ray.serve").addFilter(quiet)
        try:
            serve.run(deployment(cfg, replicas, cpus_per_replica), name="mqt-edge", route_prefix="/")
        finally:
            logging.getLogger("ray.serve").removeFilter(quiet)
        print(f"serving {cfg.model_id} on http://{cfg.host}:{cfg.port} with {replicas} Ray replicas "
              "(Ctrl-C or SIGTERM stops)", flush=True)
        while True:
            time.sleep(3600)
    except _Stop as why:
        print(f"{why}: stopping Ray Serve", flush=True)
    finally:
        for s in previous:  # a second signal during the bounded shutdown below is not an error
            signal.signal(s, signal.SIG_IGN)
        _shutdown(ray, serve, started_ray and address is None)
        for s, h in previous.items():
            signal.signal(s, h)


def _import_ray():
    # Ray's C++ failure handler, installed on SIGTERM by ray.init in this process, prints a stack and
    # re-raises the signal a moment later: the driver died mid-shutdown and left Ray's agents running.
    # Off for this process only (it is read at import); replicas keep their crash stacks.
    before = os.environ.get(_NO_CRASH_HANDLER)
    os.environ[_NO_CRASH_HANDLER] = "1"
    try:
        return require("ray", "ray"), require("ray.serve", "ray")
    finally:
        if before is None:
            os.environ.pop(_NO_CRASH_HANDLER, None)
        else:
            os.environ[_NO_CRASH_HANDLER] = before


def _shutdown(ray, serve, local: bool) -> None:
    """Serve's drain, then Ray's shutdown, then whatever Ray process of this session outlived both."""
    ours = _ray_descendants() if local else []
    deadline = time.monotonic() + SHUTDOWN_S
    drain = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
    drain.start()
    drain.join(timeout=SHUTDOWN_S / 2)  # in-flight requests get up to graceful_shutdown_timeout_s
    ray.shutdown()
    if ours:
        _reap(ours, deadline)


def _ray_descendants() -> list:
    # Ray's node processes fate-share with the raylet, but its agents (DashboardAgent, RuntimeEnvAgent)
    # only notice the raylet is gone when they next poll for it, which was 40-60 s after exit.
    import psutil  # Ray ships it (ray/thirdparty_files) and puts it on sys.path on import

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs: list, deadline: float) -> None:
    import psutil

    # most exit with the raylet at once; what is left after a short grace would linger for a minute
    _, alive = psutil.wait_procs(procs, timeout=min(3.0, max(0.0, deadline - time.monotonic())))
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=2)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if alive:
        log.warning("killed %d Ray processes that outlived ray.shutdown()", len(alive))
