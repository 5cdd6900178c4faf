"""SVD on diffusers: UNetSpatioTemporalConditionModel + AutoencoderKLTemporalDecoder + CLIP vision.

The CI backend: the whole algorithm runs on it with tiny random-weight models. Loading from
disk lives in `diffusers_loading.py`.
"""

from contextlib import ExitStack, contextmanager
from typing import Optional

import torch
from kornia.geometry.transform import resize

from ..branch_dropout import CallSeeds, triton
from ..schedule import edm_v_preconditioning
from .base import Conditioning
from .standalone import check_versions

check_versions()  # before anything touches diffusers/peft: a clear message instead of an AttributeError later
from .diffusers_attention import use_attention  # noqa: E402
from . import diffusers_lora  # noqa: E402
from .diffusers_checkpointing import checkpointing  # noqa: E402
from .diffusers_fast_layers import FastLayers  # noqa: E402
from .diffusers_lora import use_lora_scale  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DiffusersBackend:
    """Implements `SVDBackend` on diffusers modules (already on `device`, in their run dtype)."""

    def __init__(self, unet, vae, image_encoder, device: Optional[torch.device] = None):
        self.unet, self.vae, self.image_encoder = unet, vae, image_encoder
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.dtype = next(unet.parameters()).dtype
        self.latent_scale = float(vae.config.scaling_factor)
        self.clip_size = int(image_encoder.config.image_size)
        self.offload = False
        self.dropout_seeds = CallSeeds()  # the running UNet call's LoRA dropout seed (diffusers_lora)
        self.fast_layers = FastLayers(unet)  # set around each UNet call only
        for module in (unet, vae, image_encoder):
            module.eval().requires_grad_(False)

    @property
    def state_dtype(self) -> torch.dtype:
        """Latents and conditioning: float32, or float64 for a float64 model (base.state_float)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, chunk_size: int = 8, generator=None) -> torch.Tensor:
        vae_dtype = self.vae.dtype
        with self._on_device(self.vae) as vae:
            posteriors = [vae.encode(chunk.to(self.device, vae_dtype)).latent_dist
                          for chunk in frames.split(chunk_size)]
        mode = torch.cat([p.mode() for p in posteriors])
        if generator is None:
            return mode.to(self.state_dtype) * self.latent_scale
        # One draw for all frames, as a single `.sample(generator)` of the whole batch would make.
        std = torch.cat([p.std for p in posteriors])
        noise = torch.randn(mode.shape, generator=generator, device=generator.device, dtype=mode.dtype)
        return (mode + std * noise.to(mode.device)).to(self.state_dtype) * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        vae_dtype = self.vae.dtype
        frames = []
        with self._on_device(self.vae) as vae:
            for chunk in latents.split(chunk_size):
                z = (chunk / self.latent_scale).to(self.device, vae_dtype)
                frames.append(vae.decode(z, num_frames=len(chunk)).sample.float())
        return torch.cat(frames).clamp(-1, 1)

    @torch.no_grad()
    def image_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        # Same preprocessing as diffusers' SVD pipeline (its resize is kornia's, bitwise): antialiased
        # bicubic resize in [-1, 1] to the encoder's square size, no crop.
        pixels = resize(frames.float().to(self.device), (self.clip_size, self.clip_size), interpolation="bicubic",
                        align_corners=True, antialias=True)
        pixels = (pixels + 1) / 2
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        pixels = ((pixels - mean) / std).to(self.image_encoder.dtype)
        with self._on_device(self.image_encoder) as encoder:
            return encoder(pixels).image_embeds.to(self.state_dtype)

    def denoise(self, x: torch.Tensor, sigma: float, cond: Conditioning, attention=None,
                lora_scale: float = 1.0, lora_slot: str = "clip") -> torch.Tensor:
        if cond.batch_size != x.shape[0]:
            raise ValueError(f"conditioning batch {cond.batch_size} does not match latent batch {x.shape[0]}")
        pre = edm_v_preconditioning(sigma)
        x = x.to(self.device, self.state_dtype)
        model_in = torch.cat([x * pre.c_in, cond.image_latents.to(x)], dim=2)
        timestep = torch.as_tensor(pre.c_noise, dtype=torch.float32, device=self.device)
        with use_attention(self.unet, attention), use_lora_scale(self.unet, lora_scale, lora_slot), \
                self.dropout_seeds.call(), self.fast_layers.installed():
            v = self.unet(model_in.to(self.device, self.dtype), timestep,
                          encoder_hidden_states=cond.image_embeds.to(self.device, self.dtype),
                          added_time_ids=cond.time_ids.to(self.device, self.dtype), return_dict=False)[0]
        return pre.c_skip * x + pre.c_out * v.to(x.dtype)

    def identity(self) -> str:
        """A short fingerprint of the three models (configs, dtype, weight statistics), for cache keys."""
        import hashlib
        import json
        digest = hashlib.sha256(str(self.dtype).encode())
        for module in (self.unet, self.vae, self.image_encoder):
            config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
            # "_" entries are bookkeeping (load path, a list of defaults in set order, which varies
            # with each process's hash seed): they would give another key in another process.
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            # Sum and sum of squares of every tensor: touches all weights, one small copy to the host.
            with torch.no_grad():
                stats = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                                     for name, p in module.named_parameters() if "lora_" not in name])
            digest.update(stats.cpu().numpy().tobytes())
        return "diffusers-svd-" + digest.hexdigest()[:16]

    # Motion LoRA (`LoraBackend` in base.py): one peft adapter on the temporal blocks, switched in place.
    def attach_lora(self, spec, generator=None):
        diffusers_lora.attach_lora(self.unet, spec, generator)

    def detach_lora(self):
        diffusers_lora.detach_lora(self.unet)

    def lora_parameters(self):
        return diffusers_lora.lora_parameters(self.unet)

    def export_lora(self, metadata=None):
        return diffusers_lora.export_lora(self.unet, metadata)

    def load_lora(self, lora, slot: str = "clip"):
        diffusers_lora.load_lora(self.unet, lora, slot)

    def lora_training(self, gradient_checkpointing=False):
        """gradient_checkpointing: False, True, a level count or (level, kind) pairs (`memory.checkpointed_layers`)."""
        stack = ExitStack()
        stack.enter_context(diffusers_lora.lora_training(self.unet, self.dropout_seeds))
        stack.enter_context(checkpointing(self.unet, gradient_checkpointing, self.dropout_seeds))
        return stack

    def capturable_training(self, gradient_checkpointing=False) -> bool:
        """Whether a training step can be captured as a CUDA graph (training_graph.py): on CUDA, and the
        recomputation of checkpointed layers free of host RNG (the fused dropout keys on the call's device seed;
        without Triton, F.dropout's masks are redrawn from a restored RNG state, which a capture cannot do)."""
        return self.device.type == "cuda" and (triton is not None or not gradient_checkpointing)

    @contextmanager
    def compiled(self, backend: str = "inductor"):
        """The UNet runs through `torch.compile(backend=...)` inside (training.compiled_unet): static shapes,
        since training repeats one shape and a dynamic-shape graph would be slower."""
        previous = self.unet._compiled_call_impl  # nn.Module.compile's slot: a caller's own compile is kept
        self.unet.compile(backend=backend, dynamic=False)
        try:
            with diffusers_lora.peft_forwards(self.unet):
                yield
        finally:
            self.unet._compiled_call_impl = previous

    # Memory policy hooks (pipeline.memory_plan): free memory for "auto", offloading of VAE and CLIP.
    def free_memory(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0

    def set_offload(self, offload: bool) -> None:
        self.offload = bool(offload) and self.device.type == "cuda"
        for module in (self.vae, self.image_encoder):
            module.to("cpu" if self.offload else self.device)

    @contextmanager
    def _on_device(self, module):
        """`module` on the device for one call; back to the CPU afterwards when offloading."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
