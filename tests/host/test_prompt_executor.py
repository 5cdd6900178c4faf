"""An API-format graph through ComfyUI's PromptExecutor in process (COMFYUI_NOTES 7.2).

ComfyUI's node registry is filled as at start-up (comfy_extras, then custom nodes): this pack and
a test-only loader node that hands out the tiny SVD of conftest. The graph edits a constant-colour
video with the split nodes (Source Clips -> Invert -> Train -> Save LoRA -> Propagate -> Metrics) and
also runs the Inversion Sampler inside core SamplerCustomAdvanced, reconstructing with euler.
The shipped composable workflow (08) runs as the front-end queues it, with the tiny SVD for the checkpoint and
core ImageInvert standing in for its SD1.5 edit of frame 0 (stock ComfyUI nodes that need a real checkpoint).
"""

import asyncio
import sys
import types
from pathlib import Path

import pytest
import torch

from pack import REPO

sys.path.insert(0, str(REPO / "tools"))

LOADER = '''
import sys
class TinySVDLoader:
    RETURN_TYPES = ("MODEL", "CLIP_VISION", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    def load(self):
        parts = sys.modules["i2vedit_test_parts"].parts
        return parts["model"], parts["clip_vision"], parts["vae"]
NODE_CLASS_MAPPINGS = {"TinySVDLoader": TinySVDLoader}
'''


class StubServer:
    client_id = last_node_id = last_prompt_id = None
    sockets_metadata = {}

    def __init__(self):
        self.events, self.texts = [], []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((node_id, text))

    def queue_updated(self):
        pass


@pytest.fixture(scope="module")
def comfy_nodes(comfy_parts, tmp_path_factory):
    import folder_paths
    import nodes

    holder = types.ModuleType("i2vedit_test_parts")
    holder.parts = comfy_parts
    sys.modules[holder.__name__] = holder
    folder = tmp_path_factory.mktemp("custom_nodes")
    (folder / "tiny_svd_loader.py").write_text(LOADER)
    for name in ("output", "temp"):
        getattr(folder_paths, f"set_{name}_directory")(str(tmp_path_factory.mktemp(name)))
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)

    from workflow_format import preload_comfy_utils

    preload_comfy_utils()

    async def init():
        if "KarrasScheduler" not in nodes.NODE_CLASS_MAPPINGS:
            await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        assert await nodes.load_custom_node(str(folder / "tiny_svd_loader.py"))
        assert await nodes.load_custom_node(str(REPO))
    asyncio.run(init())
    yield dict(nodes=nodes, loras=loras)
    folder_paths.folder_names_and_paths["loras"][0].remove(str(loras))


