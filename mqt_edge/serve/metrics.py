"""Prometheus metrics, in a registry of the app's own (so two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
M_BUCKETS = (1, 2, 4, 8, 16, 36, 64, 144, 256, 576)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mqt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("mqt_errors", "Requests answered with an error", ["code"], registry=r)
        self.queue_depth = Gauge("mqt_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("mqt_busy_slots", "Slots computing a request", registry=r)
        self.ttft = Histogram("mqt_ttft_seconds", "Time to first token, from arrival", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.total = Histogram("mqt_request_seconds", "Completion time, from arrival", buckets=LATENCY_BUCKETS,
                               registry=r)
        self.decode_tps = Histogram("mqt_decode_tokens_per_second", "Decode speed per answer",
                                    buckets=TPS_BUCKETS, registry=r)
        self.m = Histogram("mqt_visual_tokens", "m used per answer", buckets=M_BUCKETS, registry=r)
        self.refined = Counter("mqt_refinements", "Answers refined to a larger m", registry=r)
        self.cache_hits = Counter("mqt_image_cache_hits", "Requests that continued a cached session", registry=r)
        self.cache_misses = Counter("mqt_image_cache_misses", "Requests that encoded their image", registry=r)
        self.evictions = Counter("mqt_session_evictions", "Cached sessions evicted for room", registry=r)
        self.forks = Counter("mqt_session_forks", "Conversations started from another's cached image and turns",
                             registry=r)
        self.cached_sessions = Gauge("mqt_cached_sessions", "Sessions in the cache (idle and in use)", registry=r)
        self.cancelled = Counter("mqt_cancelled", "Generations stopped by a disconnect or timeout", ["reason"],
                                 registry=r)

    def observe_answer(self, info: dict) -> None:
        self.m.observe(info["m"])
        (self.cache_hits if info["cache_hit"] else self.cache_misses).inc()
        if info["refined"]:
            self.refined.inc()
        if info.get("decode_tokens_per_s"):
            self.decode_tps.observe(info["decode_tokens_per_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
