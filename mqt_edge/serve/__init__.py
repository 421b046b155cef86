"""`mqt-edge serve`: an OpenAI-compatible HTTP server over the Pipeline (extra: `mqt-edge[serve]`).

    from mqt_edge.serve import ServeConfig, create_app, run_server
    run_server(ServeConfig(bundle="mqt-edge-bundle", port=8080))

Nothing here imports torch or transformers. docs/serve.md describes the design.
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run_server"]


def create_app(cfg: ServeConfig, **kw):
    from ..errors import require

    require("fastapi", "serve")
    require("prometheus_client", "serve")
    from .app import create_app as make

    return make(cfg, **kw)


def run_server(cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve on cfg.host:cfg.port with uvicorn until interrupted."""
    import logging

    from ..errors import require

    uvicorn = require("uvicorn", "serve")
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level, timeout_graceful_shutdown=5)
