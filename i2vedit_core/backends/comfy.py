"""SVD on ComfyUI's own objects: the `SVDBackend` protocol over MODEL, CLIP_VISION and VAE.

The inputs are what ComfyUI's `Image Only Checkpoint Loader` returns: MODEL (a ModelPatcher of
`model_base.SVD_img2vid`), CLIP_VISION (`comfy.clip_vision.ClipVisionModel`) and VAE
(`comfy.sd.VAE`). This is the only module of `i2vedit_core` that imports ComfyUI, and only
lazily, so the core still imports where ComfyUI is absent.

Conventions shared with the diffusers backend, so both give the same numbers on the same weights:
- latents are scaled by the model's latent format (SD15: x 0.18215) and float32;
- `Conditioning.time_ids` holds SVD's fps id (fps - 1); ComfyUI's `encode_adm` takes fps and
  subtracts 1, so it is given fps id + 1;
- the CLIP image embedding resizes the whole frame to the encoder's square size (antialiased
  bicubic, no crop, no 8-bit rounding), as diffusers' SVD pipeline and the official I2VEdit code
  do. ComfyUI's `SVD_img2vid_Conditioning` (`encode_image(crop=True)`) instead centre-crops to a
  square and rounds to 8 bits, which for a 16:9 frame drops the left and right 22 % of the
  picture: I2VEdit conditions on the whole frame, so this backend does too.

MODEL is never mutated: everything this backend adds lives on a clone (`self.patcher`): object
patches on the 32 attn1 modules (attention control, comfy_attention.py), on the temporal-block
Linears (motion LoRA, comfy_lora.py) and on the heavy UNet layers (gradient checkpointing,
comfy_training.py). They are installed once, pass straight through when unused, and ModelPatcher
applies them at load and removes them at unload (`release()`). The forward objects themselves are made once
per diffusion model and shared by every backend on it, each pointing them at its own state before its UNet
calls (comfy_forwards.py: a compiled UNet then compiles once per diffusion model and shape, not once per prompt).
"""

import hashlib
from typing import List, Optional

import torch
from kornia.geometry.transform import resize

from .. import branch_dropout
from ..training_graph import is_capturing
from . import comfy_attention, comfy_compile, comfy_forwards, comfy_lora, comfy_model_lora, comfy_training
from .base import Conditioning
from .comfy_attention import CONTROLLER_KEY

NOT_SVD_MODEL = ("MODEL is not a Stable Video Diffusion img2vid model ({found}): load an SVD checkpoint "
                 "(svd.safetensors / svd_xt.safetensors) with the Image Only Checkpoint Loader")
IDENTITY_SAMPLE = 4096  # elements hashed per sampled weight: enough to tell checkpoints apart, cheap to read


