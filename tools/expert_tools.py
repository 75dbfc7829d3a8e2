"""Expert tools: LangChain tools over the local expert models, built per session.

HuggingGPT / Visual ChatGPT style: the backbone writes a tool call, the controller runs the
tool, the result goes back into the conversation. Each tool has a pydantic argument model whose
JSON schema (`tool_schemas`) the constrained decoder compiles, so a small model can only write
calls that fit.

- Media arguments are ids (`audio-1`, `image-2`) that the session's `MediaStore` resolves, never
  file paths (HuggingGPT #75). New media get new ids and the result names them.
- Models come from the `ModelPool`: loaded the first time a tool needs them, once per process,
  shared between sessions; a model that keeps per-call state runs for one caller at a time.
- Successful calls give a sentence for people (`tools/summaries.py`) as their content and a small
  JSON-able dict (`{"image": "image-3"}`) as their artifact (`response_format=
  "content_and_artifact"`); `call_tool` runs one and returns both. Errors the user or
  the model can cause (an unknown id, a corrupt file, no generator in the profile, arguments
  that do not fit the schema) come back as a plain message string instead of an exception:
  they are raised as `ToolException` and the tools are built with `handle_tool_error=True`
  (and a validation-error handler), which in langchain-core 1.7 turns them into the tool's
  output (a `ToolMessage` with `status="error"` when invoked with a tool call). Anything else
  that escapes is a bug and propagates as itself, so the real error is shown (LLaVA's lesson).
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from langchain_core.tools import BaseTool, StructuredTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import MediaError, SignalgraphError
from models.specs import ProfileSpec
from tools.media_store import MediaRecord, MediaStore
from tools.model_pool import DEFAULT_POOL, ModelPool
from tools.summaries import summary

TOOL_NAMES: tuple[str, ...] = (
    "transcribe",
    "speak",
    "describe_image",
    "generate_image",
    "generate_audio",
    "search_knowledge",
)

# What each tool does to the world, for the controller's tool policy (graphs/tool_policy.py): tools
# that act run only when the user's own request asks for them, in these words.
TOOL_EFFECTS: dict[str, dict] = {
    "transcribe": {"effect": "reads"},
    "describe_image": {"effect": "reads"},
    "search_knowledge": {"effect": "reads"},
    "speak": {"effect": "acts", "intent": r"\b(say|speak|spoken|aloud|out loud|read\b.{0,60}\bout|voice|"
                                          r"pronounce|narrat\w*|text.to.speech|tts)\b"},
    "generate_image": {"effect": "acts", "intent": r"\b(draw\w*|paint\w*|sketch\w*|illustrat\w*|pictures?|images?|"
                                                   r"photos?|posters?|render\w*|logos?|designs?|show me)\b"},
    "generate_audio": {"effect": "acts", "intent": r"\b(sounds?|noises?|music|tunes?|melody|jingle|audio|"
                                                   r"chimes?|ring\w*)\b"},
}

_MAX_SEED = 2**32 - 1
T = TypeVar("T")


class UnknownToolError(SignalgraphError):
    """A tool name that no tool has (e.g. a typo in a profile's or workflow's allow-list)."""


@dataclass
class ToolContext:
    """What one session's tools share.

    `knowledge_base` is any object with `similarity_search_with_score(query, k)` returning
    `(Document, score)` pairs (a LangChain vector store, or `tools.knowledge_base`).
    `output_dir`, when set, receives a copy of every generated file as `<session>/<id><suffix>`,
    for people to open; tools and models still refer to media by id only.
    """

    session: str
    profile: ProfileSpec
    store: MediaStore
    pool: ModelPool = field(default_factory=lambda: DEFAULT_POOL)
    output_dir: Path | None = None
    knowledge_base: Any | None = None


# --- argument models --------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranscribeArgs(_Args):
    audio: str = Field(
        description="id of the audio (or video) to transcribe, e.g. 'audio-1'; never a file path",
        pattern=r"^(audio|video)-[0-9]+$",
    )


class SpeakArgs(_Args):
    text: str = Field(description="the words to say aloud", min_length=1, max_length=2000)


class DescribeImageArgs(_Args):
    image: str = Field(description="id of the image to describe, e.g. 'image-1'; never a file path",
                       pattern=r"^image-[0-9]+$")
    top_k: int = Field(3, description="how many labels to return, most likely first", ge=1, le=10)


class GenerateImageArgs(_Args):
    prompt: str = Field(description="what the image should show", min_length=1, max_length=500)
    seed: int = Field(0, description="random seed; the same prompt and seed give the same image",
                      ge=0, le=_MAX_SEED)


class GenerateAudioArgs(_Args):
    prompt: str = Field(description="the sound to make, e.g. 'rain on a tin roof'", min_length=1, max_length=500)
    seconds: float = Field(5.0, description="length of the clip in seconds", gt=0.0, le=30.0)
    seed: int = Field(0, description="random seed; the same prompt and seed give the same sound",
                      ge=0, le=_MAX_SEED)


class SearchKnowledgeArgs(_Args):
    query: str = Field(description="what to look up in the knowledge base", min_length=1, max_length=500)
    k: int = Field(4, description="how many passages to return", ge=1, le=20)


# --- helpers ----------------------------------------------------------------------------------


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can meet into ToolException, whose message becomes the result."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        try:
            return func(**kwargs)
        except ToolException:
            raise
        except SignalgraphError as exc:
            raise ToolException(str(exc)) from exc

    return wrapper


def _not_configured(role: str, field_name: str, profile: ProfileSpec, example: str) -> ToolException:
    return ToolException(
        f"no {role} is configured in profile {profile.name!r}, so this tool cannot run; "
        f"add `{field_name}: {example}` to the profile, or answer without it"
    )


def _media(context: ToolContext, media_id: str, kinds: Sequence[str], tool: str) -> MediaRecord:
    """The record of an id of one of `kinds`, or a ToolException naming the ids that would do."""
    try:
        record = context.store.get(context.session, media_id)
    except SignalgraphError:
        record = None
    if record is None or record.kind not in kinds:
        raise ToolException(f"{tool}: {_media_problem(context, media_id, kinds)}")
    return record


def _media_problem(context: ToolContext, media_id: object, kinds: Sequence[str]) -> str:
    """Why `media_id` does not name media of `kinds` in this session, and which ids would."""
    store = context.store
    try:
        record = store.get(context.session, str(media_id))
    except SignalgraphError:
        return store.not_found_message(context.session, media_id, kinds)
    wanted = " or ".join(kinds)
    fitting = [r.id for r in store.list(context.session) if r.kind in kinds]
    hint = f"{wanted} ids in this session: {', '.join(fitting)}" if fitting else f"this session has no {wanted} yet"
    return f"{record.id!r} is {_article(record.kind)} {record.kind}, not {_article(wanted)} {wanted}; {hint}"


def _loaded(record: MediaRecord, load: Callable[[Path], T]) -> T:
    """Decode a stored file; a media error names the id, not the blob's path on disk."""
    try:
        return load(record.path)
    except MediaError as exc:
        raise ToolException(str(exc).replace(str(record.path), record.id)) from None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _export(context: ToolContext, record: MediaRecord) -> None:
    """Copy a generated file to output_dir/<session>/<id><suffix>; never over an existing file."""
    if context.output_dir is None:
        return
    folder = Path(context.output_dir) / re.sub(r"[^A-Za-z0-9._-]", "_", context.session)
    folder.mkdir(parents=True, exist_ok=True)
    data = record.path.read_bytes()
    for name in (f"{record.id}{record.suffix}", f"{record.id}-{record.sha256[:12]}{record.suffix}"):
        try:
            with open(folder / name, "xb") as fp:
                fp.write(data)
            return
        except FileExistsError:  # a deleted session's file of the same id, kept
            continue


