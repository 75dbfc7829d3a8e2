"""The LLM backbone: any transformers causal LM, taught two extra vocabularies.

- input placeholders `<image>`, `<audio>`, `<video>`: where projected features are spliced
  into the input embeddings (each placeholder becomes as many embeddings as its features);
- signal tokens `[IMG0]..[IMGn]`, `[AUD0]..`: what the model writes to ask for an output of
  that modality; their last hidden states are what the output projectors read.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.assets import resolve
from models.device import resolve_device, resolve_dtype
from models.errors import ConfigError, MediaError
from models.specs import BackboneSpec, LoraSpec

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
SIGNAL_PREFIXES = {"image": "IMG", "audio": "AUD"}
FEATURE = -1  # token-map value for positions that hold spliced features, not tokens
PAD = -2  # token-map value for padding


@contextmanager
def quiet_transformers():
    """No per-load progress bars or notices: loading prepared weights takes a second, and a chat
    session should start clean. Preparation (GGUF conversion) keeps its progress bar."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def signal_token_strings(modality: str, count: int) -> list[str]:
    return [f"[{SIGNAL_PREFIXES[modality]}{i}]" for i in range(count)]


@dataclass
class Inputs:
    """A padded batch ready for the LM. `token_map` says what each position holds."""

    embeds: torch.Tensor  # (B, L, d)
    attention_mask: torch.Tensor  # (B, L)
    token_map: torch.Tensor  # (B, L): token id, FEATURE or PAD
    labels: torch.Tensor | None  # (B, L), -100 where no loss


