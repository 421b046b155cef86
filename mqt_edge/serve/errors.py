"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

A library error (`MQTEdgeError`) becomes a client error by a table of its class; anything else is a
bug: the client gets a 500 with no detail and the server logs one line.
"""

from __future__ import annotations

import logging

from ..errors import ImageError, ImageTooLargeError, InputError, MQTEdgeError, TokensError

log = logging.getLogger("mqt_edge.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         499: "invalid_request_error", 503: "server_busy", 504: "timeout", 500: "server_error"}
# InputError texts that say the conversation does not fit (pipeline.Generation, policy._generate)
CONTEXT_FULL = ("exceed the context",)  # Generation and Conversation.start say it so


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None, extra_headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after, self.extra_headers = retry_after, dict(extra_headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        h = dict(self.extra_headers)  # e.g. a 405's Allow
        if self.retry_after is not None:
            h["Retry-After"] = str(max(1, round(self.retry_after)))
        if self.status == 401:
            h["WWW-Authenticate"] = "Bearer"
        return h


# Library errors a request can cause: class -> (status, code). Order matters: first match wins.
LIBRARY_ERRORS: list[tuple[type, int, str]] = [
    (TokensError, 422, "invalid_m"),
    (ImageError, 400, "invalid_image"),
    (InputError, 400, "invalid_request"),
    (MQTEdgeError, 422, "unprocessable"),
]


def from_library(exc: MQTEdgeError, param: str | None = None, length_param: str = "max_tokens") -> APIError:
    """The client error for a library error. length_param: the request field a context overflow names
    (the max_tokens or max_completion_tokens the request sent, or messages when it sent neither)."""
    text = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, text, "image_too_large", param or "messages")
    if isinstance(exc, InputError) and any(s in text for s in CONTEXT_FULL):
        return APIError(400, text, "context_length_exceeded", param or length_param)
    for cls, status, code in LIBRARY_ERRORS:
        if isinstance(exc, cls):
            return APIError(status, text, code, param)
    raise AssertionError("unreachable: MQTEdgeError is in the table")


def internal(exc: BaseException, where: str) -> APIError:
    """A bug: one log line (type and message, no traceback) and a bland 500 for the client."""
    log.error("internal error in %s: %s: %s", where, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return APIError(500, "internal server error (logged on the server)", "internal_error")
