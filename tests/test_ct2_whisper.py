"""The shipped CTranslate2 Whisper, converted back into an openai-whisper checkpoint."""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import numpy as np
import pytest

from models.assets import resolve
from models.errors import AssetError

pytestmark = pytest.mark.smoke

SENTENCE = "The quick brown fox jumps over the lazy dog. We will meet at the station tomorrow morning."


@pytest.fixture(scope="module")
def tiny_ct2() -> Path:
    return resolve("shipped:whisper-tiny.en")


@pytest.fixture(scope="module")
def converted(tiny_ct2, tmp_path_factory) -> Path:
    from models.ct2_whisper import convert_ct2_whisper

    return convert_ct2_whisper(tiny_ct2, tmp_path_factory.mktemp("tiny.en-pt"))


@pytest.fixture(scope="module")
def model(converted):
    import whisper

    return whisper.load_model(str(converted), device="cpu")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    from models.specs import SpeechSpec
    from models.speech import build_speech
    from models.transcriber import prepare_audio

    samples, rate = build_speech(SpeechSpec(source="shipped:piper-joe-medium")).synthesize(SENTENCE)
    assert rate == 22050
    return prepare_audio(samples, rate)


def _wer(reference: str, hypothesis: str) -> float:
    import jiwer
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    return jiwer.wer(normalize(reference), normalize(hypothesis))


def test_checkpoint_has_tiny_en_dims_and_loads_in_fp32(converted, model):
    import torch

    assert converted.name == "model.pt"
    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    assert checkpoint["dims"] == {
        "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
        "n_vocab": 51864, "n_text_ctx": 448, "n_text_state": 384, "n_text_head": 6, "n_text_layer": 4,
    }
    assert not model.is_multilingual  # tiny.en's vocabulary
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_alignment_heads_are_the_official_ones(converted):
    import base64
    import gzip

    import whisper

    from models.ct2_whisper import load_converted_whisper

    dump = whisper._ALIGNMENT_HEADS["tiny.en"]
    official = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool).reshape(4, 6)
    loaded = load_converted_whisper(converted)
    assert np.array_equal(loaded.alignment_heads.to_dense().numpy(), official)


def test_encoder_gives_1500_frames_and_matches_ctranslate2(model, tiny_ct2, speech):
    import ctranslate2
    import torch
    import whisper

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(speech)).unsqueeze(0)  # 30 s
    with torch.no_grad():
        ours = model.encoder(mel)
    assert ours.shape == (1, 1500, 384)
    assert ours.dtype == torch.float32

    reference = ctranslate2.models.Whisper(str(tiny_ct2), device="cpu", compute_type="float32")
    theirs = np.array(reference.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))
    ours = ours.numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 2e-3


def test_converted_model_transcribes_like_faster_whisper(model, speech):
    from models.specs import TranscriberSpec
    from models.transcriber import build_transcriber

    text = model.transcribe(speech, fp16=False, language="en")["text"]
    assert _wer(SENTENCE, text) <= 0.2, text

    faster = build_transcriber(TranscriberSpec(kind="faster_whisper", source="shipped:whisper-tiny.en"))
    reference = faster.transcribe(speech).text
    assert _wer(reference, text) <= 0.1, (reference, text)


@pytest.mark.parametrize("quantization", ["int8_float16", "int16", "bfloat16"])
def test_quantized_ct2_models_dequantize(quantization, tmp_path):
    """A small random Whisper through CTranslate2's own converter and back gives the same outputs."""
    import torch
    import whisper
    from ctranslate2.converters.transformers import WhisperLoader
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from models.ct2_whisper import convert_ct2_whisper

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=96, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    hf = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # nonzero biases and norms, so a mapping slip shows
        for name, parameter in hf.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    mel, tokens = torch.randn(1, 80, 3000), torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        want_audio = hf.model.encoder(mel).last_hidden_state
        want_logits = hf(input_features=mel, decoder_input_ids=tokens).logits

    # CTranslate2 quantizes the spec's arrays in place: give it a copy of the model
    spec = WhisperLoader().get_model_spec(copy.deepcopy(hf))
    spec.register_vocabulary([f"t{i}" for i in range(96)])
    spec.validate()
    spec.optimize(quantization=quantization)
    (tmp_path / "ct2").mkdir()
    spec.save(str(tmp_path / "ct2"))

    ours = whisper.load_model(str(convert_ct2_whisper(tmp_path / "ct2", tmp_path / "pt")), device="cpu")
    with torch.no_grad():
        audio = ours.encoder(mel)
        logits = ours.decoder(tokens, audio)
    assert (audio - want_audio).norm() / want_audio.norm() < 5e-3
    assert (logits - want_logits).norm() / want_logits.norm() < 2e-2


def _write_ct2(path: Path, spec: str, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """CTranslate2's model.bin writer (binary version 6), for files the converter must refuse."""
    ids = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}

    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    with open(path, "wb") as out:
        out.write(struct.pack("<I", 6) + string(spec) + struct.pack("<II", 3, len(variables)))
        for name, value in variables.items():
            out.write(string(name) + struct.pack("<B", value.ndim))
            out.write(struct.pack(f"<{value.ndim}I", *value.shape))
            out.write(struct.pack("<BI", ids[value.dtype.name], value.nbytes) + value.tobytes())
        out.write(struct.pack("<I", len(aliases)))
        for alias, target in aliases.items():
            out.write(string(alias) + string(target))


def test_refuses_what_is_not_a_whole_whisper_model(tiny_ct2, tmp_path):
    from models.ct2_whisper import convert_ct2_whisper, read_ct2_model

    with pytest.raises(AssetError, match="no model.bin"):
        convert_ct2_whisper(tmp_path / "nowhere", tmp_path / "out")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.bin").write_bytes(b"PK\x03\x04 this is a zip, not a model" * 4)
    with pytest.raises(AssetError, match="binary version"):
        convert_ct2_whisper(garbage, tmp_path / "out")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.bin").write_bytes((tiny_ct2 / "model.bin").read_bytes()[:100_000])
    with pytest.raises(AssetError, match="truncated"):
        convert_ct2_whisper(truncated, tmp_path / "out")

    spec, _, variables, aliases = read_ct2_model(tiny_ct2 / "model.bin", progress=False)
    assert spec == "WhisperSpec" and aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (3 * 384, 384)

    translator = tmp_path / "translator"
    translator.mkdir()
    _write_ct2(translator / "model.bin", "TransformerSpec", {"encoder/num_heads": np.array(8, np.int16)}, {})
    with pytest.raises(AssetError, match="not Whisper"):
        convert_ct2_whisper(translator, tmp_path / "out")

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    del variables["decoder/layer_2/attention/linear_1/bias"]
    _write_ct2(lacking / "model.bin", spec, variables, aliases)
    with pytest.raises(AssetError, match="decoder/layer_2/attention/linear_1/bias"):
        convert_ct2_whisper(lacking, tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()
