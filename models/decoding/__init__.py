"""Decoding on the backbone: a continuous-batching scheduler over a KV cache of ragged rows, on
a copy of the model with its LoRA adapters merged."""

from models.decoding.merged_lora import decode_model
from models.decoding.scheduler import DecodeCancelled, DecodeRequest, DecodeScheduler, SchedulerClosed

__all__ = ["DecodeCancelled", "DecodeRequest", "DecodeScheduler", "SchedulerClosed", "decode_model"]
