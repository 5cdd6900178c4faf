"""Motion LoRA on the diffusers SVD UNet: peft adapters on the temporal transformer blocks.

The SVD UNet has no `add_adapter`, so peft's functional `inject_adapter_in_model` wraps the target
Linears in place (DIFFUSERS_NOTES 5.1). One adapter at a time; switching LoRAs copies weights into
the existing wrappers instead of reloading the model. Names cross the boundary as SGM paths
(`lora.py`'s file format) through `sgm_unet_keys.diffusers_key_to_sgm`.

Clip 0's LoRA can sit beside the clip's own as a second peft adapter (slot "clip0", inference only),
chosen per `denoise` call: exact skip-interval K/V of edited clip 0 (editing.py).

Dropout acts on the branch output, `dropout(up(down(x)))`, as the official LoRA does: peft's own
input dropout is replaced by an identity and the up-projection is an `OutputDropoutLinear`. While training
(eagerly; a compiled UNet keeps peft's forward, `peft_forwards`), each adapted Linear runs `FusedDropoutForward`
instead of peft's forward: the same sum, with the dropped branch added by branch_dropout's fused kernel on CUDA,
keyed on the UNet call's seed (`branch_dropout.CallSeeds`) and the Linear's site, as the ComfyUI backend's
LoraForward. A checkpointed layer's recomputation then redraws its
masks from that seed with no RNG state restored, so checkpointed training can be captured as a CUDA graph.
"""

import re
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..branch_dropout import CallSeeds, add_dropped
from ..lora import LoraSpec, MotionLora, check_fits, check_rank_fits, motion_lora_from_pairs
from .sgm_unet_keys import diffusers_key_to_sgm
from .twins import lora_down_init, lora_generator, needs_fresh_adapter

ADAPTER = "i2vedit_motion"
SLOTS = {"clip": ADAPTER, "clip0": "i2vedit_clip0"}  # LoRA slot -> peft adapter name


def target_regex(spec: LoraSpec) -> str:
    """peft `target_modules` regex (full match) for the spec's Linears in every temporal block."""
    linears = "|".join(re.escape(name) for name in spec.linears)
    return rf".*\.temporal_transformer_blocks\.\d+\.({linears})"


def lora_layers(unet, adapter: str = ADAPTER) -> Dict[str, torch.nn.Module]:
    """The peft-wrapped Linears carrying `adapter`, by diffusers module name."""
    return {name: m for name, m in unet.named_modules() if adapter in getattr(m, "lora_A", {})}


def adapter_of(slot: str) -> str:
    if slot not in SLOTS:
        raise ValueError(f"unknown LoRA slot {slot!r}: use one of {sorted(SLOTS)}")
    return SLOTS[slot]


class OutputDropoutLinear(torch.nn.Linear):
    """A LoRA projection (same parameters and keys as a bias-free Linear) with dropout on its output (the
    up-projection's; 0 for the down-projection).

    It computes in the input's dtype from its fp32 master weight (peft's own input upcast is switched off,
    `_branch_in_activation_dtype`): the branch then runs in bf16 in a bf16 UNet, as the ComfyUI backend's
    does, instead of in fp32. `full_precision` restores peft's fp32 branch (docs/PERFORMANCE.md, levers).
    """

    def __init__(self, in_features: int, out_features: int, p: float = 0.0):
        super().__init__(in_features, out_features, bias=False)
        self.dropout = torch.nn.Dropout(p)
        self.full_precision = False

    def forward(self, x):
        dtype = self.weight.dtype if self.full_precision else x.dtype
        return self.dropout(torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype)))


class FusedDropoutForward:
    """Training `forward` of one adapted Linear: base(x) + dropout(scale * up(down(x))) with the dropped branch
    added by `add_dropped` (keyed on the running call's seed and this Linear's site). The scale multiplies the
    (out, rank) up weight, not the Linear-sized output. peft's own forward runs where this one does not apply:
    inside torch.compile (inductor fuses F.dropout itself), an adapter switched off, or another adapter active
    (clip 0's, skip-interval)."""

    def __init__(self, layer: torch.nn.Module, site: int, seeds: CallSeeds):
        self.layer, self.site, self.seeds = layer, site, seeds

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        if (torch.compiler.is_compiling() or layer.disable_adapters or layer.merged or kwargs
                or list(layer.active_adapters) != [ADAPTER]):
            return type(layer).forward(layer, x, *args, **kwargs)
        base = layer.base_layer(x, *args)
        down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        dtype = down.weight.dtype if down.full_precision else x.dtype
        scale = layer.scaling[ADAPTER]
        weight = up.weight if scale == 1 else up.weight * scale
        delta = F.linear(F.linear(x.to(dtype), down.weight.to(dtype)), weight.to(dtype))
        p = up.dropout.p if up.dropout.training else 0.0
        return add_dropped(base, delta, p, self.seeds.current, self.site)


def attached_spec(unet) -> Optional[LoraSpec]:
    layers = lora_layers(unet)
    if not layers:
        return None
    first = next(iter(layers.values()))
    attn1_only = all(".attn1." in name for name in layers)
    return LoraSpec(rank=first.r[ADAPTER], attn1_only=attn1_only,
                    dropout=float(first.lora_B[ADAPTER].dropout.p))


