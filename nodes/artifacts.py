"""What flows along the pack's own links (I2VEDIT_CLIPS, I2VEDIT_INVERSION, I2VEDIT_MOTION_LORA).

Plain host-free data: ComfyUI caches node outputs and hands the same object to every consumer,
so these are frozen and their tensors live on the CPU (large GPU tensors would stay pinned for
as long as the executor caches them). Consumers move what they need to their device.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch

from i2vedit_core.backends.base import Conditioning
from i2vedit_core.inversion import Inversion
from i2vedit_core.lora import MotionLora
from i2vedit_core.pipeline import PipelineSettings, PreparedVideo


@dataclass(frozen=True)
class SourceClips:
    """The source video split into clips. frames: (T, 3, H, W) in [-1, 1] at the source size."""
    frames: torch.Tensor
    video: PreparedVideo
    settings: PipelineSettings

    def describe(self) -> str:
        h, w = self.video.fit.working_hw
        return f"{len(self.frames)} frames in {len(self.video.clips)} clips at {w}x{h}"


@dataclass(frozen=True)
class InvertedVideo:
    """Inversions of every clip of `clips`, made by the model whose backend identity is `model_identity`."""
    clips: SourceClips
    inversions: Tuple[Inversion, ...]
    settings: PipelineSettings
    model_identity: str

    def on(self, device) -> List[Inversion]:
        return [move_inversion(inv, device) for inv in self.inversions]


@dataclass(frozen=True)
class MotionLoras:
    """One motion LoRA per clip, in clip order; losses: the training loss of every step, per clip."""
    loras: Tuple[MotionLora, ...]
    losses: Tuple[Tuple[float, ...], ...] = ()


def move_inversion(inversion: Inversion, device) -> Inversion:
    cond = inversion.cond
    moved = Conditioning(cond.image_embeds.to(device), cond.image_latents.to(device), cond.time_ids.to(device))
    return Inversion(inversion.sigmas, inversion.latents.to(device), moved)


def check_same_clips(inverted: InvertedVideo, loras: MotionLoras) -> None:
    """A LoRA set must have been trained on clips like the inverted ones (same count)."""
    count = len(inverted.clips.video.clips)
    if len(loras.loras) != count:
        raise ValueError(f"the motion LoRA set has {len(loras.loras)} clip LoRAs but the video has {count} clips: "
                         "train (or load) the motion LoRA with the same I2VEdit Source Clips settings")
