"""Tiny Whisper models in both file formats the audio path reads: openai-whisper `.pt` and transformers."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

# English-only vocabulary size: openai-whisper calls a model multilingual when n_vocab >= 51865,
# and its tokenizer needs one of the two real sizes to find its special tokens.
_ENGLISH_VOCAB = 51864


def build_openai_whisper(dest: Path) -> None:
    """`dest/tiny.pt` in openai-whisper's checkpoint format, loadable with `whisper.load_model(path)`."""
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=2,
        n_vocab=_ENGLISH_VOCAB, n_text_ctx=64, n_text_state=32, n_text_head=2, n_text_layer=2,
    )
    torch.manual_seed(0)
    model = Whisper(dims)
    # The decoder's positional embedding is created with torch.empty (real checkpoints overwrite it);
    # left alone it holds garbage and decoding yields NaNs.
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(std=0.01)
    dest.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, dest / "tiny.pt")


def build_hf_whisper(dest: Path) -> None:
    """A transformers Whisper folder (model + feature extractor) with a 64-token vocabulary."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32,
        encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=64,
        # the defaults point at ids of the real 51865-token vocabulary
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=[], begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(dest)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(dest)
