"""The published schema, `/openapi.json`: every route's statuses and bodies, typed by schema.py's models.

The chat route parses its body by hand (errors that name the field, refusals before validation, the
body limit), so FastAPI cannot infer its request schema; `publish` adds it from the same pydantic
model that parses it, so the schema and the parser cannot drift apart.
"""

from __future__ import annotations

from fastapi import FastAPI

from .._version import __version__
from .schema import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ErrorResponse, Health, Model,
                     ModelList)

REF = "#/components/schemas/{model}"


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": WHY[s]} for s in statuses}


WHY = {400: "malformed JSON, a refused or invalid parameter, a bad image, the context exceeded",
       401: "missing or wrong API key", 404: "unknown model", 413: "body or image over the limit",
       422: "an m the bundle cannot serve", 500: "a bug (logged on the server)",
       503: "loading, or busy (Retry-After)", 504: "compute past the timeout"}

# OpenAPI 3.1 has a text/event-stream `schema` describe one event: its `data` is a chunk, an error
# (a failure after the first token) or the closing [DONE].
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": REF.format(model="ChatCompletionChunk")}, {"$ref": REF.format(model="ErrorResponse")}]}}]}}}

CHAT = {"summary": "Chat Completions (OpenAI dialect)", "response_model": None,
        "openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model="ChatCompletionRequest")}}}}},
        "responses": {200: {"model": ChatCompletion, "description": "the answer; with stream=true, server-sent "
                            "events of chat.completion.chunk, then data: [DONE]",
                            "content": {"text/event-stream": {"schema": SSE_EVENT}}},
                      **_errors(400, 401, 404, 413, 422, 500, 503, 504)}}
MODELS = {"summary": "The one model", "response_model": None,
          "responses": {200: {"model": ModelList, "description": "the list"}, **_errors(401)}}
MODEL = {"summary": "The model, by id", "response_model": None,
         "openapi_extra": {"parameters": [{"name": "name", "in": "path", "required": True,
                                           "schema": {"type": "string"}}]},
         "responses": {200: {"model": Model, "description": "the model"}, **_errors(401, 404)}}
HEALTH = {"summary": "Ready or not (no key needed)", "response_model": None,
          "responses": {200: {"model": Health, "description": "ready"},
                        503: {"model": Health, "description": "loading (Retry-After) or failed to load"}}}
METRICS = {"summary": "Prometheus metrics", "response_model": None,
           "responses": {200: {"description": "Prometheus text format", "content": {"text/plain": {
               "schema": {"type": "string"}}}}, **_errors(401)}}


def _add(schemas: dict, model) -> dict:
    """model's JSON schema, its nested models placed beside it in components."""
    schema = model.model_json_schema(ref_template=REF)
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema
    return schema


def publish(app: FastAPI, model_id: str, secured: bool) -> None:
    """Serve the schema at app.openapi_url, built once on first request."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title="mqt-edge", version=__version__, routes=app.routes,
                              description="OpenAI Chat Completions over an MQT-LLaVA bundle (docs/serve.md)")
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            request = _add(schemas, ChatCompletionRequest)
            request["properties"]["model"]["enum"] = [model_id]  # any other is a 404
            _add(schemas, ChatCompletionChunk)
            if secured:
                doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, ops in doc["paths"].items():
                    if path.startswith("/v1/") or path == "/metrics":
                        for op in ops.values():
                            op["security"] = [{"bearer": []}]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = build