def _wav_bytes(samples: Any, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes, as models.speech.save_wav writes them to a file."""
    import numpy as np
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), int(sample_rate),
                    subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _validation_message(name: str, context: ToolContext) -> Callable[[ValidationError], str]:
    media_fields = {"audio": ("audio", "video"), "image": ("image",)}

    def handle(error: ValidationError) -> str:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ())) or "arguments"
            problem = f"{where}: {item.get('msg', 'invalid')}"
            if where in media_fields and item.get("type") == "string_pattern_mismatch":
                problem = f"{where}: " + _media_problem(context, item.get("input"), media_fields[where])
            problems.append(problem)
        return f"{name}: invalid arguments ({'; '.join(problems)})"

    return handle


# --- the tools --------------------------------------------------------------------------------


def _make_transcribe(context: ToolContext) -> StructuredTool:
    def transcribe(audio: str) -> dict[str, Any]:
        from models.media import load_audio
        from models.transcriber import SAMPLE_RATE, build_transcriber

        spec = context.profile.transcriber
        if spec is None:
            raise _not_configured("speech-to-text model", "transcriber", context.profile,
                                  "{kind: faster_whisper, source: 'shipped:whisper-tiny.en'}")
        record = _media(context, audio, ("audio", "video"), "transcribe")
        samples = _loaded(record, lambda path: load_audio(path, context.store.limits, sample_rate=SAMPLE_RATE))
        with context.pool.use("transcriber", spec, build_transcriber) as transcriber:
            transcript = transcriber.transcribe(samples, SAMPLE_RATE)
        return {"audio": record.id, "text": transcript.text, "language": transcript.language,
                "seconds": round(transcript.duration, 2)}

    return _tool(context, transcribe, TranscribeArgs,
                 "Write down the words spoken in a recording.")


def _make_speak(context: ToolContext) -> StructuredTool:
    def speak(text: str) -> dict[str, Any]:
        from models.speech import build_speech

        spec = context.profile.speech
        if spec is None:
            raise _not_configured("text-to-speech voice", "speech", context.profile,
                                  "{source: 'shipped:piper-joe-medium'}")
        with context.pool.use("speech", spec, build_speech) as voice:
            samples, rate = voice.synthesize(text)
        record = context.store.add_generated(
            context.session, "audio", _wav_bytes(samples, rate), ".wav",
            {"tool": "speak", "text": text, "sample_rate": rate},
        )
        _export(context, record)
        return {"audio": record.id, "text": text, "seconds": round(len(samples) / rate, 2)}

    return _tool(context, speak, SpeakArgs, "Read a text aloud; makes a new audio.")


def _make_describe_image(context: ToolContext) -> StructuredTool:
    def describe_image(image: str, top_k: int = 3) -> dict[str, Any]:
        from models.encoders import build_image_encoder
        from models.media import load_image

        spec = context.profile.image_encoder
        if spec is None:
            raise _not_configured("image encoder", "image_encoder", context.profile,
                                  "{kind: efficientnet_lite0, source: 'shipped:efficientnet-lite0'}")
        if spec.kind != "efficientnet_lite0":
            raise ToolException(
                f"no image description head is configured in profile {context.profile.name!r}: its image "
                f"encoder ({spec.kind}, {spec.source}) makes features for the language model but has no "
                "labels to name; use an efficientnet_lite0 image encoder for this tool, or answer without it"
            )
        record = _media(context, image, ("image",), "describe_image")
        picture = _loaded(record, lambda path: load_image(path, context.store.limits))
        with context.pool.use("image_encoder", spec, build_image_encoder) as encoder:
            labels = encoder.classify([picture], top_k=top_k)[0]
        return {"image": record.id, "labels": [{"label": label, "score": round(score, 4)} for label, score in labels]}

    return _tool(context, describe_image, DescribeImageArgs,
                 "Name what a photo shows (ImageNet labels).")


def _make_generate_image(context: ToolContext) -> StructuredTool:
    def generate_image(prompt: str, seed: int = 0) -> dict[str, Any]:
        spec = context.profile.image_generator
        if spec is None:
            raise _not_configured("image generator", "image_generator", context.profile,
                                  "{source: <a Stable Diffusion folder or hub id>}")
        from models.generators import build_image_generator  # imports diffusers: only when needed

        with context.pool.use("image_generator", spec, build_image_generator) as generator:
            image = generator.generate(generator.text_conditioning(prompt), seed=seed)[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        record = context.store.add_generated(
            context.session, "image", buffer.getvalue(), ".png",
            {"tool": "generate_image", "prompt": prompt, "seed": seed, "width": image.width, "height": image.height},
        )
        _export(context, record)
        return {"image": record.id, "prompt": prompt}

    return _tool(context, generate_image, GenerateImageArgs,
                 "Draw a new image from a description.")


def _make_generate_audio(context: ToolContext) -> StructuredTool:
    def generate_audio(prompt: str, seconds: float = 5.0, seed: int = 0) -> dict[str, Any]:
        spec = context.profile.audio_generator
        if spec is None:
            raise _not_configured("audio generator", "audio_generator", context.profile,
                                  "{source: <an AudioLDM-2 folder or hub id>}")
        from models.generators import build_audio_generator

        with context.pool.use("audio_generator", spec, build_audio_generator) as generator:
            samples = generator.generate(generator.text_conditioning(prompt), seed=seed, seconds=seconds)[0]
            rate = generator.sample_rate
        record = context.store.add_generated(
            context.session, "audio", _wav_bytes(samples, rate), ".wav",
            {"tool": "generate_audio", "prompt": prompt, "seed": seed, "seconds": seconds, "sample_rate": rate},
        )
        _export(context, record)
        return {"audio": record.id, "prompt": prompt, "seconds": round(len(samples) / rate, 2)}

    return _tool(context, generate_audio, GenerateAudioArgs,
                 "Make a sound from a description.")


def _make_search_knowledge(context: ToolContext) -> StructuredTool:
    def search_knowledge(query: str, k: int = 4) -> dict[str, Any]:
        kb = context.knowledge_base
        if kb is None:
            raise ToolException(
                "no knowledge base is attached to this session, so there is nothing to search; "
                "ingest documents first, or answer without it"
            )
        passages = []
        for document, score in kb.similarity_search_with_score(query, k=k):
            metadata = getattr(document, "metadata", None) or {}
            passages.append({
                "text": document.page_content,
                "source": metadata.get("source"),
                "position": metadata.get("position"),
                "score": round(float(score), 4),
            })
        return {"query": query, "passages": passages}

    return _tool(context, search_knowledge, SearchKnowledgeArgs,
                 "Search the knowledge base (the user's notes).")


def _with_summary(func: Callable[..., dict]) -> Callable[..., tuple[str, dict]]:
    """The tool's dict becomes (a sentence for people, the dict for programs)."""

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> tuple[str, dict]:
        result = func(**kwargs)
        return summary(func.__name__, result), result

    return wrapper


def _tool(context: ToolContext, func: Callable[..., Any], args: type[BaseModel], description: str) -> StructuredTool:
    return StructuredTool.from_function(
        func=_user_errors(_with_summary(func)),
        response_format="content_and_artifact",
        name=func.__name__,
        description=description,
        args_schema=args,
        handle_tool_error=True,
        handle_validation_error=_validation_message(func.__name__, context),
        metadata=dict(TOOL_EFFECTS[func.__name__]),
    )


_BUILDERS: dict[str, Callable[[ToolContext], StructuredTool]] = {
    "transcribe": _make_transcribe,
    "speak": _make_speak,
    "describe_image": _make_describe_image,
    "generate_image": _make_generate_image,
    "generate_audio": _make_generate_audio,
    "search_knowledge": _make_search_knowledge,
}
assert tuple(_BUILDERS) == TOOL_NAMES and set(TOOL_EFFECTS) == set(TOOL_NAMES)


# the profile component (or the knowledge base) each tool runs on
_NEEDS = {"transcribe": "transcriber", "speak": "speech", "describe_image": "image_encoder",
          "generate_image": "image_generator", "generate_audio": "audio_generator"}


def runnable_tools(profile: ProfileSpec, knowledge_base=None) -> list[str]:
    """The tools this profile can run: a tool whose model is not configured would only fail."""
    return [name for name in TOOL_NAMES if (knowledge_base is not None if name == "search_knowledge"
                                            else getattr(profile, _NEEDS[name]) is not None)]


def build_tools(context: ToolContext, allow: Iterable[str] | None = None) -> list[BaseTool]:
    """The session's tools, all of them or those named in `allow` (in that order).

    Raises `UnknownToolError` for a name that is not a tool. Building a tool loads no model.
    """
    names = list(TOOL_NAMES) if allow is None else list(dict.fromkeys(allow))
    unknown = [name for name in names if name not in _BUILDERS]
    if unknown:
        raise UnknownToolError(
            f"unknown tool{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"available tools: {', '.join(TOOL_NAMES)}"
        )
    return [_BUILDERS[name](context) for name in names]


@dataclass
class ToolOutcome:
    """One tool call's result: `text` for people (or the error), `artifact` for programs."""

    text: str
    artifact: Any = None
    error: str | None = None


def call_tool(tool: BaseTool, args: dict, call_id: str = "call") -> ToolOutcome:
    """Run a tool as the controller does, through a tool call: its sentence and its artifact, or
    the handled error's message. A tool that returns only content (one a user registered) gets
    that content as its artifact, and a sentence in words made from it."""
    message = tool.invoke({"type": "tool_call", "id": call_id, "name": tool.name, "args": args})
    text = message.text
    if message.status == "error":
        return ToolOutcome(text, None, text)
    artifact = message.artifact
    if artifact is None:
        artifact = message.content
        if isinstance(artifact, str):
            try:
                artifact = json.loads(artifact)
            except ValueError:
                pass
        text = summary(tool.name, artifact)
    return ToolOutcome(text, artifact)


def tool_schemas(tools: Iterable[BaseTool]) -> list[dict[str, Any]]:
    """OpenAI-style function schemas: {"name", "description", "parameters"} for each tool.

    `parameters` is the argument model's JSON schema (types, bounds, patterns, descriptions,
    defaults, `additionalProperties: false`), without pydantic's titles."""
    schemas = []
    for tool in tools:
        args = tool.args_schema
        if isinstance(args, type) and issubclass(args, BaseModel):
            parameters = _without_titles(args.model_json_schema())
        elif isinstance(args, dict):
            parameters = _without_titles(dict(args))
        else:
            parameters = {"type": "object", "properties": {}}
        parameters.setdefault("required", [])
        schemas.append({"name": tool.name, "description": tool.description, "parameters": parameters})
    return schemas


def _without_titles(schema: Any) -> Any:
    """Drop pydantic's auto-generated `title` keys (not a property that happens to be named title)."""
    if isinstance(schema, dict):
        cleaned = {}
        for key, value in schema.items():
            if key == "title" and isinstance(value, str):
                continue
            if key == "properties" and isinstance(value, dict):
                cleaned[key] = {name: _without_titles(prop) for name, prop in value.items()}
            else:
                cleaned[key] = _without_titles(value)
        return cleaned
    if isinstance(schema, list):
        return [_without_titles(item) for item in schema]
    return schema
