"""The motion LoRA (ALGORITHM.md section 4): which Linears it adapts, its shape, and its files.

One definition shared by every backend. Files are safetensors with the keys ComfyUI derives for
the SVD UNet (COMFYUI_NOTES 5.4): `diffusion_model.<sgm module path>.lora_up.weight` (out, r),
`.lora_down.weight` (r, in) and `.alpha` (= r, so ComfyUI's alpha/rank scale is 1), plus string
metadata. The official code's positional `.pt` list converts to the same thing.
Host-free: module paths here are SGM paths; backends map their own names onto them.
"""

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

KEY_PREFIX = "diffusion_model."
FORMAT_NAME = "i2vedit-motion-lora"
FORMAT_VERSION = "1"

# The 12 Linears of a temporal transformer block, in the official code's traversal order.
TEMPORAL_LINEARS = ("ff_in.net.0.proj", "ff_in.net.2", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
ATTN1_LINEARS = TEMPORAL_LINEARS[2:6]

# The 16 temporal blocks of SVD as SGM paths, in the order the official code saved them: diffusers'
# named_modules() order of its time, down blocks, then up blocks, then the mid block.
SVD_TEMPORAL_SITES = tuple([f"input_blocks.{i}.1.time_stack.0" for i in (1, 2, 4, 5, 7, 8)]
                           + [f"output_blocks.{i}.1.time_stack.0" for i in range(3, 12)]
                           + ["middle_block.1.time_stack.0"])

_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the motion LoRA. alpha is always the rank (scale 1), as in the official code."""
    rank: int = 32
    attn1_only: bool = False
    dropout: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def alpha(self) -> float:
        return float(self.rank)

    @property
    def linears(self) -> Tuple[str, ...]:
        """The adapted Linears inside each temporal block (suffixes of their module paths)."""
        return ATTN1_LINEARS if self.attn1_only else TEMPORAL_LINEARS

    def same_shape(self, other: "LoraSpec") -> bool:
        """True if adapters of both specs hold the same tensors (dropout only matters in training)."""
        return (self.rank, self.attn1_only) == (other.rank, other.attn1_only)


@dataclass
class MotionLora:
    """A motion LoRA held in memory in the file's form.

    weights: ComfyUI keys -> float32 CPU tensors. metadata: string entries besides the spec's
    (training settings, source fingerprint). source: where it came from, for error messages.
    """
    spec: LoraSpec
    weights: Dict[str, torch.Tensor]
    metadata: Dict[str, str] = field(default_factory=dict)
    source: str = "<in memory>"

    @property
    def module_paths(self) -> Tuple[str, ...]:
        return tuple(sorted({_split_key(k, self.source)[0] for k in self.weights}))

    def pair(self, module_path: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(down (r, in), up (out, r)) of one adapted module."""
        return (self.weights[KEY_PREFIX + module_path + ".lora_down.weight"],
                self.weights[KEY_PREFIX + module_path + ".lora_up.weight"])


def lora_keys(module_paths: Iterable[str]) -> set:
    """The file keys for adapters on these SGM module paths (ComfyUI's generic LoRA names)."""
    return {KEY_PREFIX + path + suffix for path in module_paths for suffix in _SUFFIXES}


def target_module_paths(sites: Iterable[str], spec: LoraSpec) -> Tuple[str, ...]:
    """SGM paths of the adapted Linears for temporal-block sites such as `input_blocks.1.1.time_stack.0`."""
    return tuple(f"{site}.{linear}" for site in sites for linear in spec.linears)


def motion_lora_from_pairs(pairs: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], spec: LoraSpec,
                           metadata: Optional[Dict[str, str]] = None, source: str = "<in memory>") -> MotionLora:
    """Build a MotionLora from {sgm module path: (down, up)}."""
    weights = {}
    for path, (down, up) in pairs.items():
        weights[KEY_PREFIX + path + ".lora_down.weight"] = down.detach().float().cpu().contiguous()
        weights[KEY_PREFIX + path + ".lora_up.weight"] = up.detach().float().cpu().contiguous()
        weights[KEY_PREFIX + path + ".alpha"] = torch.tensor(spec.alpha)
    return MotionLora(spec, weights, dict(metadata or {}), source)


def clip_fingerprint(frames: torch.Tensor) -> str:
    """A short hash of the source frames, so a saved LoRA can be matched to the clip it was trained on."""
    data = frames.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


# --- files -------------------------------------------------------------------------------------