def attach_lora(unet, spec: LoraSpec, generator: Optional[torch.Generator] = None) -> None:
    """Wrap the spec's Linears with a fresh fp32 adapter (replacing any attached one).

    Init as the official code: down ~ N(0, (1/r)^2) drawn from `generator`, up = 0, so the model's
    output is unchanged until training moves it.
    """
    from peft import LoraConfig, inject_adapter_in_model
    detach_lora(unet)
    check_rank_fits(spec, module_shapes(unet, spec))
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=target_regex(spec))
    device = next(unet.parameters()).device
    generator = lora_generator(generator)
    # peft and nn.Linear draw their own init from the global RNG (overwritten below); fork it so attaching
    # has no effect on other code.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
        for layer in lora_layers(unet).values():
            down = layer.lora_A[ADAPTER] = OutputDropoutLinear(layer.in_features, spec.rank).to(layer.weight.device)
            up = layer.lora_B[ADAPTER] = OutputDropoutLinear(spec.rank, layer.out_features, spec.dropout)
            layer.cast_input_dtype_enabled = False  # the branch casts itself (OutputDropoutLinear)
            layer.train(unet.training)  # peft builds its modules in train mode: dropout would act at inference
            down.float(), up.to(down.weight.device)  # LoRA weights train in fp32 whatever the base dtype
            init = lora_down_init(tuple(down.weight.shape), spec.rank, generator)
            down.weight.copy_(init.to(down.weight.device))
            up.weight.zero_()
            down.weight.requires_grad_(True), up.weight.requires_grad_(True)


def detach_lora(unet) -> None:
    """Put the plain Linears back (both slots); the base weights were never touched."""
    layers = {**lora_layers(unet, SLOTS["clip0"]), **lora_layers(unet)}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, layer.get_base_layer())
    config = getattr(unet, "peft_config", None)
    if isinstance(config, dict):
        for adapter in SLOTS.values():
            config.pop(adapter, None)
        if not config:
            del unet.peft_config  # peft warns about "multiple adapters" if an empty one is left behind


def lora_parameters(unet) -> List[torch.nn.Parameter]:
    return [p for layer in lora_layers(unet).values() for p in _adapter_params(layer)]


