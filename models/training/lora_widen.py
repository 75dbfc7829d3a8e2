"""Continue training from trained LoRA weights with a larger adapter, keeping what they learnt.

A LoRA update is B·A·(alpha/r). Stacking a trained rank-r adapter with fresh ranks (A random,
B zero) is one adapter of the larger rank whose update starts out equal to the trained one: the
trained A rows and B columns go in the first r slots, scaled so alpha/r of the new shape gives the
same update, and modules the old adapter did not touch start fresh. Training then goes on with
the capacity of the larger adapter (e.g. every linear layer, not only attention) from where the
trained one stopped.
"""

from __future__ import annotations

import torch

from models.errors import ConfigError
from models.specs import LoraSpec

PREFIX = "backbone.lora."


def widen_lora(old_state: dict[str, torch.Tensor], old: LoraSpec, backbone, new: LoraSpec) -> dict[str, torch.Tensor]:
    """`old_state` (a trained-weights dict, `backbone.lora.*` keys, rank `old.r`) as an adapter of
    shape `new` for `backbone` (which gets that adapter enabled). Other keys pass through."""
    from peft import get_peft_model_state_dict

    if new.r < old.r or not set(old.target_modules) <= set(new.target_modules):
        raise ConfigError(f"a wider adapter needs rank >= {old.r} and the modules {old.target_modules}; "
                          f"got rank {new.r} on {new.target_modules}")
    if not backbone.has_lora:
        backbone.enable_lora(new)
    fresh = get_peft_model_state_dict(backbone.model, save_embedding_layers=False)
    ratio = (old.alpha / old.r) / (new.alpha / new.r)  # the old B, in the new scaling
    widened = {k: v for k, v in old_state.items() if not k.startswith(PREFIX)}
    for key, value in fresh.items():
        value = value.detach().clone().float()
        trained = old_state.get(PREFIX + key)
        if trained is not None:
            trained = trained.float()
            if ".lora_A." in key:
                value[: old.r] = trained
            elif ".lora_B." in key:
                value[:, : old.r] = trained * ratio
            else:  # the new tokens' embedding deltas: the same shape
                value = trained
        widened[PREFIX + key] = value.contiguous()
    missing = [k for k in old_state if k.startswith(PREFIX) and k[len(PREFIX):] not in fresh]
    if missing:
        raise ConfigError(f"the trained adapter has weights this model lacks: {missing[:3]}")
    return widened
