"""`signalgraph demo`: a scripted tour through the controller, or (`--components`) each model on its own."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from models.errors import UntrainedProjectorError
from models.profiles import check_ready, load_profile

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


@contextmanager
def _step(title: str):
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def run_components(profile_name: str | None, out: str) -> int:
    profile = load_profile(profile_name)
    check_ready(profile)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"profile {profile.name}: {profile.description}")

    from models.mmllm import MMLLM

    with _step(f"LLM backbone ({profile.backbone.source})"):
        mm = MMLLM.from_profile(profile)
        question = "What is the capital of France?"
        answer = mm.generate([{"role": "user", "content": question}], max_new_tokens=40)
        print(f"   user: {question}\n   assistant: {answer.text.strip()}")

    spoken = None
    if profile.speech is not None:
        from models.speech import build_speech, save_wav

        with _step(f"text to speech ({profile.speech.source})"):
            sentence = "Signal tokens let a language model ask for pictures and sounds."
            samples, rate = build_speech(profile.speech).synthesize(sentence)
            spoken = save_wav(out_dir / "speech.wav", samples, rate)
            print(f"   said {sentence!r} -> {spoken} ({len(samples) / rate:.1f} s of audio)")

    if profile.transcriber is not None and spoken is not None:
        from models.media import load_audio
        from models.transcriber import build_transcriber

        with _step(f"speech to text ({profile.transcriber.source})"):
            audio = load_audio(spoken, profile.limits)
            transcript = build_transcriber(profile.transcriber).transcribe(audio)
            print(f"   heard: {transcript.text.strip()!r}")

    if profile.audio_encoder is not None and spoken is not None:
        from models.encoders import build_audio_encoder

        with _step(f"audio encoder ({profile.audio_encoder.source})"):
            features = build_audio_encoder(profile.audio_encoder).encode([audio])
            print(f"   {spoken.name}: {tuple(features.shape[1:])} feature frames for the input projector")

    if profile.image_encoder is not None:
        from models.encoders import build_image_encoder
        from models.media import load_image

        with _step(f"image encoder ({profile.image_encoder.source})"):
            photo = EXAMPLES / "cat.jpg"
            encoder = build_image_encoder(profile.image_encoder)
            image = load_image(photo, profile.limits)
            features = encoder.encode([image])
            print(f"   {photo.name}: {tuple(features.shape[1:])} feature tokens for the input projector")
            if hasattr(encoder, "classify"):
                labels = ", ".join(f"{label} {score:.2f}" for label, score in encoder.classify([image], top_k=3)[0])
                print(f"   top labels: {labels}")

    if profile.embedder is not None:
        from models.embedder import build_embedder

        with _step(f"embeddings ({profile.embedder.source})"):
            notes = ["The cat sleeps on the warm windowsill.",
                     "Quarterly revenue grew by four percent.",
                     "Whisper turns speech into text."]
            query = "Where is the kitten napping?"
            vectors = build_embedder(profile.embedder).embed([query, *notes])
            scores = vectors[1:] @ vectors[0]
            best = int(scores.argmax())
            print(f"   query: {query!r}\n   best note: {notes[best]!r} (cosine {scores[best]:.2f}; "
                  f"others {', '.join(f'{s:.2f}' for i, s in enumerate(scores) if i != best)})")

    with _step("end-to-end path (input projector -> backbone)"):
        if not profile.input_projectors:
            print("   this profile has no input projectors")
        for modality in profile.input_projectors:
            try:
                mm.input_projector(modality)
                print(f"   {modality} input projector: trained weights loaded")
            except UntrainedProjectorError as exc:
                print(f"   {modality} input projector: not used — {exc}")
    return 0


TOUR = [
    # (what the user says, attachment, tools this turn may use (None: all), must it call one)
    ("Hi! What can you do?", None, None, False),
    ("Transcribe the attached recording.", ("audio", "question.wav"), ["transcribe"], True),
    (None, None, [], False),  # the transcribed question itself, answered from the notes
    ("Say this aloud: {answer}", None, ["speak"], True),
    ("What is in this photo?", ("image", "cat.jpg"), ["describe_image"], True),
]


def run_tour(profile_name: str | None, out: str) -> int:
    """Speech in, retrieval, a cited answer, speech out, and a photo: each turn's route printed."""
    import shutil

    from agent.config import AgentConfig
    from agent.runtime import Runtime, trace_lines

    out_dir = Path(out)
    data = out_dir / "data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh session and knowledge base each run
    from models.training.data import easy_vqa_shapes

    shape_image = next(item for item in easy_vqa_shapes("test") if item[2] == "circle")  # (path, colour, shape)
    config = AgentConfig(profile=profile_name, data_dir=data, allowed_dirs=[EXAMPLES.parent,
                                                                            Path(shape_image[0]).parent],
                         max_new_tokens=80, max_steps=2, history_turns=1)
    runtime = Runtime(config)
    print(f"profile {runtime.profile.name}: {runtime.profile.description}")
    with _step("knowledge base: ingest examples/notes"):
        print("   " + runtime.ingest([str(EXAMPLES.parent / "notes")]).summary().replace("\n", "\n   "))
    question, answer = None, None
    try:
        for said, attachment, tools, required in TOUR:
            text = said or question
            if said and "{answer}" in said:
                text = said.format(answer=answer)
            attachments = [{"kind": attachment[0], "path": str(EXAMPLES / attachment[1])}] if attachment else []
            with _step(f"you: {text}" + (f"  [+ {attachment[1]}]" if attachment else "")):
                result = runtime.controller.turn("demo-tour", text, attachments, tools=tools, require_tool=required)
                print(f"   assistant: {result.text}")
                for item in result.media:
                    print(f"   [{item['kind']}] {item['id']}: {item['path']}")
                if result.citations:
                    print("   sources: " + ", ".join(result.citations))
                print("   route:")
                print("\n".join("   " + line for line in trace_lines(result.trace)))
            if said and said.startswith("Transcribe"):
                question = _transcript(runtime, result) or "When is the team offsite?"
            elif question is not None and answer is None:
                answer = result.text or "I do not know."
        _shapes_tour(runtime, *shape_image)
    finally:
        runtime.close()
    return 0


