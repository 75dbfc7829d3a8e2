"""Decoding on the backbone: a continuous-batching scheduler over a KV cache of ragged rows, on
a copy of the model with its LoRA adapters merged, reusing the keys and values of shared prefixes."""

from models.decoding.decode_copy import decode_model, weights_version
from models.decoding.prefix_cache import PrefixCache
from models.decoding.scheduler import DecodeCancelled, DecodeRequest, DecodeScheduler, SchedulerClosed

__all__ = ["DecodeCancelled", "DecodeRequest", "DecodeScheduler", "PrefixCache", "SchedulerClosed", "decode_model",
           "weights_version"]