def export_lora(unet, metadata: Optional[Dict[str, str]] = None) -> MotionLora:
    """The attached adapter as a MotionLora (SGM-keyed, fp32, on the CPU)."""
    spec = attached_spec(unet)
    if spec is None:
        raise ValueError("no motion LoRA is attached: train one or load one first")
    pairs = {_sgm_path(unet, name): (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
             for name, layer in lora_layers(unet).items()}
    return motion_lora_from_pairs(pairs, spec, metadata)


def load_lora(unet, lora: MotionLora, slot: str = "clip") -> None:
    """Put `lora`'s weights into the UNet, attaching an adapter of its shape if the attached one differs.

    slot "clip0": a second, inference-only adapter beside the clip's own (denoise(..., lora_slot="clip0")).
    """
    check_fits(lora, module_shapes(unet, lora.spec))
    if adapter_of(slot) != ADAPTER:
        return _load_second(unet, lora, adapter_of(slot))
    current = attached_spec(unet)
    if needs_fresh_adapter(current, lora.spec):
        attach_lora(unet, lora.spec)
    with torch.no_grad():
        for name, layer in lora_layers(unet).items():
            down, up = lora.pair(_sgm_path(unet, name))
            layer.lora_A[ADAPTER].weight.copy_(down)
            layer.lora_B[ADAPTER].weight.copy_(up)


def _load_second(unet, lora: MotionLora, adapter: str) -> None:
    """An extra adapter of `lora`'s shape (no dropout, never trained), weights copied in."""
    from peft import LoraConfig, inject_adapter_in_model
    layers = lora_layers(unet, adapter)
    first = next(iter(layers.values()), None)
    if first is None or first.r[adapter] != lora.spec.rank or len(layers) != len(module_shapes(unet, lora.spec)):
        _remove_adapter(unet, adapter)
        config = LoraConfig(r=lora.spec.rank, lora_alpha=lora.spec.alpha, lora_dropout=0.0,
                            init_lora_weights=False, target_modules=target_regex(lora.spec))
        device = next(unet.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            inject_adapter_in_model(config, unet, adapter_name=adapter)
        _set_active(unet, ADAPTER)
    with torch.no_grad():
        for name, layer in lora_layers(unet, adapter).items():
            down, up = lora.pair(_sgm_path(unet, name))
            for container, weight in ((layer.lora_A, down), (layer.lora_B, up)):
                if not isinstance(container[adapter], OutputDropoutLinear):  # the branch in the activations' dtype
                    container[adapter] = OutputDropoutLinear(weight.shape[1], weight.shape[0]).to(layer.weight.device)
                container[adapter].float().requires_grad_(False)
                container[adapter].weight.copy_(weight)


def _remove_adapter(unet, adapter: str) -> None:
    for layer in lora_layers(unet, adapter).values():
        for container in (layer.lora_A, layer.lora_B, layer.lora_dropout):
            container.pop(adapter, None)
        layer.r.pop(adapter, None), layer.scaling.pop(adapter, None), layer.lora_alpha.pop(adapter, None)
    config = getattr(unet, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter, None)


def _set_active(unet, adapter: str) -> None:
    """Make `adapter` the one every wrapped Linear runs (peft skips layers without it: base output)."""
    for module in unet.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_active_adapter"):
            module._active_adapter = adapter


def module_shapes(unet, spec: LoraSpec) -> Dict[str, Tuple[int, int]]:
    """{sgm path: (out_features, in_features)} of the Linears the spec adapts in this UNet."""
    pattern = re.compile(target_regex(spec))
    shapes = {}
    for name, module in unet.named_modules():
        name = name[:-len(".base_layer")] if name.endswith(".base_layer") else name
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            shapes[_sgm_path(unet, name)] = (module.out_features, module.in_features)
    return shapes


def set_lora_enabled(unet, enabled: bool) -> None:
    """Switch the adapter on or off without touching its weights or their requires_grad."""
    layers = list(lora_layers(unet).values())
    _set_enabled(layers, [enabled] * len(layers))


@contextmanager
def use_lora_scale(unet, scale: float, slot: str = "clip"):
    """Run with the adapter of `slot` at absolute `scale` (1 = as trained), restoring the previous state after.

    An adapter switched off with `set_lora_enabled` stays off at any scale. Scale 0 switches the adapter off instead of multiplying by 0: the exact base model (the source
    branch), without the cost of the LoRA matmuls. No adapter attached: the base model, any scale.
    """
    adapter = adapter_of(slot)
    layers = list(lora_layers(unet, adapter).values())
    if adapter != ADAPTER and not layers and scale != 0:
        raise ValueError("no clip-0 LoRA is loaded: load_lora(lora_of_clip_0, slot='clip0') first")
    scalings = [layer.scaling[adapter] for layer in layers]
    enabled = [not layer.disable_adapters for layer in layers]
    if adapter != ADAPTER:
        _set_active(unet, adapter)
    try:
        if scale == 0:
            _set_enabled(layers, [False] * len(layers))
        for layer in layers:
            layer.set_scale(adapter, float(scale))
        yield
    finally:
        for layer, scaling in zip(layers, scalings):
            layer.scaling[adapter] = scaling
        _set_enabled(layers, enabled)
        if adapter != ADAPTER:
            _set_active(unet, ADAPTER)


def _set_enabled(layers, states) -> None:
    grads = [(m.weight, m.weight.requires_grad) for layer in layers
             for modules in (layer.lora_A, layer.lora_B) for m in modules.values()]
    for layer, on in zip(layers, states):
        if on == layer.disable_adapters:
            layer.enable_adapters(on)  # peft also flips requires_grad here; restored below
    for p, requires_grad in grads:
        p.requires_grad_(requires_grad)


@contextmanager
def lora_training(unet, seeds: CallSeeds):
    """Dropout of the adapter active for the duration, each adapted Linear running `FusedDropoutForward` with
    the seeds of `seeds`; the rest of the UNet stays in eval mode."""
    layers = list(lora_layers(unet).values())
    dropouts = [layer.lora_B[ADAPTER].dropout for layer in layers]
    for site, layer in enumerate(layers):
        layer.lora_B[ADAPTER].dropout.train()
        layer.forward = FusedDropoutForward(layer, site, seeds)
    try:
        yield
    finally:
        for module in dropouts:
            module.eval()
        for layer in layers:
            vars(layer).pop("forward", None)  # back to peft's forward


@contextmanager
def peft_forwards(unet):
    """peft's own forward on every adapted Linear for the duration, the training forwards put back after. For
    torch.compile, where FusedDropoutForward defers to peft's forward anyway (inductor fuses F.dropout itself),
    and where its presence costs a compile per clip: dynamo guards on the identity of a module's `forward`
    object, and each clip's training makes new ones (measured, docs/PERFORMANCE.md run 8)."""
    saved = {layer: vars(layer).pop("forward") for layer in lora_layers(unet).values() if "forward" in vars(layer)}
    try:
        yield
    finally:
        for layer, forward in saved.items():
            layer.forward = forward


def set_full_precision(unet, full_precision: bool) -> None:
    """The lever's A/B switch: True runs every LoRA branch in fp32 (the activations upcast, as peft does by
    default), False in the activations' dtype (the default)."""
    for module in unet.modules():
        if isinstance(module, OutputDropoutLinear):
            module.full_precision = bool(full_precision)


def _adapter_params(layer) -> List[torch.nn.Parameter]:
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


def _sgm_path(unet, diffusers_name: str) -> str:
    config = unet.config
    attention_up = [i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind]
    per_block = config.layers_per_block
    per_block = per_block if isinstance(per_block, int) else per_block[0]
    key = diffusers_key_to_sgm(diffusers_name + ".weight", per_block, attention_up)
    return key[:-len(".weight")]