class ComfyBackend:
    """Implements `SVDBackend` on ComfyUI's MODEL, CLIP_VISION and VAE (see the module docstring)."""

    def __init__(self, model, clip_vision, vae, lora_from_model: bool = False):
        """lora_from_model: take a motion LoRA loaded onto MODEL (LoraLoaderModelOnly) as this backend's
        adapter (comfy_model_lora.py), in `model_lora`; `denoise(lora_scale=1)` then runs it."""
        check_svd_model(model)
        check_clip_vision(clip_vision)
        check_vae(vae)
        # Attention and LoRA patches go on this clone only; the caller's MODEL stays as given.
        self.patcher = model.clone()
        self.clip_vision, self.vae = clip_vision, vae
        unet = self.patcher.model.diffusion_model
        # The same forward objects for every backend on this UNet (comfy_forwards: no recompile per prompt).
        self.forwards = comfy_forwards.shared_forwards(unet)
        self.attn1, self.linears = self.forwards.attn1, self.forwards.linears
        if len(self.attn1) != 32:
            raise ValueError(NOT_SVD_MODEL.format(found=f"{len(self.attn1)} self-attention layers, SVD has 32"))
        self.lora = comfy_lora.LoraState()
        self.checkpointing = comfy_training.Switch(self.lora)
        self.model_lora = comfy_model_lora.take_motion_lora(self.patcher, self.linears) if lora_from_model else None
        self._incoming_patches = (bool(self.patcher.patches), str(self.patcher.patches_uuid))
        self.forwards.install(self.patcher)
        self.device = torch.device(self.patcher.load_device)
        self.latent_format = self.patcher.get_model_object("latent_format")
        self.latent_scale = float(self.latent_format.scale_factor)
        self.offload = False
        self._keep_loaded = None
        if self.model_lora is not None:
            self.load_lora(self.model_lora)

    # --- VAE ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, chunk_size: int = 8, generator=None) -> torch.Tensor:
        if generator is not None:  # ComfyUI's VAE.encode returns the posterior mode only
            raise ValueError("VAE posterior sampling (the official numerics' vae_sample) is not available on "
                             "ComfyUI's VAE: use the default numerics (VAE mode) in ComfyUI")
        # ComfyUI IMAGE layout (N, H, W, 3) in [0, 1]; VAE.encode maps it back to [-1, 1] itself.
        pixels = ((frames.float() + 1) / 2).movedim(1, -1)
        raw = torch.cat([self.vae.encode(chunk) for chunk in pixels.split(chunk_size)])
        return self.latent_format.process_in(raw.float()).to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        # One VAE.decode call per chunk: the SVD decoder mixes frames within a call, so chunks
        # must be the same as the diffusers backend's (num_frames = len(chunk)) to agree.
        raw = self.latent_format.process_out(latents.float())
        frames = [self.vae.decode(chunk).float() for chunk in raw.split(chunk_size)]
        return (torch.cat(frames).movedim(-1, 1) * 2 - 1).clamp(-1, 1).to(self.device)

    # --- CLIP vision -------------------------------------------------------------------------

    @torch.no_grad()
    def image_embedding(self, frames: torch.Tensor) -> torch.Tensor:
        import comfy.model_management

        clip = self.clip_vision
        comfy.model_management.load_model_gpu(clip.patcher)
        size = int(clip.image_size)
        # Whole frame, no crop (module docstring); kornia's resize is the one diffusers uses.
        pixels = resize(frames.float().to(clip.load_device), (size, size), interpolation="bicubic",
                        align_corners=True, antialias=True)
        mean = torch.tensor(clip.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(clip.image_std, device=pixels.device).view(1, 3, 1, 1)
        pixels = ((pixels + 1) / 2 - mean) / std
        # Same call as ClipVisionModel.encode_image; output index 2 is `image_embeds`.
        out = clip.model(pixel_values=pixels, intermediate_output=-2)
        return out[2].float().to(self.device)

    # --- denoiser ----------------------------------------------------------------------------

    def denoise(self, x: torch.Tensor, sigma: float, cond: Conditioning, attention=None,
                lora_scale: float = 1.0, lora_slot: str = "clip") -> torch.Tensor:
        """D(x, sigma | cond) through ComfyUI's own `apply_model` (v-prediction EDM preconditioning).

        attention: an AttentionPass; its `rows` name the role of each video (cond_or_uncond is set to
        match). lora_scale, lora_slot: the motion LoRA of this call (0 = base model), carried in its
        transformer_options (comfy_lora.with_lora) as the attention pass is.
        """
        if x.ndim != 5:
            raise ValueError(f"latents must be (B, F, 4, h, w), got shape {tuple(x.shape)}")
        batch, frames = x.shape[:2]
        if cond.batch_size != batch:
            raise ValueError(f"conditioning batch {cond.batch_size} does not match latent batch {batch}")
        chunks = [0] * batch  # without a pass every video is a "positive" chunk
        if attention is not None:
            if len(attention.rows) != batch:
                raise ValueError(f"the attention pass describes {len(attention.rows)} videos {tuple(attention.rows)}, "
                                 f"the latent batch has {batch}")
            chunks = comfy_attention.chunks_for(attention.rows)
        self.forwards.bind(self.checkpointing)  # also while capturing, which skips load()
        if not is_capturing():  # a captured training step replays with the model as loaded (training_graph.py)
            self.load(x.shape)
        elif getattr(self.patcher.model, "model_lowvram", False):
            raise RuntimeError("the UNet is partially loaded (ComfyUI's low-VRAM mode streams weights from the "
                               "CPU at each call), which a CUDA graph cannot replay")
        if comfy_training.trainable_now():
            model = self.patcher.model
            comfy_training.replace_inference_tensors(model, self.checkpointing.swapped,
                                                     self.checkpointing.tensor_slots(model))
        flat, inputs = self._unet_inputs(x, cond)
        sigmas = sigma_column(sigma, flat.shape[0], self.device)
        options = denoise_transformer_options(self.patcher, chunks, sigmas)
        if attention is not None:
            options[CONTROLLER_KEY] = attention
        inputs["transformer_options"] = comfy_lora.with_lora(options, lora_scale, lora_slot)
        out = call_apply_model(self.patcher, flat, sigmas, inputs, chunks)
        return out.float().view_as(x)

    def _unet_inputs(self, x: torch.Tensor, cond: Conditioning):
        """Frames flattened into ComfyUI's batch axis, plus SVD's concat latent, CLIP context and adm."""
        frames = x.shape[1]
        normal = comfy_training.normal  # inference-mode inputs cannot be saved for backward
        flat = normal(x.to(self.device, torch.float32).flatten(0, 1))
        inputs = dict(c_concat=normal(cond.image_latents.to(self.device, torch.float32).flatten(0, 1)),
                      c_crossattn=normal(cond.image_embeds.to(self.device).repeat_interleave(frames, 0)),
                      y=normal(self.adm(cond.time_ids).repeat_interleave(frames, 0)), num_video_frames=frames)
        return flat, inputs

    def adm(self, time_ids: torch.Tensor) -> torch.Tensor:
        """SVD's `y` vector (B, 768) from time ids [fps_id, motion_bucket_id, noise_aug] per video: what
        `encode_adm` builds (its Timestep embedder on each id, concatenated), computed where the ids are.
        encode_adm takes Python numbers, and reading them from the GPU would make the host wait for the
        GPU's queue at every UNet call."""
        ids = time_ids.detach().to(self.device, torch.float32)
        embed = self.patcher.model.embedder
        return torch.cat([embed(ids[:, i]) for i in range(3)], dim=1)  # float32, as timestep_embedding computes

    # --- motion LoRA (`LoraBackend`): activation-space adapters on the clone (comfy_lora.py) -----

    def attach_lora(self, spec, generator=None) -> None:
        comfy_lora.attach(self.lora, self.linears, spec, self.device, generator)

    def detach_lora(self) -> None:
        self.lora.clear()

    def lora_parameters(self) -> List[torch.nn.Parameter]:
        return self.lora.parameters()

    def export_lora(self, metadata=None):
        return comfy_lora.export(self.lora, metadata)

    def load_lora(self, lora, slot: str = "clip") -> None:
        comfy_lora.load(self.lora, self.linears, lora, self.device, slot)

    def lora_training(self, gradient_checkpointing=False):
        """Inference mode off (ComfyUI runs nodes inside it), LoRA dropout on, optional checkpointing
        (False, True, a level count or (level, kind) pairs: `memory.checkpointed_layers`)."""
        levels = len(self.patcher.model.diffusion_model.channel_mult)
        return comfy_training.training_mode(self.lora, self.checkpointing, gradient_checkpointing, levels,
                                            self.patcher.model)

    def capturable_training(self, gradient_checkpointing=False) -> bool:
        """Whether a training step can be captured as a CUDA graph (training_graph.py): on CUDA, the UNet wholly
        on the device, and the recomputation of checkpointed layers free of host RNG (the fused dropout keys on
        a device seed; without Triton, F.dropout's masks are redrawn from a restored RNG state, which a capture
        cannot do)."""
        if self.device.type != "cuda" or getattr(self.patcher.model, "model_lowvram", False):
            return False
        return branch_dropout.triton is not None or not gradient_checkpointing

    def compiled(self, backend: str = "inductor"):
        """The clone's UNet through torch.compile inside (training.compiled_unet; comfy_compile.py)."""
        return comfy_compile.compiled(self.patcher, self.lora, backend)

    # --- cache identity ----------------------------------------------------------------------

    def identity(self) -> str:
        """What the base weights are, for cache keys: every key and shape, plus strided samples of five
        weights (read from ModelPatcher's backups, so a LoRA merged by another clone does not count).
        A MODEL with weight patches from upstream (a LoRA loader) adds its patch set's uuid."""
        digest = hashlib.sha256(type(self.patcher.model).__name__.encode())
        state = self.patcher.model.diffusion_model.state_dict()
        names = sorted(state)
        for name in names:
            digest.update(f"{name}{tuple(state[name].shape)}{state[name].dtype};".encode())
        for index in sorted({0, len(names) // 4, len(names) // 2, 3 * len(names) // 4, len(names) - 1}):
            name = names[index]
            backup = self.patcher.backup.get("diffusion_model." + name)
            tensor = (backup.weight if backup is not None else state[name]).detach().flatten()
            step = max(1, tensor.numel() // IDENTITY_SAMPLE)
            digest.update(tensor[::step][:IDENTITY_SAMPLE].float().cpu().numpy().tobytes())
        patched, uuid = self._incoming_patches
        return "comfy-svd-" + digest.hexdigest()[:24] + (f"+patches-{uuid}" if patched else "")

    # --- ComfyUI memory management -----------------------------------------------------------

    def free_memory(self) -> int:
        """Free memory of the device as ComfyUI counts it (the memory policy's "auto" reads it)."""
        import comfy.model_management as mm

        return int(mm.get_free_memory(self.device))

    def set_offload(self, offload: bool) -> None:
        """Offloading: before the UNet loads, ComfyUI unloads every other model from the device (the VAE
        and CLIP vision come back on their next call). Without it ComfyUI still offloads under pressure."""
        self.offload = bool(offload)

    def _others_on_device(self, loaded) -> bool:
        """Another live model on this device (free_memory would unload it); collected or CPU ones do not count,
        so the 12gb tier does not call free_memory on every UNet call for nothing."""
        return any(m is not None and m is not self.patcher and torch.device(m.load_device) == self.device
                   for m in loaded)

    def load(self, latent_shape: Optional[torch.Size] = None) -> None:
        """Load the clone through ComfyUI's model management (respects its offloading); no-op if loaded."""
        import comfy.model_management as mm

        self.forwards.bind(self.checkpointing)
        loaded = mm.loaded_models()
        if self.patched_in(loaded):
            if self.offload and self.device.type == "cuda" and self._others_on_device(loaded):
                # The VAE or CLIP vision came back for a call (training's data, a decode): out again
                # through ComfyUI's own unloading, the UNet kept (LoadedModel compares by its model).
                if self._keep_loaded is None:  # once: each LoadedModel registers a finalizer on the patcher
                    self._keep_loaded = mm.LoadedModel(self.patcher)
                mm.free_memory(mm.get_total_memory(self.device), self.device, keep_loaded=[self._keep_loaded])
            return
        memory = 0
        if latent_shape is not None:
            memory = self.patcher.model.memory_required([latent_shape[0] * latent_shape[1], *latent_shape[2:]])
        if self.offload and self.device.type == "cuda":  # ComfyUI's own unloading, asked for everything
            mm.free_memory(mm.get_total_memory(self.device), self.device)
        mm.load_models_gpu([self.patcher], memory_required=memory)
        self.patcher.pre_run()

    def release(self) -> None:
        """Take the clone's patches off the shared modules with ModelPatcher's public `detach()` (what ComfyUI's
        own unloading calls): object patches and weights are restored from the backups it made, and the model
        goes to its offload device. Only while they are this clone's patches: if ComfyUI has since loaded another
        clone of the model, it already unpatched ours and the shared backups are that clone's.

        ComfyUI's loaded-model list is left to ComfyUI: an entry for this clone stays until ComfyUI drops it
        (the next load of any clone of this model, `free_memory`) or, once the clone is gone, switches it to the
        incoming MODEL (`LoadedModel._switch_parent`); both reload and repatch before use. The backend stays
        usable; the next `denoise` loads it again."""
        import comfy.model_management as mm

        self.forwards.unbind(self.checkpointing)
        # Our patches are on unless another clone of the model is loaded (ComfyUI loads one clone of a model at a
        # time), whose patches and backups those are. Also when ComfyUI dropped ours from its list part way through
        # loading another clone that then failed: our patches stayed on.
        others = any(m is not None and m is not self.patcher and m.is_clone(self.patcher) for m in mm.loaded_models())
        if self._probe_is_ours() and not others:
            self.patcher.detach()

    def patched_in(self, loaded=None) -> bool:
        """Whether this clone is the one ComfyUI has loaded and its object patches are on the shared modules (one
        probe: an attn1 forward). Every backend on this UNet patches the same forward objects (comfy_forwards), so
        the probe alone cannot tell clones apart; ComfyUI's loaded list holds one clone of a model at a time."""
        import comfy.model_management as mm

        loaded = mm.loaded_models() if loaded is None else loaded
        return self._probe_is_ours() and any(m is self.patcher for m in loaded)

    def _probe_is_ours(self) -> bool:
        path, (module, _) = next(iter(self.attn1.items()))
        return module.__dict__.get("forward") is self.patcher.object_patches.get(f"diffusion_model.{path}.forward")


# --- how the UNet is called ----------------------------------------------------------------------
# ComfyUI's sampler builds the per-call options in samplers._calc_cond_batch and
# sampler_helpers.prepare_model_patcher; our own samplers drive this backend, so it rebuilds the same
# options: the MODEL's transformer_options (other packs' attention patches), its wrappers and
# callbacks, cond_or_uncond, sigmas. The attention pass goes in under CONTROLLER_KEY of this per-call
# copy only (COMFYUI_NOTES 3.3: the stateless attn1 object patches read it there).


def sigma_column(sigma, batch: int, device) -> torch.Tensor:
    """sigma for each of `batch` rows, float32 on `device`; sigma a number, or a 0-d tensor (a captured step's)."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device, torch.float32).reshape(1).repeat(batch)
    return torch.full((batch,), float(sigma), dtype=torch.float32, device=device)


def denoise_transformer_options(patcher, cond_or_uncond: List[int], sigmas: torch.Tensor) -> dict:
    """A fresh nested copy of the patcher's transformer_options for one UNet call (never shared back)."""
    import comfy.model_patcher
    import comfy.patcher_extension as ext

    options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    transformer_options = options.setdefault("transformer_options", {})
    # As prepare_model_patcher does at sample time: APPLY_MODEL / DIFFUSION_MODEL wrappers of the
    # MODEL are looked up in transformer_options["wrappers"].
    ext.merge_nested_dicts(transformer_options.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    ext.merge_nested_dicts(transformer_options.setdefault("callbacks", {}), patcher.callbacks, copy_dict1=False)
    transformer_options["cond_or_uncond"] = list(cond_or_uncond)
    transformer_options["uuids"] = [None] * len(cond_or_uncond)
    transformer_options["sigmas"] = sigmas
    return transformer_options


def call_apply_model(patcher, x: torch.Tensor, sigmas: torch.Tensor, inputs: dict,
                     cond_or_uncond: List[int]) -> torch.Tensor:
    """`model.apply_model(x, sigmas, **inputs)`, through the MODEL's unet function wrapper if it has one."""
    model = patcher.model
    wrapper = patcher.model_options.get("model_function_wrapper")
    if wrapper is None:
        return model.apply_model(x, sigmas, **inputs)
    return wrapper(model.apply_model, {"input": x, "timestep": sigmas, "c": inputs,
                                       "cond_or_uncond": list(cond_or_uncond)})


def check_svd_model(model) -> None:
    """ValueError naming the fix unless `model` is a ModelPatcher of ComfyUI's SVD_img2vid."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(model, "clone"):
        raise ValueError(NOT_SVD_MODEL.format(found=f"got {type(model).__name__}, not a MODEL"))
    import comfy.model_base

    # Exact type: SV3D subclasses SVD_img2vid but conditions on camera poses, not on fps/motion.
    if type(inner) is not comfy.model_base.SVD_img2vid:
        raise ValueError(NOT_SVD_MODEL.format(found=f"it is {type(inner).__name__}"))


def check_clip_vision(clip_vision) -> None:
    if not all(hasattr(clip_vision, a) for a in ("model", "patcher", "image_size", "image_mean")):
        raise ValueError(f"CLIP_VISION input is a {type(clip_vision).__name__}: connect the CLIP_VISION output "
                         "of the Image Only Checkpoint Loader (SVD's own OpenCLIP ViT-H image encoder)")


def check_vae(vae) -> None:
    if not hasattr(vae, "encode") or getattr(vae, "first_stage_model", None) is None:
        raise ValueError("VAE input is missing or empty: connect the VAE output of the Image Only Checkpoint "
                         "Loader (the SVD checkpoint's own video VAE)")
    if getattr(vae, "latent_channels", 4) != 4:
        raise ValueError(f"VAE has {vae.latent_channels} latent channels, SVD needs 4: connect the VAE of the "
                         "SVD checkpoint (Image Only Checkpoint Loader)")


__all__: List[str] = ["ComfyBackend", "CONTROLLER_KEY", "check_svd_model", "check_clip_vision", "check_vae"]
