"""Tiny causal LMs (Llama- and Qwen2-style) with a ChatML byte tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from models.tiny.tokenizer import CHATML_TEMPLATE, byte_tokenizer

_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048)


def _save(model_class, config_class, dest: Path) -> None:
    tokenizer = byte_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"], chat_template=CHATML_TEMPLATE)
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **_SIZES,
    )
    model_class(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def build_llama(dest: Path) -> None:
    _save(LlamaForCausalLM, LlamaConfig, dest)


def build_qwen2(dest: Path) -> None:
    _save(Qwen2ForCausalLM, Qwen2Config, dest)
