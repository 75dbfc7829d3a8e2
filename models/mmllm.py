"""The MM-LLM: encoders -> input projectors -> backbone -> output projectors -> generators.

Only the backbone loads up front. Each modality's encoder, projectors and generator load the
first time that modality is used, once, so a text-only turn never pays for Stable Diffusion.

Trained parts (projectors, new-token embedding rows, LoRA adapters) live in one safetensors
file. For inference a projector must have trained weights there: running a random projector
would hand the user noise (NExT-GPT #124), so that is an error naming what is missing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models.backbone import PLACEHOLDERS, Backbone, count_parameters
from models.errors import ConfigError, UntrainedProjectorError
from models.input_projectors import build_input_projector
from models.loading import LOADING
from models.output_projectors import OutputProjector, alignment_loss
from models.specs import ProfileSpec

OUTPUT_MODALITIES = ("image", "audio")


@dataclass
class Example:
    """One training conversation, tokenized. Features are raw encoder outputs (cacheable)."""

    input_ids: list[int]
    labels: list[int]
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # per output modality, one conditioning target per signal span, in order of appearance
    targets: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class Losses:
    loss: torch.Tensor
    text: torch.Tensor
    alignment: torch.Tensor | None


@dataclass
class SignalSpan:
    modality: str
    start: int  # character offsets of the span's tokens in Generation.text
    end: int
    conditioning: dict[str, torch.Tensor] | None = None
    error: str | None = None  # why there is no conditioning (e.g. an untrained output projector)


@dataclass
class Generation:
    text: str  # what the backbone wrote, signal tokens included as [IMG0]..
    token_ids: list[int]
    spans: list[SignalSpan]
    prompt_tokens: int = 0  # positions the backbone read: text tokens and spliced media features
    generated_tokens: int = 0  # tokens it wrote, its end-of-turn token included
    truncated: bool = False  # it stopped at the token limit, not by ending its turn


class MMLLM(nn.Module):
    def __init__(self, profile: ProfileSpec, backbone: Backbone, *, require_trained: bool = True,
                 weights_dir: Path | None = None):
        super().__init__()
        self.profile = profile
        self.backbone = backbone
        self.require_trained = require_trained
        self.encoders: dict[str, nn.Module] = {}  # frozen; not submodules, so never saved
        self.generators: dict[str, object] = {}
        self.input_projectors = nn.ModuleDict()
        self.output_projectors = nn.ModuleDict()
        self._weights = self._read_weights(weights_dir)
        if self._weights:
            self._load_backbone_extras()
        self._decoder = None
        self._decoder_lock = threading.Lock()

    @classmethod
    def from_profile(cls, profile: ProfileSpec, *, require_trained: bool = True,
                     weights_dir: Path | None = None) -> MMLLM:
        return cls(profile, Backbone.from_spec(profile.backbone), require_trained=require_trained,
                   weights_dir=weights_dir)

    # --- trained weights --------------------------------------------------------------------

    def _weights_path(self, weights_dir: Path | None) -> Path | None:
        if self.profile.projector_weights is None:
            return None
        path = Path(self.profile.projector_weights).expanduser()
        if not path.is_absolute() and weights_dir is not None:
            path = weights_dir / path
        return path

    def _read_weights(self, weights_dir: Path | None) -> dict[str, torch.Tensor]:
        path = self._weights_path(weights_dir)
        self.weights_file = path
        if path is None or not path.exists():
            return {}
        from safetensors.torch import load_file

        return load_file(str(path))

    def _section(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self._weights.items() if k.startswith(prefix)}

    def _load_trained(self, module: nn.Module, prefix: str, what: str) -> None:
        state = self._section(prefix)
        if not state:
            if self.require_trained:
                where = self.weights_file or "no projector_weights file is set in the profile"
                raise UntrainedProjectorError(
                    f"the {what} has no trained weights ({where}); it would produce noise. "
                    "Train it with `signalgraph train`, or point projector_weights at a trained file"
                )
            return
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UntrainedProjectorError(
                f"the trained weights for the {what} in {self.weights_file} do not fit this profile: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}; retrain or fix the profile"
            )

    def _load_backbone_extras(self) -> None:
        rows = self._weights.get("backbone.new_token_embeddings")
        if rows is not None:
            ids = torch.tensor(self.backbone.new_token_ids, device=self.backbone.device)
            with torch.no_grad():
                self.backbone.input_embeddings().weight[ids] = rows.to(self.backbone.input_embeddings().weight)
        lora = self._section("backbone.lora.")
        if lora:
            from peft import set_peft_model_state_dict

            self.backbone.enable_lora()
            set_peft_model_state_dict(self.backbone.model, lora)

    def has_trained(self, side: str, modality: str) -> bool:
        """Whether this model has trained weights for its `side` ("input" or "output") projector of
        `modality`, and (for outputs) a generator to feed: a skill it has end to end."""
        if not self._section(f"{side}_projectors.{modality}."):
            return False
        return side == "input" or getattr(self.profile, f"{modality}_generator", None) is not None

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything training changes, and nothing frozen: what a checkpoint holds."""
        state = {f"input_projectors.{k}": v for k, v in self.input_projectors.state_dict().items()}
        state |= {f"output_projectors.{k}": v for k, v in self.output_projectors.state_dict().items()}
        state["backbone.new_token_embeddings"] = self.backbone.new_token_embeddings()
        if self.backbone.has_lora:
            from peft import get_peft_model_state_dict

            # the vocabulary was resized, so peft would save the whole embedding matrix too (226 MB
            # for SmolLM2); the new rows are saved above, the rest is frozen
            lora = get_peft_model_state_dict(self.backbone.model, save_embedding_layers=False)
            state |= {f"backbone.lora.{k}": v for k, v in lora.items()}
        # clone: peft's tensors can share storage, which safetensors refuses to write
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}

    def save_trained(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.trained_state(), str(path), metadata={"profile": self.profile.model_dump_json()})

    # --- lazily built parts -----------------------------------------------------------------

    def encoder(self, modality: str) -> nn.Module:
        with LOADING:
            return self._encoder(modality)

    def _encoder(self, modality: str) -> nn.Module:
        if modality not in self.encoders:
            from models import encoders

            if modality in ("image", "video"):
                if self.profile.image_encoder is None:
                    raise ConfigError(f"the profile {self.profile.name!r} has no image encoder, "
                                      f"so it cannot read {modality}")
                image = self.encoders.get("image") or encoders.build_image_encoder(self.profile.image_encoder)
                self.encoders["image"] = image
                if modality == "video":
                    self.encoders["video"] = encoders.VideoEncoder(image, frames=self.profile.video.frames)
            elif modality == "audio":
                if self.profile.audio_encoder is None:
                    raise ConfigError(f"the profile {self.profile.name!r} has no audio encoder")
                self.encoders["audio"] = encoders.build_audio_encoder(self.profile.audio_encoder)
            else:
                raise ConfigError(f"unknown input modality {modality!r}; use one of {', '.join(PLACEHOLDERS)}")
        return self.encoders[modality]

    def input_projector(self, modality: str) -> nn.Module:
        with LOADING:
            return self._input_projector(modality)

    def _input_projector(self, modality: str) -> nn.Module:
        # video frames go through the image encoder, and share its projector unless one is given
        key = modality if modality in self.profile.input_projectors else ("image" if modality == "video" else modality)
        if key not in self.input_projectors:
            spec = self.profile.input_projectors.get(key)
            if spec is None:
                raise ConfigError(f"the profile {self.profile.name!r} has no input projector for {modality}")
            in_dim = self.encoder("image" if key == "video" else key).hidden_size
            projector = build_input_projector(spec.type, in_dim, self.backbone.hidden_size)
            projector.to(device=self.backbone.device, dtype=torch.float32)
            self._load_trained(projector, f"input_projectors.{key}.", f"{key} input projector")
            self.input_projectors[key] = projector
        return self.input_projectors[key]

    def generator(self, modality: str):
        with LOADING:
            return self._generator(modality)

    def _generator(self, modality: str):
        if modality not in self.generators:
            from models import generators

            if modality == "image" and self.profile.image_generator is not None:
                self.generators[modality] = generators.build_image_generator(self.profile.image_generator)
            elif modality == "audio" and self.profile.audio_generator is not None:
                self.generators[modality] = generators.build_audio_generator(self.profile.audio_generator)
            else:
                raise ConfigError(f"the profile {self.profile.name!r} has no {modality} generator")
        return self.generators[modality]

    def output_projector(self, modality: str) -> OutputProjector:
        with LOADING:
            return self._output_projector(modality)

    def _output_projector(self, modality: str) -> OutputProjector:
        if modality not in self.output_projectors:
            spec = self.profile.output_projectors.get(modality)
            if spec is None:
                raise ConfigError(f"the profile {self.profile.name!r} has no output projector for {modality}")
            shapes = self.generator(modality).conditioning_shapes()
            projector = OutputProjector(spec, self.backbone.hidden_size,
                                        self.backbone.signal_counts[modality], shapes)
            projector.to(device=self.backbone.device, dtype=torch.float32)
            self._load_trained(projector, f"output_projectors.{modality}.", f"{modality} output projector")
            self.output_projectors[modality] = projector
        return self.output_projectors[modality]

    # --- encoding ---------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, modality: str, items: list) -> list[torch.Tensor]:
        """Raw encoder features, one (T, d_enc) tensor per item. Frozen, so cacheable."""
        if not items:
            return []
        encoder = self.encoder(modality)
        feats = encoder.encode(items)
        return [f.float().cpu() for f in feats]

    def project(self, modality: str, features: list[torch.Tensor]) -> list[torch.Tensor]:
        projector = self.input_projector(modality)
        device = self.backbone.device
        return [projector(f.to(device=device, dtype=torch.float32).unsqueeze(0))[0] for f in features]

    # --- training ---------------------------------------------------------------------------

    def forward(self, examples: list[Example], *, alignment_weight: float = 1.0) -> Losses:
        items = []
        for ex in examples:
            projected = {m: self.project(m, feats) for m, feats in ex.features.items() if feats}
            items.append(self.backbone.splice(ex.input_ids, projected, ex.labels))
        inputs = self.backbone.collate(items, padding_side="right")
        text, hidden = self.backbone.labelled_loss(inputs)
        align = None
        if any(ex.targets for ex in examples):
            align = self._alignment(hidden, inputs.token_map, examples)
        loss = text if align is None else text + alignment_weight * align
        return Losses(loss, text, align)

    def _alignment(self, hidden: torch.Tensor, token_map: torch.Tensor, examples: list[Example]) -> torch.Tensor | None:
        losses = []
        for modality in OUTPUT_MODALITIES:
            spans = self.backbone.signal_states(hidden, token_map, modality)
            if not spans:
                continue
            seen: dict[int, int] = {}
            states, targets = [], []
            for row, _, state in spans:
                index = seen.get(row, 0)
                seen[row] = index + 1
                row_targets = examples[row].targets.get(modality, [])
                if index < len(row_targets):
                    states.append(state.float())
                    targets.append(row_targets[index])
            if states:
                predicted = self.output_projector(modality)(torch.stack(states))
                target = {k: torch.stack([t[k] for t in targets]).to(hidden.device) for k in predicted}
                losses.append(alignment_loss(predicted, target))
        return torch.stack(losses).mean() if losses else None

    def parameter_counts(self) -> dict[str, tuple[int, int]]:
        """(trainable, total) per part, for the ~2% figure the survey quotes."""
        counts = {"backbone": count_parameters(self.backbone)}
        counts |= {f"encoder.{m}": count_parameters(e) for m, e in self.encoders.items() if m != "video"}
        counts |= {f"input_projector.{m}": count_parameters(p) for m, p in self.input_projectors.items()}
        counts |= {f"output_projector.{m}": count_parameters(p) for m, p in self.output_projectors.items()}
        return counts

    # --- inference --------------------------------------------------------------------------

    def _prompt(self, messages: list[dict], media: dict[str, list]) -> list[dict]:
        """Put missing placeholders at the start of the last user message (LLaVA's convention)."""
        messages = [dict(m) for m in messages]
        last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if last_user is None:
            raise ConfigError("a conversation needs at least one user message")
        text = "".join(m["content"] for m in messages)
        prefix = ""
        for modality, items in media.items():
            missing = len(items) - text.count(PLACEHOLDERS[modality])
            prefix += (PLACEHOLDERS[modality] + "\n") * max(missing, 0)
        last_user["content"] = prefix + last_user["content"]
        return messages

    @torch.no_grad()
    def generate(self, messages: list[dict], *, images: list | None = None, audios: list | None = None,
                 videos: list | None = None, max_new_tokens: int | None = None,
                 logits_processors: list | None = None, streamer=None,
                 stopping_criteria: list | None = None) -> Generation:
        """Greedy generation; signal spans come back with their projected conditioning.

        `logits_processors` run after the signal-span processor (e.g. constrained tool-call
        decoding); `streamer` is a transformers streamer that receives tokens as they come;
        `stopping_criteria` may end decoding early.
        """
        return self.generate_many([(messages, {"image": images, "audio": audios, "video": videos})],
                                  max_new_tokens=max_new_tokens, logits_processors=logits_processors,
                                  streamer=streamer, stopping_criteria=stopping_criteria)[0]

    @property
    def decoder(self):
        """The decode scheduler that every generation on this model shares (started on first use)."""
        from models.decoding import DecodeScheduler, PrefixCache, decode_model, weights_version

        with self._decoder_lock:
            if self._decoder is None:
                tokenizer = self.backbone.tokenizer
                eos = self.backbone.model.generation_config.eos_token_id
                stops = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
                self._decoder = DecodeScheduler(self.backbone.model, stop_ids={s for s in stops if s is not None},
                                                prefix_cache=PrefixCache())
            # LoRA merged for decoding, rebuilt (and reused prefixes dropped) when training changes a weight:
            # tensors count their in-place writes
            version = weights_version(self.backbone.model)
            dtype = self.profile.backbone.decode_dtype
            self._decoder.use(decode_model(self.backbone.model, None if dtype == "auto" else getattr(torch, dtype),
                                           version=version), version)
            return self._decoder

    @torch.no_grad()
    def generate_many(self, requests: list[tuple[list[dict], dict[str, list | None]]], *,
                      max_new_tokens: int | None = None, logits_processors: list | None = None, streamer=None,
                      stopping_criteria: list | None = None) -> list[Generation]:
        """Greedy generation for several (messages, {modality: items}), decoded together.

        The rows join the model's decode scheduler, beside generations from other threads; each
        row's answer is the same as from `generate` alone, and a prompt that starts like an
        earlier one (the session's last turn) reuses that one's keys and values. The rows are
        submitted together, so their prompts are computed in one step. Logits processors, a
        streamer and stopping criteria keep per-sequence state, so they follow one generation.
        """
        from models.decoding import DecodeRequest
        from models.decoding.signal_spans import SignalSpanProcessor

        if len(requests) != 1 and (streamer is not None or logits_processors or stopping_criteria):
            raise ConfigError("logits processors, a streamer and stopping criteria follow one generation; "
                              "use generate, one request at a time")
        decoder = self.decoder
        rows, submitted = [], []
        for messages, given in requests:
            media = {m: items for m, items in given.items() if items}
            prompt_ids = self.backbone.chat_ids(self._prompt(messages, media))
            features = {m: self.project(m, self.encode(m, items)) for m, items in media.items()}
            embeds, token_map, _ = self.backbone.splice(prompt_ids, features)
            rows.append((embeds, token_map, None))
            submitted.append(DecodeRequest(
                embeds, max_new_tokens or self.profile.backbone.max_new_tokens,
                [SignalSpanProcessor(self.backbone.signal_ids), *(logits_processors or [])], streamer,
                list(stopping_criteria or []), token_ids=token_map))
        futures = decoder.submit_all(submitted)
        stop = decoder.stop_ids
        out = []
        for row, request, future in zip(rows, submitted, futures, strict=True):
            new_ids = future.result()
            end = next((i for i, t in enumerate(new_ids) if t in stop), len(new_ids))  # the answer ends before it
            generation = self._with_spans(self.backbone.collate([row], padding_side="left"), new_ids[:end])
            generation.prompt_tokens, generation.generated_tokens = row[0].shape[-2], len(new_ids)
            generation.truncated = end == len(new_ids) and len(new_ids) >= request.max_new_tokens
            out.append(generation)
        return out

    def _with_spans(self, inputs, new_ids: list[int]) -> Generation:
        tokenizer = self.backbone.tokenizer
        # character offset of each token, so spans can point into the text
        offsets = [len(tokenizer.decode(new_ids[:i], skip_special_tokens=False)) for i in range(len(new_ids))]
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        spans: list[SignalSpan] = []
        wanted = [m for m in OUTPUT_MODALITIES if any(t in new_ids for t in self.backbone.signal_ids.get(m, []))]
        if not wanted:
            return Generation(text, new_ids, spans)
        ids = torch.tensor([new_ids], device=self.backbone.device)
        embeds = torch.cat([inputs.embeds, self.backbone.input_embeddings()(ids)], dim=1)
        mask = torch.cat([inputs.attention_mask, torch.ones_like(ids)], dim=1)
        token_map = torch.cat([inputs.token_map, ids], dim=1)
        hidden = self.backbone.model(inputs_embeds=embeds, attention_mask=mask,
                                     output_hidden_states=True).hidden_states[-1]
        prompt_len = inputs.embeds.shape[1]
        for modality in wanted:
            for _, start, state in self.backbone.signal_states(hidden, token_map, modality):
                first = start - prompt_len
                last = first + len(self.backbone.signal_ids[modality])
                end = offsets[last] if last < len(offsets) else len(text)
                try:
                    conditioning = self.output_projector(modality)(state.float().unsqueeze(0))
                except (UntrainedProjectorError, ConfigError) as exc:  # the text stands; say why no media
                    spans.append(SignalSpan(modality, offsets[first], end, None, str(exc)))
                    continue
                spans.append(SignalSpan(modality, offsets[first], end,
                                        {k: v[0] for k, v in conditioning.items()}))
        spans.sort(key=lambda s: s.start)
        return Generation(text, new_ids, spans)

