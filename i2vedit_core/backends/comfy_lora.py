"""Motion LoRA on ComfyUI's SVD UNet: activation-space adapters on the temporal-block Linears.

Every Linear a motion LoRA can adapt (the 12 per temporal block, `lora.TEMPORAL_LINEARS`) gets
its `forward` object-patched on the backend's clone, once, when the backend is built (the same objects for every
backend on one UNet, pointed at the running backend's `LoraState`: comfy_forwards). The patch
computes base(x) + scale * dropout(up(down(x))) (dropout on the branch output, as the official LoRA
and the diffusers backend do), reading the adapter from the backend's `LoraState`:
- activation space, not ComfyUI's weight wrappers (`add_weight_wrapper`), because a weight-space
  delta cannot express I2VEdit's dropout on the LoRA branch (COMFYUI_NOTES 5.2), and it would keep
  a full weight copy per adapted Linear alive for backward;
- the scale is absolute and travels per UNet call in `transformer_options[LORA_KEY]` = (scale, slot),
  as the attention pass does under CONTROLLER_KEY. The Linears never see transformer_options, so a
  DIFFUSION_MODEL wrapper on the clone (`lora_call_scope`) makes that call's value visible in a
  ContextVar for the duration of the call and resets it after. While training compiles the UNet, an
  APPLY_MODEL wrapper outside the compiled module pins the call's value on the state instead (`pinned`,
  `pin_lora_call`), where the Linears read it: torch <= 2.13 cannot trace ContextVar.get, and a graph
  break at each of the 192 Linears made a compiled training step slower than eager on an H200
  (docs/PERFORMANCE.md). 0 skips the branch, so the source forward is the exact base model, and
  nothing is re-merged or reloaded between forwards;
- attaching, loading or detaching only changes `LoraState`: the patches stay installed and pass
  straight through without an adapter.
Adapters are fp32 master weights on the load device; the branch computes in the activations' dtype
(the UNet's, or autocast's), 5 % faster per training step on an H200 (docs/PERFORMANCE.md). The scale
multiplies the up-projection's weight, and the dropped branch is added by one fused kernel on CUDA
(`branch_dropout`): both save passes over tensors as large as the Linear's output.
Files use the SGM paths of `lora.py`.
"""

import contextlib
from contextvars import ContextVar
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..branch_dropout import DropoutSeed, add_dropped
from ..lora import (SVD_TEMPORAL_SITES, TEMPORAL_LINEARS, LoraSpec, MotionLora, check_fits, check_rank_fits,
                    motion_lora_from_pairs)
from .twins import lora_down_init, lora_generator, needs_fresh_adapter

TEMPORAL_BLOCK_SUFFIX = ".time_stack.0"
LORA_KEY = "i2vedit_lora"  # transformer_options: (scale, slot) of this UNet call; also the wrapper's key
OUTSIDE_A_CALL = (1.0, "clip")  # a Linear called directly (no UNet call around it): the attached adapter
# The running UNet call's (scale, slot), set only by `lora_call`; a ContextVar, not an attribute of the
# state, so that a value never outlives the call that carried it.
CALL: ContextVar = ContextVar("i2vedit_lora_call", default=OUTSIDE_A_CALL)


class LoraCall(NamedTuple):
    """What the Linears of one UNet call read: its (scale, slot) and the seed of its dropped branches, which the
    call's checkpointed layers reuse when recomputed (branch_dropout.DropoutSeed)."""
    scale: float
    slot: str
    dropout: Optional[DropoutSeed]  # None: a fresh one at each use (compiled code, which uses F.dropout)


def as_call(value) -> LoraCall:
    """`value` as a LoraCall: a (scale, slot) pair gets a fresh dropout seed."""
    return value if isinstance(value, LoraCall) else LoraCall(float(value[0]), value[1], DropoutSeed())


