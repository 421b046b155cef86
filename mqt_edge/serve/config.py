"""The server's settings: one frozen dataclass that the CLI, the tests and the Ray deployment build."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import InputError

API_KEY_ENV = "MQT_EDGE_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    profile: str | None = None  # None: auto (detect this device)
    mode: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 1  # slots: requests computed at once, each on its own llama.cpp context
    queue: int = 16  # requests waiting for a slot beyond which the server answers 503
    timeout_s: float = 120.0  # queue wait + compute, per request
    max_body_mb: float = 20.0
    media_dir: str | None = None  # local paths and file:// URLs allowed only below it
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    api_key: str | None = None
    ttft_ms: float | None = None  # planner limits (default: the profile's)
    memory_mb: float | None = None
    cache_mb: float | None = None  # session cache budget (default: computed from the memory limit)
    conversation_tokens: int = 1024  # context each session keeps for its turns beyond the visual tokens
    max_new_tokens: int = 256  # default answer length when a request gives none
    temperature: float = 0.0  # default when a request gives none: greedy, as the release evaluates
    model_name: str | None = None  # the id /v1/models lists (default: the bundle directory's name)
    threads: int | None = None
    vision_backend: str = "auto"
    n_gpu_layers: int = 0
    verify: bool = True

    def __post_init__(self) -> None:
        for name, low in (("parallel", 1), ("queue", 0), ("conversation_tokens", 16), ("max_new_tokens", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name}={v!r}", f"use an integer >= {low}")
        for name in ("timeout_s", "max_body_mb", "remote_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}={getattr(self, name)!r}", "use a positive number")
        if not 0 < self.port < 65536:
            raise InputError(f"port {self.port} is out of range", "use 1..65535 (0 is for tests: see run_server)")
        if self.media_dir is not None and not Path(self.media_dir).is_dir():
            raise InputError(f"--media-dir {self.media_dir} is not a directory", "create it or pass another")

    @property
    def model_id(self) -> str:
        return self.model_name or Path(self.bundle).resolve().name

    @property
    def key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None

    def with_(self, **kw) -> ServeConfig:
        return replace(self, **kw)

    @classmethod
    def from_args(cls, args: dict) -> ServeConfig:
        """From `serve run module:app key=value` arguments (strings), typed by the fields."""
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(args) - set(types)
        if unknown:
            raise InputError(f"unknown server settings: {', '.join(sorted(unknown))}",
                             f"use any of: {', '.join(types)}")
        out = {}
        for k, v in args.items():
            t = str(types[k])
            if not isinstance(v, str):
                out[k] = v
            elif "bool" in t:
                out[k] = v.lower() in ("1", "true", "yes", "on")
            elif t.startswith("int"):
                out[k] = int(v)
            elif t.startswith("float"):
                out[k] = float(v)
            else:
                out[k] = v
        return cls(**out)