def series_names(stem: str, count: int) -> List[str]:
    """File names of a video's motion LoRAs: `stem.safetensors` for one clip, else `stem_clip01of03.safetensors`, ...
    (what I2VEdit Save Motion LoRA writes and Load Motion LoRA reads back as one series)."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}_clip{k + 1:02d}of{count:02d}.safetensors" for k in range(count)]


def save_motion_lora(lora: MotionLora, path: str) -> None:
    from safetensors.torch import save_file
    check_consistent(lora)
    metadata = dict(lora.metadata)
    metadata.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, rank=str(lora.spec.rank),
                    alpha=str(lora.spec.alpha), dropout=str(lora.spec.dropout),
                    attn1_only=json.dumps(lora.spec.attn1_only), targets=json.dumps(list(lora.spec.linears)))
    save_file({k: v.contiguous() for k, v in lora.weights.items()}, os.fspath(path), metadata=metadata)


def load_motion_lora(path: str, expected: Optional[LoraSpec] = None) -> MotionLora:
    """Read a motion LoRA file: our safetensors format, or the official code's positional `.pt` list.

    The format is told from the file's content, not its name. `expected`, if given, must match the
    file's rank and targets. Every problem is a ValueError naming the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"motion LoRA file '{path}' does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save zip archive, or a bare pickle
        lora = load_official_lora(path)
    else:
        lora = _load_safetensors(path)
    if expected is not None and not expected.same_shape(lora.spec):
        raise ValueError(f"motion LoRA '{path}' has rank {lora.spec.rank} and targets {_describe(lora.spec)}, but "
                         f"rank {expected.rank} and targets {_describe(expected)} were asked for: pick the matching "
                         "file or change the LoRA settings")
    return lora


def load_official_lora(path: str, sites: Sequence[str] = SVD_TEMPORAL_SITES) -> MotionLora:
    """Convert the official code's `{step}_unet.pt` (a list [up0, down0, up1, down1, ...] of 16 blocks x 12
    Linears in traversal order, scale 1, no alpha) to a MotionLora."""
    path = os.fspath(path)
    try:
        items = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"motion LoRA '{path}' is a pickle that holds more than tensors; it is refused "
                         f"(only weights-only loading is allowed): convert it to safetensors ({error})") from error
    except Exception as error:  # zip/pickle parse errors come in many types
        raise ValueError(f"motion LoRA '{path}' is corrupt or truncated: could not read it as a torch file "
                         f"({type(error).__name__}: {error})") from error
    expected = 2 * len(TEMPORAL_LINEARS) * len(sites)
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in items):
        raise ValueError(f"motion LoRA '{path}' holds a {type(items).__name__}, not the official positional list "
                         f"of {expected} tensors: it is not an I2VEdit motion LoRA")
    if len(items) != expected:
        raise ValueError(f"motion LoRA '{path}' has {len(items)} tensors; the official format has {expected} "
                         f"({len(sites)} temporal blocks x {len(TEMPORAL_LINEARS)} Linears x up/down)")
    paths = target_module_paths(sites, LoraSpec())
    pairs = {p: (items[2 * i + 1], items[2 * i]) for i, p in enumerate(paths)}
    rank = _pair_rank(pairs, path)
    lora = motion_lora_from_pairs(pairs, LoraSpec(rank=rank), {"converted_from": "official positional .pt"}, path)
    check_consistent(lora)
    return lora


def _load_safetensors(path: str) -> MotionLora:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own error type for bad headers and short files
        raise ValueError(f"motion LoRA '{path}' is corrupt or truncated, or not a safetensors file "
                         f"({type(error).__name__}: {error})") from error
    weights = {k: v.float() for k, v in weights.items()}
    spec = _spec_from_weights(weights, metadata, path)
    lora = MotionLora(spec, weights, {k: v for k, v in metadata.items() if k not in _SPEC_METADATA}, path)
    check_consistent(lora)
    return lora


_SPEC_METADATA = {"format", "format_version", "rank", "alpha", "dropout", "attn1_only", "targets"}


# --- validation --------------------------------------------------------------------------------

def check_consistent(lora: MotionLora) -> None:
    """The tensors form complete, finite, rank-r pairs with alpha = r on the spec's targets."""
    where = f"motion LoRA '{lora.source}'"
    paths = lora.module_paths
    if not paths:
        raise ValueError(f"{where} holds no LoRA tensors")
    missing = sorted(lora_keys(paths) - set(lora.weights))
    if missing:
        raise ValueError(f"{where} is incomplete: {len(missing)} tensors missing, e.g. '{missing[0]}'")
    sites = sorted({_site_and_linear(p, where)[0] for p in paths})
    expected = set(target_module_paths(sites, lora.spec))
    if set(paths) != expected:
        odd = sorted(set(paths) ^ expected)
        raise ValueError(f"{where} adapts other Linears than a motion LoRA with targets {_describe(lora.spec)} "
                         f"(e.g. '{odd[0]}'): it was made with other targets or by another tool")
    rank = _pair_rank({p: lora.pair(p) for p in paths}, lora.source)
    if rank != lora.spec.rank:
        raise ValueError(f"{where} has rank-{rank} tensors but says rank {lora.spec.rank}: the file is damaged")
    for p in paths:
        alpha = lora.weights[KEY_PREFIX + p + ".alpha"]
        if alpha.numel() != 1 or float(alpha) != lora.spec.alpha:
            raise ValueError(f"{where}: alpha of '{p}' is {alpha.flatten()[:1].tolist()}, expected the rank "
                             f"{rank} (scale 1); rescale the LoRA so alpha = rank")
    if not all(bool(torch.isfinite(v).all()) for v in lora.weights.values()):
        raise ValueError(f"{where} contains NaN or infinite values: retrain or re-download it")