class LoraState:
    """The adapter of a backend: {SGM Linear path: fp32 Parameter}, its spec and dropout switch.

    clip0: a second weight set {path: (down, up)} beside it (clip 0's LoRA, inference only), run
    instead of the adapter by calls whose slot is "clip0" (exact skip-interval, editing.py).
    """

    def __init__(self):
        self.spec: Optional[LoraSpec] = None
        self.down: Dict[str, torch.nn.Parameter] = {}
        self.up: Dict[str, torch.nn.Parameter] = {}
        self.clip0: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.dropout_active = False
        self.pinned: Optional[Tuple[float, str]] = None  # (scale, slot) of the compiled call or recomputation running now
        # False: the branch computes in the activations' dtype (the UNet's, or autocast's) from the fp32
        # master weights; True: activations upcast to fp32 first (slower, docs/PERFORMANCE.md "levers").
        self.full_precision = False

    def clear(self) -> None:
        self.spec, self.down, self.up, self.clip0 = None, {}, {}, {}

    def pair(self, path: str, slot: str = "clip"):
        if slot == "clip0":
            return self.clip0.get(path, (None, None))
        return self.down.get(path), self.up.get(path)

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for path in self.down for p in (self.down[path], self.up[path])]


class LoraForward:
    """Replacement `forward` of one adaptable Linear (not an nn.Module: no new state-dict keys)."""

    def __init__(self, module: torch.nn.Module, path: str, state: LoraState, site: int = 0):
        """site: this Linear's number among the adapted ones (its own dropout mask within a call)."""
        self.module, self.path, self.state, self.site = module, path, state, site

    def __call__(self, x, *args, **kwargs):
        out = type(self.module).forward(self.module, x, *args, **kwargs)
        state = self.state
        scale, slot, seed = as_call(current_call(state))
        if scale == 0:
            return out
        down, up = state.pair(self.path, slot)
        if down is None:
            return out
        dtype = down.dtype if state.full_precision else x.dtype
        up = up if scale == 1 else up * scale  # on the (out, rank) weight, not on the Linear-sized output
        delta = F.linear(F.linear(x.to(dtype), down.to(dtype)), up.to(dtype))
        if state.dropout_active and state.spec.dropout > 0:
            return add_dropped(out, delta, state.spec.dropout, seed, self.site)
        return out + delta.to(out.dtype)


@contextlib.contextmanager
def lora_call(value: Tuple[float, str]):
    """The Linears' (scale, slot) inside, with a dropout seed for the call: one UNet call (`lora_call_scope`)."""
    token = CALL.set(as_call(value))
    try:
        yield
    finally:
        CALL.reset(token)


def current_call(state: LoraState):
    """The running UNet call's LoraCall (or bare (scale, slot)): pinned on the state while compiled or
    recomputed, else the ContextVar's."""
    return state.pinned if state.pinned is not None else CALL.get()


@contextlib.contextmanager
def pinned(state: LoraState, value: Tuple[float, str]):
    """The Linears read `value` from `state` inside (a compiled UNet call, or a layer's recomputation)."""
    previous = state.pinned
    state.pinned = value
    try:
        yield
    finally:
        state.pinned = previous


