"""Decoding on the backbone: a continuous-batching scheduler over a KV cache of ragged rows."""

from models.decoding.scheduler import DecodeCancelled, DecodeRequest, DecodeScheduler, SchedulerClosed

__all__ = ["DecodeCancelled", "DecodeRequest", "DecodeScheduler", "SchedulerClosed"]
