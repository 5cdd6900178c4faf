"""I2VEdit Save / Load Motion LoRA: files under models/loras, readable by core LoraLoaderModelOnly.

A video of several clips has one LoRA per clip, saved as a series `<name>_clip01of03.safetensors`, ...;
loading any file of a series loads all of it, in clip order.
"""

import os
import re
from pathlib import Path
from typing import List

from comfy_api.latest import io, ui

from i2vedit_core.files import StagedFiles
from i2vedit_core.lora import load_motion_lora, save_motion_lora, series_names

from .artifacts import MotionLoras
from .host import node_id, send_text
from .types import CATEGORY, MotionLora

NAME = re.compile(r"^[A-Za-z0-9_\-. ]+$")
SERIES = re.compile(r"^(?P<stem>.+)_clip(?P<index>\d+)of(?P<count>\d+)$")
EXTENSIONS = (".safetensors", ".pt")


def loras_folder() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def safe_relative_name(name: str) -> Path:
    """A user's name ("sub/dir/name") as a relative path with no way out of the loras folder."""
    name = name.strip().replace("\\", "/")
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    parts = [p for p in name.split("/") if p]
    if not parts or any(p in (".", "..") or not NAME.match(p) for p in parts) or name.startswith("/"):
        raise ValueError(f"motion LoRA name {name!r} is not allowed: use letters, digits, '_', '-', '.' and '/' "
                         "for subfolders (no '..', no absolute paths), e.g. 'i2vedit/my_video'")
    return Path(*parts)


def series_paths(folder: Path, relative: Path, count: int) -> List[Path]:
    return [folder / relative.with_name(name) for name in series_names(relative.name, count)]


def save_series(loras: MotionLoras, name: str, overwrite: bool, folder: Path) -> List[Path]:
    """Write every clip's file, or none: staged beside the targets, renamed into place once all are written."""
    relative = safe_relative_name(name)
    paths = series_paths(folder, relative, len(loras.loras))
    root = folder.resolve()
    for path in paths:
        if root not in path.resolve().parents:
            raise ValueError(f"motion LoRA name {name!r} leads outside models/loras: pick a plain name")
        blocked = next((p for p in [path, *path.parents] if p != root and root in p.resolve().parents
                        and (p.is_dir() if p == path else p.is_file())), None)
        if blocked is not None:
            raise ValueError(f"motion LoRA name {name!r}: {os.path.relpath(blocked, folder)} is a "
                             f"{'folder' if blocked == path else 'file'} in models/loras: change name")
    taken = [p for p in paths if p.exists()] + same_name_series(paths[0].parent, relative.name, len(paths))
    if taken and not overwrite:
        shown = ", ".join(sorted(os.path.relpath(p, folder) for p in taken))
        raise ValueError(f"motion LoRA name {name!r} is taken: {shown} already exists in models/loras: change name "
                         "or turn on overwrite")
    with StagedFiles() as staged:
        for lora, path in zip(loras.loras, paths):
            save_motion_lora(lora, str(staged.stage(path)))
        return staged.commit()


def same_name_series(folder: Path, stem: str, count: int) -> List[Path]:
    """Files of another series (or a single file) under the same name: loading by name would be ambiguous."""
    if not folder.is_dir():
        return []
    others = [p for p in folder.iterdir() if p.suffix in EXTENSIONS and (p.stem == stem or (
        (m := SERIES.match(p.stem)) is not None and m["stem"] == stem))]
    ours = {p.name for p in series_paths(folder, Path(stem), count)}
    return [p for p in others if p.name not in ours]


def load_series(path: Path) -> MotionLoras:
    stem = path.name[:-len(path.suffix)]
    match = SERIES.match(stem)
    if match is None:
        return MotionLoras((load_motion_lora(str(path)),))
    count = int(match["count"])
    paths = [path.with_name(f"{match['stem']}_clip{k + 1:02d}of{count:02d}{path.suffix}") for k in range(count)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"motion LoRA series {match['stem']!r} is incomplete (missing {', '.join(missing)}): "
                         "save it again with I2VEdit Save Motion LoRA")
    return MotionLoras(tuple(load_motion_lora(str(p)) for p in paths))


def lora_file_names() -> List[str]:
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras") if n.endswith(EXTENSIONS)]


class SaveMotionLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditSaveMotionLora", display_name="I2VEdit Save Motion LoRA", category=CATEGORY,
            description="Saves the motion LoRA(s) to models/loras (one file per clip), so the next edit of this video "
                        "can skip training. The files also load in core LoraLoaderModelOnly.",
            inputs=[MotionLora.Input("motion_lora", tooltip="From I2VEdit Train Motion LoRA."),
                    io.String.Input("name", default="i2vedit/motion",
                                    tooltip="File name under models/loras, '/' for subfolders; several clips "
                                            "become name_clip01of03.safetensors, ..."),
                    io.Boolean.Input("overwrite", default=False,
                                     tooltip="Replace existing files of that name instead of stopping with an "
                                             "error. Either way every clip's file is written, or none.")],
            outputs=[io.String.Output(display_name="files")],
            is_output_node=True, hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, motion_lora, name, overwrite) -> io.NodeOutput:
        folder = loras_folder()
        paths = save_series(motion_lora, name, overwrite, folder)
        names = "\n".join(os.path.relpath(p, folder) for p in paths)
        send_text(node_id(cls), "saved:\n" + names)
        return io.NodeOutput(names, ui=ui.PreviewText(names))


class LoadMotionLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="I2VEditLoadMotionLora", display_name="I2VEdit Load Motion LoRA", category=CATEGORY,
            description="Loads a motion LoRA saved by I2VEdit Save Motion LoRA (or an official I2VEdit .pt). Picking "
                        "any file of a clip series loads the whole series.",
            inputs=[io.Combo.Input("lora_name", options=lora_file_names(),
                                   tooltip="A file under models/loras.")],
            outputs=[MotionLora.Output(display_name="motion_lora")])

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        import folder_paths

        return io.NodeOutput(load_series(Path(folder_paths.get_full_path_or_raise("loras", lora_name))))
