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
         503: "server_busy", 504: "timeout", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        h = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}
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


def from_library(exc: MQTEdgeError, param: str | None = None) -> APIError:
    text = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return APIError(413, text, "image_too_large", param or "messages")
    if isinstance(exc, InputError) and "exceed the context" in text:
        return APIError(400, text, "context_length_exceeded", param or "max_tokens")
    for cls, status, code in LIBRARY_ERRORS:
        if isinstance(exc, cls):
            return APIError(status, text, code, param)
    raise AssertionError("unreachable: MQTEdgeError is in the table")


def internal(exc: BaseException, where: str) -> APIError:
    """A bug: one log line (type and message, no traceback) and a bland 500 for the client."""
    log.error("internal error in %s: %s: %s", where, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return APIError(500, "internal server error (logged on the server)", "internal_error")