def check_fits(lora: MotionLora, shapes: Mapping[str, Tuple[int, int]]) -> None:
    """The LoRA fits a model whose targeted Linears have `shapes` {sgm path: (out_features, in_features)}."""
    where = f"motion LoRA '{lora.source}'"
    extra = sorted(set(lora.module_paths) - set(shapes))
    lacking = sorted(set(shapes) - set(lora.module_paths))
    if extra or lacking:
        example = f"the model has no '{extra[0]}'" if extra else f"no weights for '{lacking[0]}'"
        raise ValueError(f"{where} does not fit this model ({example}; {len(extra)} extra, {len(lacking)} missing "
                         "modules): it was made for another model or other targets")
    for path, (out_features, in_features) in shapes.items():
        down, up = lora.pair(path)
        if down.shape[1] != in_features or up.shape[0] != out_features:
            raise ValueError(f"{where} does not fit this model: '{path}' maps {down.shape[1]} -> {up.shape[0]} "
                             f"features but the model's Linear maps {in_features} -> {out_features}: "
                             "it is a LoRA for another model size")


def check_rank_fits(spec: LoraSpec, shapes: Mapping[str, Tuple[int, int]]) -> None:
    """A rank above a Linear's smaller side adds parameters that cannot raise the update's rank: refuse it."""
    if not shapes:
        raise ValueError("the model has none of the motion LoRA's target Linears: it is not an SVD UNet")
    width = min(min(shape) for shape in shapes.values())
    if spec.rank > width:
        raise ValueError(f"LoRA rank {spec.rank} is above the width {width} of the narrowest adapted layer: "
                         f"choose a rank <= {width} (paper: 32)")


def _pair_rank(pairs: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], source: str) -> int:
    ranks = set()
    for path, (down, up) in pairs.items():
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"motion LoRA '{source}': '{path}' has down {tuple(down.shape)} and up "
                             f"{tuple(up.shape)}, which do not form a LoRA pair (down (r, in), up (out, r))")
        ranks.add(down.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"motion LoRA '{source}' mixes ranks {sorted(ranks)}: the file is damaged")
    return ranks.pop()


def _spec_from_weights(weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> LoraSpec:
    paths = {_split_key(k, source)[0] for k in weights}
    linears = {_site_and_linear(p, f"motion LoRA '{source}'")[1] for p in paths}
    attn1_only = linears <= set(ATTN1_LINEARS)
    if not weights:
        raise ValueError(f"motion LoRA '{source}' holds no tensors")
    down = next(v for k, v in weights.items() if k.endswith(".lora_down.weight"))
    try:
        dropout = float(metadata.get("dropout", LoraSpec.dropout))
        spec = LoraSpec(rank=int(down.shape[0]), attn1_only=attn1_only, dropout=dropout)
    except (TypeError, ValueError) as error:
        raise ValueError(f"motion LoRA '{source}' has unusable metadata or shapes: {error}") from error
    if "rank" in metadata and metadata["rank"] != str(spec.rank):
        raise ValueError(f"motion LoRA '{source}' says rank {metadata['rank']} but holds rank-{spec.rank} "
                         "tensors: the file is damaged")
    return spec


def _split_key(key: str, source: str) -> Tuple[str, str]:
    for suffix in _SUFFIXES:
        if key.startswith(KEY_PREFIX) and key.endswith(suffix):
            return key[len(KEY_PREFIX):-len(suffix)], suffix
    raise ValueError(f"motion LoRA '{source}' has key '{key}', which is not "
                     f"'{KEY_PREFIX}<module>{{{', '.join(_SUFFIXES)}}}': not a motion LoRA in ComfyUI format")


def _site_and_linear(module_path: str, where: str) -> Tuple[str, str]:
    for linear in TEMPORAL_LINEARS:
        site = module_path[:-len(linear) - 1]
        if module_path.endswith("." + linear) and site.endswith(".time_stack.0"):
            return site, linear
    raise ValueError(f"{where} adapts '{module_path}', which is not a Linear of a temporal transformer block")


def _describe(spec: LoraSpec) -> str:
    return "attn1 q/k/v/out" if spec.attn1_only else "all 12 temporal Linears"