def graph():
    L = ["1", 0], ["1", 1], ["1", 2]
    model, clip_vision, vae = L
    parts = dict(model=model, clip_vision=clip_vision, vae=vae)
    return {
        "1": {"class_type": "TinySVDLoader", "inputs": {}},
        "2": {"class_type": "EmptyImage", "inputs": dict(width=96, height=64, batch_size=3, color=0x336699)},
        "3": {"class_type": "EmptyImage", "inputs": dict(width=96, height=64, batch_size=1, color=0xcc3322)},
        "4": {"class_type": "I2VEditSourceClips", "inputs": dict(frames=["2", 0], frames_per_clip=2, overlap=1,
                                                                 working_width=64, working_height=64, fit="pad")},
        "5": {"class_type": "I2VEditInvert", "inputs": dict(parts, clips=["4", 0], steps=2, sarp=True,
                                                            sarp_scale=0.005, random_seed=1, memory="auto",
                                                            numerics="default")},
        "6": {"class_type": "I2VEditTrainMotionLora", "inputs": dict(parts, clips=["4", 0], training_steps=1, rank=2,
                                                                     learning_rate=5e-4, random_seed=0, memory="auto")},
        "7": {"class_type": "I2VEditSaveMotionLora", "inputs": dict(motion_lora=["6", 0], name="graph/motion",
                                                                    overwrite=True)},
        "8": {"class_type": "I2VEditPropagate", "inputs": dict(
            parts, inversion=["5", 0], edited_first_frames=["3", 0], motion_lora=["6", 0], preset="style", beta1=0.8,
            beta2=0.9, threshold_first=0.35, threshold_last=0.35, min_guidance=1.0, max_guidance=2.5, random_seed=0, memory="auto",
            paste_source=True)},
        "9": {"class_type": "I2VEditMetrics", "inputs": dict(source=["2", 0], output=["8", 0])},
        "10": {"class_type": "PreviewImage", "inputs": dict(images=["8", 1])},
        "11": {"class_type": "I2VEditEditVideo", "inputs": dict(
            parts, frames=["2", 0], edited_first_frame=["3", 0], frames_per_clip=2, overlap=1, working_width=64,
            working_height=64, fit="pad", steps=2, sarp=True, sarp_scale=0.005, numerics="official",
            train_motion_lora=False, training_steps=1, rank=2, learning_rate=5e-4, preset="local", beta1=0.5,
            beta2=0.8, threshold_first=0.35, threshold_last=0.35, min_guidance=1.0, max_guidance=2.5, memory="auto",
            random_seed=0, paste_source=True)},
        "12": {"class_type": "PreviewImage", "inputs": dict(images=["11", 0])},
        # The Inversion Sampler inside core SamplerCustomAdvanced, then euler back down.
        "20": {"class_type": "SVD_img2vid_Conditioning", "inputs": dict(
            clip_vision=clip_vision, init_image=["3", 0], vae=vae, width=64, height=64, video_frames=2,
            motion_bucket_id=127, fps=6, augmentation_level=0.0)},
        "21": {"class_type": "VAEEncode", "inputs": dict(pixels=["2", 0], vae=vae)},
        "22": {"class_type": "KarrasScheduler", "inputs": dict(steps=2, sigma_max=700.0, sigma_min=0.002, rho=7.0)},
        "23": {"class_type": "FlipSigmas", "inputs": dict(sigmas=["22", 0])},
        "24": {"class_type": "CFGGuider", "inputs": dict(model=model, positive=["20", 0], negative=["20", 1], cfg=1.0)},
        "25": {"class_type": "DisableNoise", "inputs": {}},
        "26": {"class_type": "I2VEditInversionSampler", "inputs": {}},
        "27": {"class_type": "SamplerCustomAdvanced", "inputs": dict(noise=["25", 0], guider=["24", 0],
                                                                     sampler=["26", 0], sigmas=["23", 0],
                                                                     latent_image=["21", 0])},
        "28": {"class_type": "SaveLatent", "inputs": dict(samples=["27", 0], filename_prefix="inverted")},
    }


def execute(prompt, monkeypatch):
    """Validate and run `prompt` as a running ComfyUI does; (executor, the stub server that got its messages)."""
    import execution
    import server as comfy_server

    server = StubServer()
    monkeypatch.setattr(comfy_server.PromptServer, "instance", server, raising=False)  # as a running ComfyUI has

    async def run():
        valid = await execution.validate_prompt("p1", prompt, None)
        assert valid[0], valid[1:]
        executor = execution.PromptExecutor(server)
        await executor.execute_async(prompt, "p1", {}, valid[2])
        return executor
    return asyncio.run(run()), server


def test_graph_runs_end_to_end(comfy_nodes, monkeypatch):
    executor, server = execute(graph(), monkeypatch)
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success, errors
    outputs = executor.history_result["outputs"]
    assert set(outputs) >= {"7", "9", "10", "12", "28"}
    assert len(outputs["12"]["images"]) == 3  # Edit Video (official numerics, no LoRA): the video's 3 frames
    saved = outputs["7"]["text"][0].split("\n")
    assert saved == ["graph/motion_clip01of02.safetensors", "graph/motion_clip02of02.safetensors"]
    assert all((comfy_nodes["loras"] / name).is_file() for name in saved)
    assert "warp_error" in outputs["9"]["text"][0]
    assert len(outputs["10"]["images"]) == 3  # the difference map has the video's 3 frames
    # Node text through ComfyUI's progress text, shown under the node by the front-end.
    texts = {}
    for node, text in server.texts:
        texts.setdefault(node, []).append(text)
    assert texts["6"][0].startswith("train · clip 1/2") and texts["6"][-1].startswith("done in ")
    assert "edit · clip 2/2 · step 1/2 · ETA" in "\n".join(texts["8"]) and texts["8"][-1].startswith("done in ")
    assert texts["7"] == ["saved:\n" + "\n".join(saved)]
    assert texts["9"][0].splitlines()[0].startswith("warp_error: ") and "{" not in texts["9"][0]