def _shapes_tour(runtime, path: str, colour: str, shape: str) -> None:
    """The end-to-end path, chosen by the backbone with every tool on offer: it sees an image through
    its trained input projector, and draws through its signal tokens, output projector and generator."""
    from agent.runtime import trace_lines

    if runtime.profile.projector_weights is None:
        print("\n(the profile has no trained weights: skipping 'what shape is this?' and 'draw a red circle')")
        return
    for text, attachments in [("What shape is this?", [{"kind": "image", "path": str(path)}]),
                              ("Draw a red circle.", [])]:
        note = f"  [+ an easy-vqa test image: a {colour} {shape}]" if attachments else ""
        with _step(f"you: {text}{note}"):
            result = runtime.controller.turn(f"demo-shapes-{len(attachments)}", text, attachments)
            print(f"   assistant: {result.text}")
            for item in result.media:
                print(f"   [{item['kind']}] {item['id']}: {item['path']}")
            print("   route:")
            print("\n".join("   " + line for line in trace_lines(result.trace)))


def _transcript(runtime, result) -> str | None:
    """The text the transcribe tool returned this turn, from the session's tool messages."""
    from langchain_core.messages import ToolMessage

    for message in reversed(runtime.controller.state(result.session)["messages"]):
        if isinstance(message, ToolMessage) and message.name == "transcribe" and isinstance(message.artifact, dict):
            return str(message.artifact.get("text", "")).strip() or None
    return None


def run_demo(profile_name: str | None, out: str, components: bool = False) -> int:
    return run_components(profile_name, out) if components else run_tour(profile_name, out)


def demo(args) -> int:
    return run_demo(args.profile, args.out, components=args.components)
