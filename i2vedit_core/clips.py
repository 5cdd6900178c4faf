"""Splitting a video into overlapping clips (ALGORITHM.md section 1)."""

from typing import List


def split_clips(num_frames: int, clip_length: int, overlap: int = 1) -> List[range]:
    """Frame ranges of the clips: clip k covers [k*(F-overlap), k*(F-overlap)+F), cut at the end.

    A clip that would add no new frame (only overlap) is dropped. The last clip may be shorter
    than `clip_length`; if it would have a single frame (overlap 0) it starts one frame earlier,
    since SVD needs at least 2 frames per clip.
    """
    if clip_length < 2:
        raise ValueError(f"clip_length must be at least 2 frames, got {clip_length}")
    if not 0 <= overlap < clip_length:
        raise ValueError(f"overlap must be in [0, clip_length), got overlap={overlap}, clip_length={clip_length}: "
                         "lower the overlap (1 is the official hand-off)")
    if num_frames < 2:
        raise ValueError(f"the video needs at least 2 frames, got {num_frames}")
    stride = clip_length - overlap
    clips = []
    start = 0
    while start + (overlap if clips else 0) < num_frames:
        stop = min(start + clip_length, num_frames)
        clips.append(range(min(start, stop - 2), stop))
        start += stride
    return clips


def new_frames(clips: List[range]) -> List[range]:
    """The frames each clip writes to the output: each frame is written once, by the first clip holding it."""
    written_until = 0
    result = []
    for clip in clips:
        result.append(range(max(clip.start, written_until), clip.stop))
        written_until = clip.stop
    return result
