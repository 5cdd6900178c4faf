"""I2VEdit Metrics: weight-free quality numbers of an edit (temporal consistency, preservation)."""

import json

from comfy_api.latest import io, ui

from i2vedit_core.metrics import video_report

from .host import image_to_frames, mask_to_frames, node_id, send_text
from .plots import bar_chart
from .types import CATEGORY


def report_text(report: dict) -> str:
    why = report.get("not_computed", {})
    lines = [f"{name}: {f'n/a ({why[name]})' if name in why else 'n/a' if value is None else f'{value:.4f}'}"
             for name, value in report.items() if name != "not_computed"]
    return "\n".join(lines) + "\n" + json.dumps(report)


def report_chart(report: dict):
    """Each metric next to the source's own value (blue: edit, orange: source)."""
    pairs = {}
    for name, value in report.items():
        if name.endswith("_source") or name == "not_computed":
            continue
        pairs[name] = (value, report.get(name + "_source"))
    return bar_chart(pairs, "edit (blue) vs source (orange)")


class MetricsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditMetrics", display_name="I2VEdit Metrics", category=CATEGORY,
            description="Measures an edited video against its source without any model: warp error and flicker "
                        "(temporal consistency, next to the source's own), PSNR/SSIM outside the edit, colour jumps "
                        "at clip seams.",
            inputs=[io.Image.Input("source", tooltip="The source video (IMAGE batch)."),
                    io.Image.Input("output", tooltip="The edited video, same frame count and size as the source."),
                    io.Image.Input("edited_first_frame", optional=True,
                                   tooltip="Optional: the edited frame 0, to find the edited area and score frame 0."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Optional MASK of the edited area (1 = edited); outside it is compared "
                                          "with the source.")],
            outputs=[io.String.Output(display_name="report"), io.Image.Output(display_name="plot")],
            is_output_node=True, hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, source, output, edited_first_frame=None, mask=None) -> io.NodeOutput:
        src, out = image_to_frames(source, "source"), image_to_frames(output, "output")
        if src.shape != out.shape:
            raise ValueError(f"source {tuple(source.shape)} and output {tuple(output.shape)} differ: compare one "
                             "edit at a time (split several edits with Image From Batch)")
        edited = None if edited_first_frame is None else image_to_frames(edited_first_frame, "edited first frame")[0]
        weights = None if mask is None else mask_to_frames(mask, src)
        report = video_report(src, out, edited, weights)
        text = report_text(report)
        send_text(node_id(cls), text.rsplit("\n", 1)[0])  # the lines without the JSON copy
        return io.NodeOutput(text, report_chart(report), ui=ui.PreviewText(text))
