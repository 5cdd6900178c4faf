"""I2VEdit Source Clips: the source video split into SVD-sized clips at a working resolution."""

from comfy_api.latest import io

from i2vedit_core.pipeline import PipelineSettings, prepare_video
from i2vedit_core.validation import NODES, check_node_inputs

from .artifacts import SourceClips
from .host import image_to_frames
from .types import CATEGORY, Clips


def clip_inputs():
    """Widgets of the clip layout, shared with the all-in-one node."""
    return [
        io.Int.Input("frames_per_clip", default=14, min=2, max=64,
                     tooltip="Frames SVD generates at once (14 for svd, 25 for svd_xt). Longer videos are cut "
                             "into several clips that hand over to each other."),
        io.Int.Input("overlap", default=1, min=0, max=16,
                     tooltip="Frames shared by consecutive clips (1 = the official I2VEdit hand-off)."),
        io.Int.Input("working_width", default=1024, min=64, max=2048, step=64,
                     tooltip="Width SVD works at (multiple of 64). The output keeps the source size."),
        io.Int.Input("working_height", default=576, min=64, max=2048, step=64,
                     tooltip="Height SVD works at (multiple of 64). The output keeps the source size."),
        io.Combo.Input("fit", options=["resize", "pad"], default="resize",
                       tooltip="resize: pick a working size of about width x height pixels with the source's "
                               "aspect ratio. pad: exactly width x height, letterboxed. Never stretches."),
    ]


def clips_from(image, frames_per_clip, overlap, working_width, working_height, fit, **_) -> SourceClips:
    if overlap >= frames_per_clip:
        raise ValueError(f"overlap ({overlap}) must be smaller than frames_per_clip ({frames_per_clip}): "
                         "lower the overlap")
    frames = image_to_frames(image, "source frames")
    settings = PipelineSettings(clip_length=frames_per_clip, overlap=overlap,
                                working_size=(working_height, working_width), fit=fit)
    return SourceClips(frames, prepare_video(frames, settings), settings)


class SourceClipsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditSourceClips", display_name="I2VEdit Source Clips", category=CATEGORY,
            description="Cuts the source video (an IMAGE batch, e.g. from Load Video + Get Video Components) into "
                        "clips SVD can process and fits them to the working resolution.",
            inputs=[io.Image.Input("frames", tooltip="The source video as an IMAGE batch, one image per frame.")]
                   + clip_inputs(),
            outputs=[Clips.Output(display_name="clips"), io.String.Output(display_name="summary")])

    @classmethod
    def execute(cls, frames, **widgets) -> io.NodeOutput:
        check_node_inputs(NODES, frames=frames)
        clips = clips_from(frames, **widgets)
        return io.NodeOutput(clips, clips.describe())
