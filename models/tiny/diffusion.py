"""Tiny Stable Diffusion and AudioLDM-2 pipelines of the real diffusers/transformers classes.

Sizes follow diffusers' own `get_dummy_components()` in its pipeline tests, shrunk a little
further (fewer layers) so that a CPU builds one in seconds and denoises 32x32 in milliseconds.
Tokenizers are byte-level (see `models.tiny.tokenizer`): no vocabulary file is downloaded.
Every builder seeds its own RNG fork, so the same name gives the same weights and the caller's
random state is left alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.tiny.tokenizer import byte_tokenizer

# Stable Diffusion's own DDIM settings (steps_offset=1 too: diffusers warns about 0 as outdated)
_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)


def build_stable_diffusion(dest: Path) -> None:
    """StableDiffusionPipeline: 32x32 images from (77, 32) CLIP prompt embeddings."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # CLIP pads every prompt to 77 tokens; the byte tokenizer does the same when asked to.
    tokenizer = byte_tokenizer(["<|endoftext|>", "<|startoftext|>"], model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,  # latent side; the VAE doubles it, so images default to 32x32
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            sample_size=32,
        )
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                layer_norm_eps=1e-05,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest)


def _roberta_tokenizer(model_max_length: int):
    """CLAP's slot: AudioLDM2Pipeline branches on the tokenizer's class, so it must be a
    RobertaTokenizer; it wraps the byte tokenizer's backend unchanged."""
    from transformers import RobertaTokenizer

    specials = ["<pad>", "</s>", "<s>", "<unk>", "<mask>"]
    backend = byte_tokenizer(specials).backend_tokenizer
    return RobertaTokenizer(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        pad_token="<pad>", eos_token="</s>", sep_token="</s>", bos_token="<s>", cls_token="<s>",
        unk_token="<unk>", mask_token="<mask>",
    )


def _t5_tokenizer(model_max_length: int):
    """T5's slot must be a T5Tokenizer too (same class branch). transformers 5 rebuilds a
    T5Tokenizer as a Unigram model from its saved vocabulary, so a byte-level BPE backend would
    not survive `from_pretrained`; this is the character-level equivalent: one piece per
    printable Latin-1 character plus the word-start marker, anything else is <unk>."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 256)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(ch, -2.0) for ch in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_audioldm2(dest: Path) -> None:
    """AudioLDM2Pipeline: CLAP (16) + T5 (32) -> projection -> GPT2 (16, 8 new tokens) -> UNet ->
    8-bin mel VAE -> HiFi-GAN at 16 kHz with 4x upsampling (64 mel frames = 256 samples)."""
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
    )
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = _roberta_tokenizer(model_max_length=77)
    tokenizer_2 = _t5_tokenizer(model_max_length=32)
    clap_dim, t5_dim, gpt2_dim = 16, 32, 16
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = AudioLDM2UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            # per block: self-attention, then cross-attention to GPT2's and to T5's states
            cross_attention_dim=([None, gpt2_dim, t5_dim], [None, gpt2_dim, t5_dim]),
        )
        torch.manual_seed(0)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=1,
            out_channels=1,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
        )
        torch.manual_seed(0)
        text_config = ClapTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            layer_norm_eps=1e-05,
            projection_dim=clap_dim,
            # RoBERTa position ids count from the pad id, so it must be the tokenizer's
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_position_embeddings=77 + tokenizer.pad_token_id + 1,
        )
        audio_config = ClapAudioConfig(
            spec_size=64,
            window_size=4,
            num_mel_bins=64,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            depths=[2, 2],
            num_attention_heads=[2, 2],
            num_hidden_layers=2,
            hidden_size=192,
            projection_dim=clap_dim,
            patch_size=2,
            patch_stride=2,
            patch_embed_input_channels=4,
        )
        text_encoder = ClapModel(
            ClapConfig(text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=clap_dim)
        )
        torch.manual_seed(0)
        text_encoder_2 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), d_model=t5_dim, d_ff=37, d_kv=8, num_heads=2, num_layers=2,
                     pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id)
        )
        torch.manual_seed(0)
        language_model = GPT2Model(
            GPT2Config(n_embd=gpt2_dim, n_head=2, n_layer=2, vocab_size=1000, n_ctx=99, n_positions=99,
                       bos_token_id=0, eos_token_id=0)  # the pipeline feeds embeddings, never token ids
        )
        # read by the pipeline when the caller does not pass max_new_tokens (8 in AudioLDM-2 too)
        language_model.config.max_new_tokens = 8
        torch.manual_seed(0)
        projection_model = AudioLDM2ProjectionModel(
            text_encoder_dim=clap_dim, text_encoder_1_dim=t5_dim, langauge_model_dim=gpt2_dim
        )
        torch.manual_seed(0)
        vocoder = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=8,
                sampling_rate=16000,
                upsample_initial_channel=16,
                upsample_rates=[2, 2],
                upsample_kernel_sizes=[4, 4],
                resblock_kernel_sizes=[3, 7],
                resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
                normalize_before=False,
            )
        )
    pipe = AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        # only used to rank several waveforms per prompt against the text; defaults need no files
        feature_extractor=ClapFeatureExtractor(feature_size=64),
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        vocoder=vocoder,
    )
    pipe.save_pretrained(dest)
