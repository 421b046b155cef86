"""The Chat Completions request, checked, and the response and chunk bodies.

Parsing is strict where a silent default would change the answer (n, logprobs, tools, penalties are
refused with a 400 naming the parameter) and lenient where OpenAI clients send harmless extras.
The pydantic models below are also the published schema (`/openapi.json`): the request models parse,
the response models describe what `Envelope` and the routes write (the tests hold the bodies to them).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError

MAX_STOP = 4
SEEDS = (-2**63, 2**64 - 1)  # OpenAI takes any 64-bit seed, signed or not


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageURL(_Loose):
    url: str = Field(description="a data: URL (base64), or a path / file:// URL under --media-dir, "
                     "or http(s) with --allow-remote-images")
    detail: Optional[str] = None


class ContentPart(_Loose):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="system and developer are ignored")
    content: Union[str, list[ContentPart], None] = None


class StreamOptions(_Loose):
    include_usage: bool = False


class MQTOptions(BaseModel):
    """The extension field `"mqt"`: m for this request, or a refinement policy."""

    model_config = ConfigDict(extra="forbid")
    m: Optional[int] = Field(None, ge=1)  # visual tokens
    refine: Optional[int] = Field(None, ge=1)
    confidence: float = Field(0.5, ge=0.0, le=1.01)


Stop = Annotated[str, Field(min_length=1)]


class ChatCompletionRequest(_Loose):
    model: str
    messages: list[ChatMessage] = Field(min_length=1, description="one image, in the first user message")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=SEEDS[0], le=SEEDS[1])
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOP)], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(None, ge=1, le=1)  # refused before validation (unsupported_parameter) when not 1
    mqt: Optional[MQTOptions] = None


ChatRequest = ChatCompletionRequest  # the name the server's code uses


def _truthy(v: Any) -> bool:
    return bool(v)


# OpenAI parameters this server does not implement: refused, since ignoring them changes the answer.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v not in (None, 1), "n must be 1: this server returns one choice per request"),
    "logprobs": (_truthy, "logprobs are not supported"),
    "top_logprobs": (lambda v: v not in (None, 0), "top_logprobs are not supported"),
    "tools": (_truthy, "tools are not supported by this model"),
    "functions": (_truthy, "functions are not supported by this model"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool_choice is not supported by this model"),
    "response_format": (lambda v: v not in (None, {"type": "text"}), "only text responses are supported"),
    "frequency_penalty": (lambda v: v not in (None, 0, 0.0), "frequency_penalty is not supported"),
    "presence_penalty": (lambda v: v not in (None, 0, 0.0), "presence_penalty is not supported"),
    "logit_bias": (_truthy, "logit_bias is not supported"),
    "audio": (_truthy, "audio output is not supported"),
}


def _nested_too_deeply() -> APIError:
    return APIError(400, "the request body is nested too deeply (a chat request is a few levels deep)", "invalid_json")


def _branch(loc_part) -> bool:
    """pydantic's name for a union's branch in an error location (str, list[ContentPart], ImageURL): no field."""
    return isinstance(loc_part, str) and ("[" in loc_part or "-" in loc_part or loc_part[:1].isupper()
                                          or loc_part in ("str", "int", "bool"))


def parse_chat(raw: bytes) -> ChatRequest:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
    except RecursionError:  # json's C scanner counts its depth against Python's recursion limit
        raise _nested_too_deeply() from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    for name, (refused, why) in UNSUPPORTED.items():
        if refused(data.get(name)):
            raise APIError(400, why, "unsupported_parameter", name)
    try:
        req = ChatRequest.model_validate(data)
    except RecursionError:
        raise _nested_too_deeply() from None
    except ValidationError as exc:
        # of a union's branches, the one that got furthest, or that failed on more than the value's type
        first = max(exc.errors(), key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
        param = ".".join(str(p) for p in first["loc"] if not _branch(p)) or None
        why = first["msg"]
        if first["type"] == "extra_forbidden":  # only `mqt` is strict: name what it takes
            why = f"unknown key; the mqt field takes {', '.join(MQTOptions.model_fields)}"
        raise APIError(400, f"{param}: {why}", "invalid_value", param) from None
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(400, f"stop takes up to {MAX_STOP} non-empty strings", "invalid_value", "stop")
    if req.mqt and req.mqt.m and req.mqt.refine and req.mqt.refine <= req.mqt.m:
        raise APIError(422, f"mqt.refine {req.mqt.refine} is not above mqt.m {req.mqt.m}",
                       "invalid_m", "mqt.refine")
    return req


@dataclass
class Conversation:
    """The request as the model sees it: one image, earlier (question, answer) turns, the new question."""

    image_url: str
    turns: list[tuple[str, str]]
    question: str
    ignored_system: int = 0


def _parts(msg: ChatMessage, i: int) -> tuple[list[str], list[str]]:
    """(texts, image URLs) of a message."""
    if msg.content is None:
        return [], []
    if isinstance(msg.content, str):
        return [msg.content], []
    texts, images = [], []
    for j, p in enumerate(msg.content):
        if p.type == "text" and isinstance(p.text, str):
            texts.append(p.text)
        elif p.type == "image_url" and p.image_url is not None:
            images.append(p.image_url if isinstance(p.image_url, str) else p.image_url.url)
        else:
            raise APIError(400, f"content part type {p.type!r} is not supported (use text or image_url)",
                           "invalid_value", f"messages.{i}.content.{j}")
    return texts, images


def conversation(req: ChatRequest) -> Conversation:
    """Check the turn order (user, assistant, user, ..., user) and find the one image."""
    images, turns, pending, ignored = [], [], None, 0
    for i, msg in enumerate(req.messages):
        texts, urls = _parts(msg, i)
        if msg.role in ("system", "developer"):
            ignored += 1  # the bundle's llava_v1 template fixes the system prompt the model was trained on
            continue
        if msg.role not in ("user", "assistant"):
            raise APIError(400, f"role {msg.role!r} is not supported (use system, user, assistant)",
                           "invalid_value", f"messages.{i}.role")
        if urls and (msg.role != "user" or turns or pending is not None or images or len(urls) > 1):
            raise APIError(400, "exactly one image, in the first user message, is supported: send one image_url part",
                           "invalid_value", f"messages.{i}.content")
        images += urls
        text = "\n".join(t for t in texts if t)
        if (msg.role == "user") != (pending is None):
            raise APIError(400, "messages must alternate user and assistant, starting with user",
                           "invalid_value", f"messages.{i}.role")
        if msg.role == "user":
            pending = text
        else:
            turns.append((pending, text.strip()))  # as the server returned it (stripped)
            pending = None
    if pending is None:
        raise APIError(400, "the last message must be from the user", "invalid_value", "messages")
    if not images:
        raise APIError(400, "this model answers about an image: put an image_url part in the first user message",
                       "invalid_value", "messages")
    return Conversation(images[0], turns, pending, ignored)


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Envelope:
    """What every body and chunk of one completion shares."""

    model: str
    id: str = field(default_factory=new_id)
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, text: str, finish: str, usage: Usage, mqt: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage.to_dict(), "mqt": mqt}

    def chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}

    def usage_chunk(self, usage: Usage, mqt: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage.to_dict(), "mqt": mqt}


# -- the response bodies, as published in /openapi.json --------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(_Loose):
    cached_tokens: int


class CompletionUsage(_Loose):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class MQTInfo(_Loose):
    """The `mqt` field of every answer: what m answered, and what it cost."""

    m: int
    refined: bool
    refined_from: Optional[dict[str, Any]]
    cache_hit: bool
    turns_reused: int
    prefilled: int
    first_token_prob: float
    timings_ms: dict[str, float]
    decode_tokens_per_s: Optional[float]
    server_ms: float


class AssistantMessage(_Loose):
    role: Literal["assistant"]
    content: str


class Choice(_Loose):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Loose):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    mqt: MQTInfo


class Delta(_Loose):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(_Loose):
    index: int
    delta: Delta
    logprobs: None
    finish_reason: Optional[Literal["stop", "length"]]


class ChatCompletionChunk(_Loose):
    """One `data:` event of a stream; the last chunk and the usage chunk carry `mqt`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[CompletionUsage] = None
    mqt: Optional[MQTInfo] = None


class ModelMQT(_Loose):
    max_m: int
    default_m: int
    profile: str


class Model(_Loose):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    mqt: Optional[ModelMQT] = None


class ModelList(_Loose):
    object: Literal["list"]
    data: list[Model]


class Health(_Loose):
    status: Literal["ok", "loading", "error"]
    detail: Optional[str] = None  # why it is not ready
    model: Optional[str] = None
    m: Optional[int] = None
