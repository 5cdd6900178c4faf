"""Motion-LoRA files: ComfyUI key names, round trips, the official positional format, bad input."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from i2vedit_core.lora import (LoraSpec, MotionLora, check_fits, clip_fingerprint, load_motion_lora,
                               motion_lora_from_pairs, save_motion_lora, target_module_paths)

DATA = Path(__file__).parent / "data"
LINEARS = ["ff_in.net.0.proj", "ff_in.net.2", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
# The 16 SGM temporal-block paths, in the order the official code saved them (OFFICIAL_CODE_NOTES 5).
OFFICIAL_SITES = ([f"input_blocks.{i}.1.time_stack.0" for i in (1, 2, 4, 5, 7, 8)]
                  + [f"output_blocks.{i}.1.time_stack.0" for i in range(3, 12)] + ["middle_block.1.time_stack.0"])


@pytest.fixture(scope="module")
def real_shapes():
    """{sgm module path: (out, in)} of the 192 target Linears of the real SVD UNet."""
    keys = json.loads((DATA / "svd_unet_sgm_keys.json").read_text())
    return {f"{site}.{linear}": tuple(keys[f"{site}.{linear}.weight"]) for site in OFFICIAL_SITES for linear in LINEARS}


def random_lora(shapes, rank=2, seed=0, spec=None) -> MotionLora:
    gen = torch.Generator().manual_seed(seed)
    spec = spec or LoraSpec(rank=rank)
    pairs = {p: (torch.randn(rank, i, generator=gen), torch.randn(o, rank, generator=gen)) for p, (o, i) in shapes.items()}
    return motion_lora_from_pairs(pairs, spec, {"source_fingerprint": "abc123", "training": json.dumps({"steps": 7})})


def expected_comfy_keys(spec: LoraSpec):
    return {f"diffusion_model.{site}.{linear}.{suffix}" for site in OFFICIAL_SITES for linear in spec.linears
            for suffix in ("lora_up.weight", "lora_down.weight", "alpha")}


@pytest.mark.parametrize("attn1_only", [False, True])
def test_saved_keys_are_exactly_comfyui_names(tmp_path, attn1_only):
    from safetensors import safe_open
    from i2vedit_core.backends import diffusers_lora
    from i2vedit_core.tiny import tiny_unet
    unet = tiny_unet(seed=0, exact_keys=True)
    spec = LoraSpec(rank=4, attn1_only=attn1_only)
    diffusers_lora.attach_lora(unet, spec)
    path = tmp_path / "lora.safetensors"
    save_motion_lora(diffusers_lora.export_lora(unet), path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
        meta = f.metadata()
    assert keys == expected_comfy_keys(spec)
    assert len(keys) == 16 * len(spec.linears) * 3
    assert all(a.ndim == 0 and float(a) == 4.0 for a in alphas)  # alpha = rank: ComfyUI's scale is 1
    # ComfyUI derives `diffusion_model.<path>` from every `<path>.weight` of the real SGM state dict.
    real = json.loads((DATA / "svd_unet_sgm_keys.json").read_text())
    modules = {k.rsplit(".", 2)[0] if k.endswith(".lora_up.weight") else None for k in keys} - {None}
    assert all(m[len("diffusion_model."):] + ".weight" in real for m in modules)
    assert meta["rank"] == "4" and json.loads(meta["attn1_only"]) is attn1_only


def test_file_round_trip_is_bitwise_with_metadata(tmp_path, real_shapes):
    lora = random_lora(real_shapes, rank=2)
    path = tmp_path / "x.safetensors"
    save_motion_lora(lora, path)
    back = load_motion_lora(path)
    assert back.spec == lora.spec and back.source == str(path)
    assert back.weights.keys() == lora.weights.keys()
    assert all(torch.equal(back.weights[k], v) for k, v in lora.weights.items())
    assert back.metadata["source_fingerprint"] == "abc123" and json.loads(back.metadata["training"]) == {"steps": 7}
    check_fits(back, real_shapes)


def test_official_positional_file_converts_to_the_right_modules(tmp_path, real_shapes):
    lora = random_lora(real_shapes, rank=1, seed=3)
    items = []
    for site in OFFICIAL_SITES:
        for linear in LINEARS:
            down, up = lora.pair(f"{site}.{linear}")
            items += [up, down]
    path = tmp_path / "250_unet.pt"
    torch.save(items, path)
    converted = load_motion_lora(path)
    assert converted.spec.rank == 1 and not converted.spec.attn1_only
    assert converted.weights.keys() == lora.weights.keys()
    assert all(torch.equal(converted.weights[k], v) for k, v in lora.weights.items())
    # Real SVD shapes differ per Linear (e.g. attn2.to_k takes 1024, ff_in.net.0.proj gives 8C), so a wrong
    # position mapping cannot fit the real model.
    check_fits(converted, real_shapes)
    shuffled = items[2:4] + items[:2] + items[4:]
    torch.save(shuffled, path)
    with pytest.raises(ValueError, match="another model size"):
        check_fits(load_motion_lora(path), real_shapes)


def _write(tmp_path, lora, name="bad.safetensors"):
    path = tmp_path / name
    save_motion_lora(lora, path)
    return path


def test_other_rank_or_targets_than_asked_for(tmp_path, real_shapes):
    path = _write(tmp_path, random_lora(real_shapes, rank=2))
    with pytest.raises(ValueError, match=r"bad\.safetensors' has rank 2 .*rank 32"):
        load_motion_lora(path, expected=LoraSpec(rank=32))
    attn1 = {p: s for p, s in real_shapes.items() if ".attn1." in p}
    path = _write(tmp_path, random_lora(attn1, rank=2, spec=LoraSpec(rank=2, attn1_only=True)), "a1.safetensors")
    assert load_motion_lora(path).spec.attn1_only
    with pytest.raises(ValueError, match=r"a1\.safetensors.*targets attn1 q/k/v/out.*all 12 temporal"):
        load_motion_lora(path, expected=LoraSpec(rank=2))


def test_lora_for_another_model_size_or_topology(tmp_path, real_shapes):
    lora = load_motion_lora(_write(tmp_path, random_lora(real_shapes, rank=2)))
    half = {p: (o // 2, i // 2) for p, (o, i) in real_shapes.items()}
    with pytest.raises(ValueError, match=r"bad\.safetensors' does not fit .*another model size"):
        check_fits(lora, half)
    fewer = {p: s for p, s in real_shapes.items() if not p.startswith("middle_block")}
    with pytest.raises(ValueError, match=r"has no 'middle_block.1.time_stack.0.*12 extra, 0 missing"):
        check_fits(lora, fewer)


def test_truncated_and_corrupt_files(tmp_path, real_shapes):
    path = _write(tmp_path, random_lora(real_shapes, rank=2))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"bad\.safetensors' is corrupt or truncated"):
        load_motion_lora(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"bad\.safetensors' is corrupt or truncated"):
        load_motion_lora(path)
    official = tmp_path / "o.pt"
    torch.save([torch.zeros(2, 2)] * 4, official)
    official.write_bytes(official.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"o\.pt' is corrupt or truncated"):
        load_motion_lora(official)
    with pytest.raises(ValueError, match="does not exist"):
        load_motion_lora(tmp_path / "missing.safetensors")


class NotATensor:
    pass


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"payload": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt' is a pickle that holds more than tensors; it is refused"):
        load_motion_lora(path)
    raw = tmp_path / "raw.safetensors"  # a bare pickle under a safetensors name: sniffed, still refused
    raw.write_bytes(pickle.dumps({"payload": NotATensor()}))
    with pytest.raises(ValueError, match=r"raw\.safetensors"):
        load_motion_lora(raw)
    plain = tmp_path / "dict.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match=r"dict\.pt' holds a dict, not the official positional list of 384"):
        load_motion_lora(plain)
    short = tmp_path / "short.pt"
    torch.save([torch.zeros(2, 2)] * 10, short)
    with pytest.raises(ValueError, match=r"short\.pt' has 10 tensors; the official format has 384"):
        load_motion_lora(short)


def test_damaged_contents(tmp_path, real_shapes):
    from safetensors.torch import save_file
    good = random_lora(real_shapes, rank=2)

    def variant(name, edit, metadata=None):
        weights = dict(good.weights)
        edit(weights)
        path = tmp_path / name
        save_file(weights, str(path), metadata=metadata)
        return path

    key = "diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q"
    cases = [
        (variant("noalpha.safetensors", lambda w: w.pop(key + ".alpha")), "incomplete: 1 tensors missing"),
        (variant("alpha.safetensors", lambda w: w.update({key + ".alpha": torch.tensor(1.0)})), "expected the rank"),
        (variant("nan.safetensors", lambda w: w[key + ".lora_up.weight"].__setitem__(0, float("nan"))), "NaN"),
        (variant("meta.safetensors", lambda w: None, {"rank": "32"}), "says rank 32 but holds rank-2"),
        (variant("mixed.safetensors", lambda w: w.update({key + ".lora_down.weight": torch.zeros(3, 320),
                                                          key + ".lora_up.weight": torch.zeros(320, 3)})),
         "mixes ranks"),
        (variant("foreign.safetensors", lambda w: w.update({"lora_unet_x.lora_up.weight": torch.zeros(1)})),
         "not a motion LoRA in ComfyUI format"),
        (variant("spatial.safetensors", lambda w: w.update({
            "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": torch.zeros(1)})),
         "not a Linear of a temporal transformer block"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=rf"{path.name}.*{message}"):
            load_motion_lora(path)


def test_fingerprint_tells_clips_apart(clip):
    assert clip_fingerprint(clip) == clip_fingerprint(clip.clone())
    other = clip.clone()
    other[0, 0, 0, 0] += 1e-3
    assert clip_fingerprint(other) != clip_fingerprint(clip)
    assert len(target_module_paths(OFFICIAL_SITES, LoraSpec())) == 192