def lora_call_scope(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper (UNetModel.forward's arguments; transformer_options is the sixth): the call's
    transformer_options[LORA_KEY] for the Linears while it runs."""
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options") or {}
    with lora_call(options.get(LORA_KEY, OUTSIDE_A_CALL)):
        return executor(*args, **kwargs)


def pin_lora_call(state: LoraState):
    """APPLY_MODEL wrapper (outside the compiled diffusion model; `comfy_compile`): pins the call's
    transformer_options[LORA_KEY] on `state` for the call."""
    def pin(executor, *args, **kwargs):
        options = args[5] if len(args) > 5 else kwargs.get("transformer_options") or {}
        scale, slot = options.get(LORA_KEY, OUTSIDE_A_CALL)
        # No seed object: the compiled Linears drop with F.dropout, and dynamo would guard on a new object per call.
        with pinned(state, LoraCall(float(scale), slot, None)):
            return executor(*args, **kwargs)
    return pin


def with_lora(transformer_options: dict, scale: float, slot: str = "clip") -> dict:
    """A copy of one call's transformer_options that runs the motion LoRA in `slot` ("clip": the attached
    one, "clip0": clip 0's inference-only set) at absolute `scale` (0 = base model). The wrapper is added
    when the options come from another MODEL (a guider's); the caller's dicts are not changed."""
    import comfy.patcher_extension as ext

    options = dict(transformer_options)
    options[LORA_KEY] = (float(scale), slot)
    wrappers = {kind: dict(by_key) for kind, by_key in options.get("wrappers", {}).items()}
    diffusion = wrappers.setdefault(ext.WrappersMP.DIFFUSION_MODEL, {})
    if lora_call_scope not in diffusion.get(LORA_KEY, []):
        diffusion[LORA_KEY] = list(diffusion.get(LORA_KEY, [])) + [lora_call_scope]
    options["wrappers"] = wrappers
    return options


def adaptable_linears(diffusion_model) -> Dict[str, torch.nn.Module]:
    """{SGM path: Linear} of all 12 Linears of every temporal block, in the official (and peft) order."""
    blocks = {path for path, _ in diffusion_model.named_modules() if path.endswith(TEMPORAL_BLOCK_SUFFIX)
              and hasattr(diffusion_model.get_submodule(path), "attn1")}  # not VideoResBlock's time_stack
    ordered = [s for s in SVD_TEMPORAL_SITES if s in blocks] + sorted(blocks - set(SVD_TEMPORAL_SITES))
    return {f"{site}.{linear}": diffusion_model.get_submodule(f"{site}.{linear}")
            for site in ordered for linear in TEMPORAL_LINEARS}


def forwards(linears: Dict[str, torch.nn.Module], state: LoraState) -> Dict[str, LoraForward]:
    """{object-patch name: LoraForward reading `state`} of every adaptable Linear (comfy_forwards installs them)."""
    return {f"diffusion_model.{path}.forward": LoraForward(module, path, state, site)
            for site, (path, module) in enumerate(linears.items())}


def install_call_scope(patcher) -> None:
    """The DIFFUSION_MODEL wrapper that makes each call's transformer_options[LORA_KEY] visible to the Linears."""
    import comfy.patcher_extension as ext

    patcher.add_wrapper_with_key(ext.WrappersMP.DIFFUSION_MODEL, LORA_KEY, lora_call_scope)


def targets(linears: Dict[str, torch.nn.Module], spec: LoraSpec) -> Dict[str, Tuple[int, int]]:
    """{SGM path: (out_features, in_features)} of the Linears `spec` adapts, in init order."""
    wanted = tuple("." + name for name in spec.linears)
    return {path: (m.out_features, m.in_features) for path, m in linears.items() if path.endswith(wanted)}


def attach(state: LoraState, linears: Dict[str, torch.nn.Module], spec: LoraSpec, device: torch.device,
           generator: Optional[torch.Generator] = None) -> None:
    """A fresh adapter: down ~ N(0, (1/r)^2) from `generator` in the diffusers backend's draw order, up = 0.

    Built outside inference mode (ComfyUI runs nodes under torch.inference_mode()): inference
    tensors could not be trained.
    """
    check_rank_fits(spec, targets(linears, spec))
    generator = lora_generator(generator)
    state.clear()
    with torch.inference_mode(False), torch.no_grad():
        for path, (out_features, in_features) in targets(linears, spec).items():
            down = lora_down_init((spec.rank, in_features), spec.rank, generator)
            state.down[path] = torch.nn.Parameter(down.to(device))
            state.up[path] = torch.nn.Parameter(torch.zeros(out_features, spec.rank, device=device))
    state.spec = spec


def export(state: LoraState, metadata: Optional[Dict[str, str]] = None) -> MotionLora:
    if state.spec is None:
        raise ValueError("no motion LoRA is attached: train one or load one first")
    pairs = {path: (state.down[path], state.up[path]) for path in state.down}
    return motion_lora_from_pairs(pairs, state.spec, metadata)


def load(state: LoraState, linears: Dict[str, torch.nn.Module], lora: MotionLora, device: torch.device,
         slot: str = "clip") -> None:
    """Copy `lora` into the adapter, attaching one of its shape first if the attached one differs.

    slot "clip0": into the second, inference-only weight set instead (`LoraState.clip0`).
    """
    if slot not in ("clip", "clip0"):
        raise ValueError(f"unknown LoRA slot {slot!r}: use 'clip' or 'clip0'")
    check_fits(lora, targets(linears, lora.spec))
    if slot == "clip0":
        with torch.inference_mode(False):
            state.clip0 = {path: tuple(t.to(device, torch.float32) for t in lora.pair(path))
                           for path in targets(linears, lora.spec)}
        return
    current = state.spec
    if needs_fresh_adapter(current, lora.spec):
        attach(state, linears, lora.spec, device)
    with torch.inference_mode(False), torch.no_grad():
        for path in state.down:
            down, up = lora.pair(path)
            state.down[path].copy_(down)
            state.up[path].copy_(up)