def test_inversion_sampler_matches_stock_euler_on_flipped_sigmas(comfy_nodes, comfy_parts):
    """Our sampler integrates the same probability-flow ODE as core euler run up a FlipSigmas schedule."""
    import comfy.samplers

    from pack import node_module

    samplers = node_module("samplers")
    sigmas = torch.tensor([1e-4, 0.002, 0.5, 20.0], dtype=torch.float32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    def model(latent, sigma, **_):
        seen.append(float(sigma[0]))
        return latent * 0.5 / (1 + sigma.view(-1, 1, 1, 1) ** 2)  # any smooth denoiser

    ours = samplers.inversion_function(model, x.clone(), sigmas)
    stock = comfy.samplers.ksampler("euler").sampler_function(model, x.clone(), sigmas, disable=True)
    assert torch.allclose(ours, stock, rtol=1e-5, atol=1e-5)
    assert seen[:3] == pytest.approx([1e-4, 0.002, 0.5])
    with pytest.raises(ValueError, match="FlipSigmas"):
        samplers.inversion_function(model, x, sigmas.flip(0))


def write_video(path, frames: torch.Tensor, fps: int = 8):
    """(T, H, W, 3) in [0, 1] as an mp4 (ComfyUI's LoadVideo reads it back)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in (frames * 255).round().byte().numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def composable_prompt(definitions):
    """08_composable_matched_sampler as queued, on the tiny model at 2 steps and 3 frames of 64x64."""
    import json

    from workflow_format import api_prompt

    workflow = json.loads((REPO / "example_workflows" / "08_composable_matched_sampler.json").read_text())
    prompt = api_prompt(workflow, definitions)
    kinds = {key: node["class_type"] for key, node in prompt.items()}
    assert kinds["1"] == "ImageOnlyCheckpointLoader" and kinds["27"] == "VAEDecode" and kinds["20"] == "ImageFromBatch"
    prompt["1"] = {"class_type": "TinySVDLoader", "inputs": {}}
    for key in ("21", "23", "24", "25", "26"):  # the SD1.5 edit: loader, prompts, conditioning, KSampler
        assert kinds[key] in ("CheckpointLoaderSimple", "CLIPTextEncode", "InstructPixToPixConditioning", "KSampler")
        del prompt[key]
    prompt["27"] = {"class_type": "ImageInvert", "inputs": {"image": ["20", 0]}}  # the edited frame 0
    prompt["30"]["inputs"].update(frames_per_clip=3, working_width=64, working_height=64)
    prompt["31"]["inputs"]["steps"] = prompt["62"]["inputs"]["steps"] = 2
    return prompt


def test_composable_workflow_runs(comfy_nodes, comfy_parts, tmp_path, monkeypatch):
    """Edit frame 0 -> I2VEdit Invert -> LoraLoaderModelOnly -> Edit Conditioning, CFGGuider, KarrasScheduler,
    DisableNoise and the Matched Sampler in SamplerCustomAdvanced -> VAE Decode -> Save Video."""
    import av
    import folder_paths
    from test_matched_sampler import assert_shared_state_kept, random_lora, shared_state
    from workflow_format import live_definitions

    from i2vedit_core.lora import save_motion_lora

    (comfy_nodes["loras"] / "i2vedit").mkdir(exist_ok=True)
    save_motion_lora(random_lora(comfy_parts["model"]), str(comfy_nodes["loras"] / "i2vedit" / "my_video.safetensors"))
    inputs = tmp_path / "input"
    inputs.mkdir()
    frames = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)).repeat(3, 1, 1, 1)
    write_video(inputs / "source.mp4", frames.roll(8, dims=2).cumsum(2) % 1)
    monkeypatch.setattr(folder_paths, "input_directory", str(inputs))
    before = shared_state(comfy_parts["model"])

    executor, server = execute(composable_prompt(live_definitions(REPO)), monkeypatch)
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success, errors
    outputs = executor.history_result["outputs"]
    saved = outputs["91"]["images"][0]
    with av.open(str(Path(folder_paths.get_output_directory()) / saved["subfolder"] / saved["filename"])) as video:
        decoded = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert [f.shape for f in decoded] == [(64, 64, 3)] * 3  # clip 0: 3 frames at the working size
    assert len(outputs["92"]["images"]) == 1  # the edited frame 0
    # No entry of ComfyUI's loaded models was removed by us; the shared weights are the same values
    # (the LoRA's weight patches are merged and unmerged by ComfyUI's own loading).
    assert_shared_state_kept(comfy_parts["model"], before, same_objects=False)