class Backbone(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, spec: BackboneSpec):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.signal_counts = dict(spec.signal_tokens)
        new_tokens = list(PLACEHOLDERS.values())
        for modality, count in self.signal_counts.items():
            new_tokens += signal_token_strings(modality, count)
        added = tokenizer.add_special_tokens({"additional_special_tokens": new_tokens},
                                             replace_extra_special_tokens=False)
        if added:
            # new rows start at the mean of the old ones, so untrained tokens are harmless
            with quiet_transformers():
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}
        self.signal_ids = {
            m: tokenizer.convert_tokens_to_ids(signal_token_strings(m, n)) for m, n in self.signal_counts.items()
        }
        self.new_token_ids = sorted(tokenizer.convert_tokens_to_ids(new_tokens))

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> Backbone:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve(spec.source)
        device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, device)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=spec.device_map)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"could not load a causal LM from {path}: {exc}") from None
        if tokenizer.chat_template is None:
            raise ConfigError(f"the tokenizer in {path} has no chat template; use a chat (instruct) model")
        if spec.device_map is None:
            model.to(device)
        model.eval()
        return cls(model, tokenizer, spec)

    # --- properties -------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else \
            self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return self.input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings().weight.dtype

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def new_token_embeddings(self) -> torch.Tensor:
        """The rows of the added tokens as the model sees them (LoRA's trainable-token deltas included)."""
        return self.input_embeddings()(torch.tensor(self.new_token_ids, device=self.device))

    # --- prompts ----------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        if self.spec.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.spec.system_prompt}, *messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    # --- splicing ---------------------------------------------------------------------------

    def splice(self, input_ids: list[int], features: dict[str, list[torch.Tensor]] | None = None,
               labels: list[int] | None = None) -> tuple[torch.Tensor, list[int], list[int] | None]:
        """Replace each placeholder by its features. Returns (embeds (L', d), token map, labels)."""
        features = features or {}
        by_id = {tid: m for m, tid in self.placeholder_ids.items()}
        wanted = {m: sum(1 for t in input_ids if by_id.get(t) == m) for m in PLACEHOLDERS}
        for modality in PLACEHOLDERS:
            given = len(features.get(modality, []))
            if given != wanted[modality]:
                raise MediaError(
                    f"the prompt has {wanted[modality]} {PLACEHOLDERS[modality]} placeholder(s) but "
                    f"{given} {modality} input(s) were given; give one {modality} per placeholder"
                )
        ids = torch.tensor(input_ids, device=self.device)
        text = self.input_embeddings()(ids)
        pieces, token_map, new_labels = [], [], []
        cursor = {m: 0 for m in PLACEHOLDERS}
        start = 0
        for pos, tid in enumerate(input_ids):
            if tid not in by_id:
                continue
            modality = by_id[tid]
            feat = features[modality][cursor[modality]]
            cursor[modality] += 1
            if feat.dim() != 2 or feat.shape[-1] != self.hidden_size:
                raise ValueError(f"{modality} features must be (T, {self.hidden_size}), got {tuple(feat.shape)}")
            pieces += [text[start:pos], feat.to(device=self.device, dtype=self.dtype)]
            token_map += input_ids[start:pos] + [FEATURE] * feat.shape[0]
            if labels is not None:
                new_labels += labels[start:pos] + [-100] * feat.shape[0]
            start = pos + 1
        pieces.append(text[start:])
        token_map += input_ids[start:]
        if labels is not None:
            new_labels += labels[start:]
        return torch.cat(pieces), token_map, (new_labels if labels is not None else None)

    def collate(self, items: list[tuple[torch.Tensor, list[int], list[int] | None]], *,
                padding_side: str = "right") -> Inputs:
        """Pad spliced sequences into a batch (left padding for generation, right for training)."""
        longest = max(embeds.shape[0] for embeds, _, _ in items)
        batch = len(items)
        embeds = torch.zeros(batch, longest, self.hidden_size, device=self.device, dtype=self.dtype)
        mask = torch.zeros(batch, longest, dtype=torch.long, device=self.device)
        token_map = torch.full((batch, longest), PAD, dtype=torch.long, device=self.device)
        with_labels = items[0][2] is not None
        labels = torch.full((batch, longest), -100, dtype=torch.long, device=self.device) if with_labels else None
        for row, (e, tmap, lab) in enumerate(items):
            n = e.shape[0]
            span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            embeds[row, span] = e
            mask[row, span] = 1
            token_map[row, span] = torch.tensor(tmap, device=self.device)
            if labels is not None:
                labels[row, span] = torch.tensor(lab, device=self.device)
        return Inputs(embeds, mask, token_map, labels)

    # --- running ----------------------------------------------------------------------------

    def forward(self, inputs: Inputs, *, output_hidden_states: bool = False):
        return self.model(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                          labels=inputs.labels, output_hidden_states=output_hidden_states)

    def labelled_loss(self, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token loss, last hidden states), with the LM head applied only where labels are.

        The head is a (vocab x d) matmul at every position; in MM training only the answer tokens
        carry loss, so computing logits for them alone saves most of that work.
        """
        hidden = self.model.get_decoder()(inputs_embeds=inputs.embeds,
                                          attention_mask=inputs.attention_mask).last_hidden_state
        targets = inputs.labels[:, 1:]
        keep = targets != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return loss, hidden

    def signal_states(self, hidden: torch.Tensor, token_map: torch.Tensor,
                      modality: str) -> list[tuple[int, int, torch.Tensor]]:
        """Hidden states of each complete signal span: [(row, start position, (n, d))]."""
        ids = self.signal_ids.get(modality)
        if not ids:
            return []
        n = len(ids)
        pattern = torch.tensor(ids, device=token_map.device)
        spans = []
        for row in range(token_map.shape[0]):
            starts = (token_map[row] == ids[0]).nonzero().flatten().tolist()
            for s in starts:
                if s + n <= token_map.shape[1] and torch.equal(token_map[row, s:s + n], pattern):
                    spans.append((row, s, hidden[row, s:s + n]))
        return spans

    # --- fine-tuning ------------------------------------------------------------------------

    def freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)

    def enable_lora(self, spec: LoraSpec | None = None) -> None:
        """Wrap the LM with LoRA adapters; the new tokens' embedding rows train too."""
        from peft import LoraConfig, get_peft_model

        spec = spec or self.spec.lora or LoraSpec()
        names = {name.rsplit(".", 1)[-1] for name, _ in self.model.named_modules()}
        missing = [m for m in spec.target_modules if m not in names]
        if missing:
            raise ConfigError(f"LoRA target modules {missing} are not in this model; it has e.g. "
                              f"{sorted(n for n in names if n.endswith('proj'))[:8]}")
        config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                            target_modules=spec.target_modules, trainable_token_indices=self.new_token_ids,
                            task_type="CAUSAL_LM")
        training = self.model.training
        with warnings.catch_warnings():  # peft reads transformers' renamed `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self.model = get_peft_model(self.model, config)
        self.model.train(training)  # new LoRA dropout layers would otherwise start in train mode

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return trainable, total
