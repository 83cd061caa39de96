"""Video decoding with PyAV (FFmpeg), with a Pillow fallback for animated GIFs.

PyAV reads any container and codec that its bundled FFmpeg reads, including mp4, mkv, avi,
webm and GIF. Frames are returned as ``uint8`` RGB tensors ``[T, H, W, 3]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageSequence

_logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".gif")


class VideoDecodeError(RuntimeError):
    """A video file that is missing, unreadable, has no video stream or yields no frames."""


@dataclass(frozen=True)
class VideoInfo:
    """Frame count, frame rate (frames per second) and frame size of a video's first video stream."""

    num_frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | Path) -> VideoInfo:
    """Count the frames of ``path`` by demuxing its packets, without decoding them.

    Container headers often lack the frame count (Matroska) or state it wrongly, so the
    packets of the first video stream are counted instead.

    Raises:
        VideoDecodeError: the file cannot be opened, has no video stream or has no packets.
    """
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path} has no video stream")
            stream = container.streams.video[0]
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, OSError) as error:
        raise VideoDecodeError(f"cannot read video {path}: {error}") from error

    if num_frames == 0:
        raise VideoDecodeError(f"{path} has a video stream without frames")
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height)


def read_video(path: str | Path, indices: Sequence[int] | None = None) -> torch.Tensor:
    """Decode the frames at ``indices`` (all frames if None) of ``path`` into ``uint8 [T, H, W, 3]``.

    ``indices`` may repeat and come in any order; the output follows their order. An index past
    the last decoded frame reads the last frame, because a stream may decode fewer frames than
    it has packets. Animated GIFs that PyAV cannot open are read with Pillow.

    Raises:
        VideoDecodeError: the file cannot be decoded or yields no frames.
    """
    path = Path(path)
    try:
        frames = _decode_pyav(path, indices)
    except (av.FFmpegError, OSError) as error:
        if path.suffix.lower() != ".gif":
            raise VideoDecodeError(f"cannot decode video {path}: {error}") from error
        _logger.debug("PyAV failed on %s (%s); reading it with Pillow", path, error)
        frames = _decode_gif_pillow(path, indices)
    return frames


def _select(decoded: dict[int, np.ndarray], last_index: int, indices: Sequence[int] | None, path: Path) -> torch.Tensor:
    """Stack the decoded frames in the order of ``indices``, reading the last frame past the end."""
    if last_index < 0:
        raise VideoDecodeError(f"{path} yields no frames")
    if indices is None:
        indices = range(last_index + 1)

    past_end = [index for index in indices if index > last_index]
    if past_end:
        _logger.debug("%s: frames %s are past the last decoded frame %d", path, past_end, last_index)
    frames = [decoded[min(index, last_index)] for index in indices]
    return torch.from_numpy(np.stack(frames))


def _decode_pyav(path: Path, indices: Sequence[int] | None) -> torch.Tensor:
    wanted = None if indices is None else set(indices)
    if wanted is not None and min(wanted, default=0) < 0:
        raise ValueError(f"frame indices must be >= 0, got {sorted(wanted)[:5]}")
    last_wanted = None if wanted is None else max(wanted, default=-1)

    # NOTE: frames are decoded from the start without seeking, which suits clips of seconds to
    # minutes. Hour-long videos would need keyframe seeking.
    decoded: dict[int, np.ndarray] = {}
    last_index = -1
    last_frame = None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if last_wanted is not None and index > last_wanted:
                break
            last_index, last_frame = index, frame
            if wanted is None or index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")

    # The stream ended before the last requested index, so those indices read its last frame.
    if last_frame is not None and last_index not in decoded:
        decoded[last_index] = last_frame.to_ndarray(format="rgb24")
    return _select(decoded, last_index, indices, path)


def _decode_gif_pillow(path: Path, indices: Sequence[int] | None) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    except OSError as error:
        raise VideoDecodeError(f"cannot decode GIF {path}: {error}") from error
    return _select(dict(enumerate(frames)), len(frames) - 1, indices, path)
