"""The OpenAI chat-completions wire format, as far as Signalgraph speaks it, and its errors.

Requests are validated here; responses are plain dicts built by `agent.server.app`. Fields OpenAI
defines that change nothing here (temperature, top_p, ...) are accepted and ignored: decoding is
greedy. Those that ask for what this server cannot do (`n` > 1, logprobs, audio output, ...) are
refused with 400 naming the parameter. Unknown fields are ignored, so newer clients keep working.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import SignalgraphError

# what each status means in OpenAI's error format: (type, default code)
ERROR_TYPES = {
    400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
}

AUDIO_SUFFIXES = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg", "opus": ".opus", "m4a": ".m4a",
                  "aac": ".aac", "webm": ".webm"}
IMAGE_SUFFIXES = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/gif": ".gif",
                  "image/webp": ".webp", "image/bmp": ".bmp", "image/tiff": ".tif"}
_PART_TAGS = {"text", "image_url", "input_audio"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.DOTALL)


class ApiError(SignalgraphError):
    """A request the API refuses, with the HTTP status and the field (`param`) that is wrong."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class ImageUrl(_Wire):
    url: str
    detail: str | None = None


class ImagePart(_Wire):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Wire):
    data: str  # base64
    format: Literal["wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm"]


class AudioPart(_Wire):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class FunctionCall(_Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""

    def media_parts(self) -> list[tuple[int, ImagePart | AudioPart]]:
        """(position in content, part) of each image and audio part."""
        if not isinstance(self.content, list):
            return []
        return [(i, p) for i, p in enumerate(self.content) if not isinstance(p, TextPart)]


class FunctionDef(_Wire):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatCompletionRequest(_Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream_options: StreamOptions | None = None
    n: int = 1  # only 1: one greedy answer (see UNSUPPORTED)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)


# OpenAI parameters this server cannot honour, with the values that ask for nothing: a request that
# asks for more is refused with 400 naming the parameter, rather than answered as if it had not.
# (Parameters that only shape sampling, such as temperature or seed, change nothing for greedy
# decoding and are accepted; fields OpenAI does not define are ignored, for newer clients.)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (1, "this server gives one greedy answer per request"),
    "logprobs": (False, "log probabilities are not returned"),
    "top_logprobs": (None, "log probabilities are not returned"),
    "logit_bias": ({}, "logit_bias is not applied by this server"),
    "audio": (None, "audio output is given as links to generated media, not inline"),
    "modalities": (["text"], "replies are text; generated media come as links"),
    "prediction": (None, "predicted outputs are not supported"),
    "functions": (None, "use `tools`; the legacy `functions` is not supported"),
    "function_call": (None, "use `tool_choice`; the legacy `function_call` is not supported"),
}


def unsupported(data: dict) -> ApiError | None:
    """The 400 for the first parameter that asks for what this server cannot do, if any."""
    for name, (harmless, why) in UNSUPPORTED.items():
        value = data.get(name)
        if value is None or value == harmless or (harmless is None and value in ({}, [])):
            continue
        return ApiError(400, f"{name}={value!r} is not supported: {why}", param=name, code="unsupported_parameter")
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        return ApiError(400, f"response_format {response_format.get('type')!r} is not supported: replies are "
                             "free text (give `tools` for structured output)", param="response_format",
                        code="unsupported_parameter")
    return None


def parse_request(data: Any) -> ChatCompletionRequest:
    """A validated request, or ApiError: 400 when the body is not an object, 422 for bad fields."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    refused = unsupported(data)
    if refused is not None:
        raise refused
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(f"{_param(e['loc']) or 'body'}: {e['msg']}" for e in errors)
        deepest = max(errors, key=lambda e: len(e["loc"]))  # of a union's attempts, the most specific
        raise ApiError(422, f"invalid request: {problems}", param=_param(deepest["loc"]),
                       code="invalid_value") from None


def _param(loc: tuple) -> str:
    """pydantic's error location as OpenAI names a parameter: messages[0].content[1].image_url.url.
    pydantic also names the union member it tried (`str`, `list[...]`, a class, a content part's
    tag); OpenAI names only fields and indexes."""
    text, previous = "", None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier() and not part[0].isupper() and part != "str" \
                and not (isinstance(previous, int) and part in _PART_TAGS):
            text += f".{part}" if text else part
        previous = part
    return text


def decode_image_url(url: str, param: str) -> tuple[bytes, str]:
    """(bytes, suffix) of an image given as a data URL; this server fetches nothing from the web."""
    found = _DATA_URL.match(url)
    if found is None:
        raise ApiError(400, f"{param}: images must be inline data URLs (data:image/png;base64,...); "
                            "this server does not fetch URLs", param=param, code="invalid_image_url")
    mime = (found["mime"] or "").lower()
    if mime not in IMAGE_SUFFIXES:
        raise ApiError(400, f"{param}: unsupported image type {mime or '(none)'!r}; use one of "
                            f"{', '.join(sorted(IMAGE_SUFFIXES))}", param=param, code="invalid_image_format")
    return decode_base64(found["data"], param), IMAGE_SUFFIXES[mime]


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the data is not valid base64", param=param, code="invalid_base64") from None
