"""Scale-out on Ray Serve (extra: `mqt-edge[ray]`): the same FastAPI app, one Pipeline per replica.

    mqt-edge serve --bundle B --ray --replicas 2                  # a local Ray instance
    ray start --head; mqt-edge serve --bundle B --ray --ray-address auto --replicas 4
    serve run mqt_edge.serve.ray:build bundle=/path/to/bundle replicas=2

Each replica builds the app itself (`serve.ingress` with a builder), so nothing native is pickled:
its Pipeline, slots and session cache live in that replica's process. Ray's proxy spreads requests
over replicas; a conversation's follow-up may land on another replica, which then encodes the image
again (a cache miss, not an error), so `--replicas` trades cache hits for throughput.
"""

from __future__ import annotations

import time

from ..errors import require
from .config import ServeConfig


def deployment(cfg: ServeConfig, replicas: int = 1, cpus_per_replica: float = 1.0):
    """A bound Ray Serve application of the server with `replicas` replicas."""
    serve = require("ray.serve", "ray")

    def build_app():
        from .app import create_app

        return create_app(cfg)  # its lifespan loads the Pipeline in this replica

    @serve.deployment(name="mqt-edge", num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=cfg.parallel + cfg.queue)
    @serve.ingress(build_app)
    class MQTEdge:
        pass

    return MQTEdge.bind()


def build(args: dict):
    """`serve run mqt_edge.serve.ray:build bundle=B [replicas=N] [any ServeConfig field=value]`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1))
    return deployment(ServeConfig.from_args(args), replicas, cpus)


def run_on_ray(cfg: ServeConfig, replicas: int, address: str | None = None) -> None:
    """Start (or join) Ray, serve on cfg.host:cfg.port through Ray's HTTP proxy, block until Ctrl-C."""
    ray = require("ray", "ray")
    serve = require("ray.serve", "ray")
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(cfg, replicas), name="mqt-edge", route_prefix="/")
    print(f"serving {cfg.model_id} on http://{cfg.host}:{cfg.port} with {replicas} Ray replicas (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
