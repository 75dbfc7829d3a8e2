"""Train a small text-to-image Stable Diffusion from scratch on (image, caption) pairs.

What the drawing proof's end-to-end path feeds: NExT-GPT keeps its generator frozen and aligns
the backbone to that generator's own text encoder. With no pretrained diffusion weights offline,
the generator is trained first, here, and saved as an ordinary `StableDiffusionPipeline` folder,
so `ImageGenerator` (and any diffusers user) loads it like any other.

Two phases, both with a progress bar and a loss curve (PNG) beside the weights:
1. the VAE (AutoencoderKL) learns to reconstruct the images (MSE plus a small KL term); its
   latents are then rescaled to unit variance (`scaling_factor`), as Stable Diffusion's are;
2. the UNet and the CLIP text encoder learn together to predict the noise of the latents,
   with 10% of captions dropped to "" so classifier-free guidance works at sampling time.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import ConfigError

# DDPM's linear betas, which suit small pixel-like latents better than SD's scaled_linear
_BETAS = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)


@dataclass
class GeneratorTraining:
    image_size: int = 32
    caption_tokens: int = 8  # CLIP positions, one per word
    vae_steps: int = 600
    unet_steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    caption_dropout: float = 0.1
    sample_steps: int = 25
    guidance: float = 4.0
    seed: int = 0


def word_tokenizer(captions: list[str], max_length: int):
    """One token per word of the captions (lower-cased), <unk> for any other: a 2-layer text
    encoder then reads "a blue triangle" as three symbols rather than composing 15 bytes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted({w for c in captions for w in c.lower().replace(".", " ").split()})
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _components(cfg: GeneratorTraining, captions: list[str]):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer(captions, cfg.caption_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=cfg.caption_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=cfg.image_size)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, scheduler


def pixels(images: list, size: int) -> torch.Tensor:
    """PIL images (or paths) as (B, 3, size, size) in [-1, 1]: what the VAE reads and writes."""
    from PIL import Image

    images = [Image.open(im) if isinstance(im, (str, Path)) else im for im in images]
    out = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _log(fp, step: int, loss: float, **extra) -> None:
    fp.write(json.dumps({"step": step, "loss": loss, **extra}) + "\n")
    fp.flush()


def train_image_generator(pairs: list[tuple[str, str]], out_dir: str | Path,
                          cfg: GeneratorTraining = GeneratorTraining(), *, progress: bool = True) -> Path:
    """Train on (image path, caption) pairs; returns the pipeline folder `out_dir/pipeline`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from models.training.plots import plot_losses

    if not pairs:
        raise ConfigError("the image generator needs at least one (image, caption) pair")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    captions = [c for _, c in pairs]
    tokenizer, text_encoder, vae, unet, scheduler = _components(cfg, captions)
    data = pixels([p for p, _ in pairs], cfg.image_size)

    # 1. the autoencoder
    vae_dir = out_dir / "vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    with open(vae_dir / "log.jsonl", "w") as log:
        for step in tqdm(range(1, cfg.vae_steps + 1), desc="generator: VAE", disable=not progress):
            batch = data[torch.randint(len(data), (cfg.batch_size,))]
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
            loss = F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 20 == 0 or step == cfg.vae_steps:
                _log(log, step, loss.item())
    plot_losses(vae_dir, "generator VAE: reconstruction")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i:i + 256]).latent_dist.mean for i in range(0, len(data), 256)])
    scale = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale

    # 2. the UNet and its text encoder
    unet_dir = out_dir / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    noise_schedule = DDPMScheduler(**_BETAS)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    warmup = max(1, cfg.unet_steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine down to 2%
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.unet_steps)))
        return max(min(1.0, step / warmup) * cosine, 0.02)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    unet.train()
    text_encoder.train()
    with open(unet_dir / "log.jsonl", "w") as log:
        bar = tqdm(range(1, cfg.unet_steps + 1), desc="generator: UNet", disable=not progress)
        for step in bar:
            index = torch.randint(len(latents), (cfg.batch_size,))
            texts = ["" if rng.random() < cfg.caption_dropout else captions[i] for i in index.tolist()]
            tokens = tokenizer(texts, padding="max_length", max_length=cfg.caption_tokens, truncation=True,
                               return_tensors="pt")
            states = text_encoder(tokens.input_ids).last_hidden_state
            clean = latents[index]
            noise = torch.randn_like(clean)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(index),))
            predicted = unet(noise_schedule.add_noise(clean, noise, t), t, encoder_hidden_states=states).sample
            loss = F.mse_loss(predicted, noise)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if step % 20 == 0 or step == cfg.unet_steps:
                _log(log, step, loss.item(), lr=schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{loss.item():.3f}")
    plot_losses(unet_dir, "generator UNet: noise prediction")

    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = out_dir / "pipeline"
    pipeline.save_pretrained(folder)
    return folder
