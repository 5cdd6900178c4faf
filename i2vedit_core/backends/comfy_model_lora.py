"""A motion LoRA that arrives on the MODEL (`LoraLoaderModelOnly`'s weight patches), moved to activation space.

Matched denoising runs the source forward on the base model and the edit forward with the LoRA, twice
per step: a weight-merged LoRA would have to be unmerged and merged again each time. So the backend's
clone of MODEL drops the plain "lora" weight patches on the temporal Linears a motion LoRA adapts and
carries them as its activation-space adapter instead (comfy_lora.py): up is scaled by the patch's
strength * alpha / rank, and `denoise(lora_scale=1)` then gives what the merged weights give. Other
weight patches (other LoRAs, other layers) stay merged as ComfyUI applies them.
"""

import uuid
from typing import Dict, Optional

import torch

from ..lora import ATTN1_LINEARS, LoraSpec, MotionLora, motion_lora_from_pairs

MIXED = ("the MODEL's patch on {key} is not a plain LoRA at model strength 1 ({why}): load the motion LoRA with "
         "LoraLoaderModelOnly (strength_model only) and put other patches after the I2VEdit nodes")


def take_motion_lora(patcher, linears: Dict[str, torch.nn.Module]) -> Optional[MotionLora]:
    """Remove the motion-LoRA weight patches from `patcher` (a clone) and return them as a MotionLora (None
    when there are none). ValueError naming the fix for patches that cannot be moved."""
    pairs, keys = {}, []
    for path in linears:
        key = f"diffusion_model.{path}.weight"
        entries = patcher.patches.get(key)
        if not entries:
            continue
        pairs[path] = _pair(key, entries)
        keys.append(key)
    if not pairs:
        return None
    ranks = {down.shape[0] for down, _ in pairs.values()}
    if len(ranks) != 1:
        raise ValueError(f"the MODEL's motion LoRA mixes ranks {sorted(ranks)}: load one motion LoRA file")
    attn1_only = all(path.endswith(tuple("." + name for name in ATTN1_LINEARS)) for path in pairs)
    for key in keys:  # the clone's own copy of the patch lists: the incoming MODEL keeps its patches
        del patcher.patches[key]
    patcher.patches_uuid = uuid.uuid4()
    spec = LoraSpec(rank=ranks.pop(), attn1_only=attn1_only, dropout=0.0)
    return motion_lora_from_pairs(pairs, spec, {"source": "MODEL weight patches"})


def _pair(key: str, entries):
    if len(entries) != 1:
        raise ValueError(MIXED.format(key=key, why=f"{len(entries)} patches"))
    strength, adapter, strength_model, offset, function = entries[0]
    weights = getattr(adapter, "weights", None)
    if getattr(adapter, "name", None) != "lora" or weights is None:
        raise ValueError(MIXED.format(key=key, why=f"a {getattr(adapter, 'name', type(adapter).__name__)} patch"))
    if strength_model != 1.0 or offset is not None or function is not None or any(w is not None for w in weights[3:]):
        raise ValueError(MIXED.format(key=key, why="model strength, offset, mid, DoRA or reshape"))
    up, down, alpha = weights[0].float().cpu(), weights[1].float().cpu(), weights[2]
    scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return down, up * scale
