"""A byte-level BPE tokenizer with no merges: every string encodes, nothing is downloaded."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(
    special_tokens: list[str] | None = None,
    *,
    model_max_length: int = 2048,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """256 byte tokens plus `special_tokens`; the first special token doubles as pad/bos/eos/unk."""
    specials = special_tokens or ["<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    first = specials[0]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=model_max_length,
        bos_token=first,
        eos_token=specials[1] if len(specials) > 1 else first,
        pad_token=first,
        unk_token=first,
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer
