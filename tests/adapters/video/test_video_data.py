"""Tests of video decoding, frame sampling, multi-view testing and the video dataset on real clips."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from florence.adapters.video.dataset import VideoDataset, scan_class_folders
from florence.adapters.video.io import (
    VideoDecodeError,
    _decode_gif_pillow,
    probe_video,
    read_video,
)
from florence.adapters.video.sampling import (
    average_view_scores,
    dense_indices,
    load_test_views,
    random_temporal_crop,
    spatial_crops,
    temporal_views,
    uniform_indices,
)

GIF_NAME = "ucf101_v_CricketShot_g04_c01.gif"


def _all_clips(*folders: Path) -> list[Path]:
    return sorted(path for folder in folders for path in (folder / "clips").iterdir())


def test_every_shared_clip_decodes(video_clips: Path, video_clips2: Path) -> None:
    clips = _all_clips(video_clips, video_clips2)
    suffixes = {path.suffix for path in clips}

    assert len(clips) == 11
    assert suffixes == {".mp4", ".mkv", ".avi", ".gif"}
    for path in clips:
        info = probe_video(path)
        frames = read_video(path, [0, info.num_frames // 2, info.num_frames - 1])
        assert frames.shape == (3, info.height, info.width, 3), path.name
        assert frames.dtype == torch.uint8, path.name
        assert frames.float().std() > 1.0, path.name


def test_probe_frame_counts_match_labels_csv(video_clips: Path, video_clips2: Path) -> None:
    for folder in (video_clips, video_clips2):
        with (folder / "labels.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                info = probe_video(folder / row["path"])
                assert info.num_frames == int(row["num_frames"]), row["path"]
                assert (info.width, info.height) == (int(row["width"]), int(row["height"])), row["path"]


def test_read_video_all_frames_of_gif(video_clips: Path) -> None:
    path = video_clips / "clips" / GIF_NAME
    frames = read_video(path)

    assert frames.shape == (79, 224, 224, 3)
    assert torch.equal(frames, _decode_gif_pillow(path, None))


def test_read_video_index_order_and_past_end(video_clips2: Path) -> None:
    path = video_clips2 / "clips" / "internvid_example1_dog_snow.mp4"
    everything = read_video(path)
    frames = read_video(path, [5, 0, 5, 45])

    assert everything.shape[0] == 40
    assert torch.equal(frames[0], everything[5])
    assert torch.equal(frames[1], everything[0])
    assert torch.equal(frames[2], everything[5])
    assert torch.equal(frames[3], everything[39])


def test_read_video_rejects_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(b"not a video" * 100)

    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        probe_video(path)
    with pytest.raises(VideoDecodeError, match="corrupt.mp4"):
        read_video(path)


def test_probe_video_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="missing.avi"):
        probe_video(tmp_path / "missing.avi")


def test_uniform_indices_cover_video() -> None:
    assert uniform_indices(100, 4) == [12, 37, 62, 87]
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert uniform_indices(100, 4, offset=0.0) == [0, 25, 50, 75]


def test_dense_indices_clamp_past_end() -> None:
    assert dense_indices(100, 4, 2, 10) == [10, 12, 14, 16]
    assert dense_indices(5, 4, 2, 0) == [0, 2, 4, 4]


def test_temporal_views_dense_evenly_spaced() -> None:
    views = temporal_views(300, 4, "dense", frame_interval=4, num_clips=3)

    assert views == [[48, 52, 56, 60], [144, 148, 152, 156], [239, 243, 247, 251]]


def test_temporal_views_uniform_offsets() -> None:
    views = temporal_views(100, 2, "uniform", num_clips=2)

    assert views == [[12, 62], [37, 87]]


def test_temporal_views_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown sampling mode 'sparse'"):
        temporal_views(100, 4, "sparse")


def test_random_temporal_crop_stays_in_video() -> None:
    generator = torch.Generator().manual_seed(0)
    for mode in ("uniform", "dense"):
        for _ in range(20):
            indices = random_temporal_crop(50, 8, mode, frame_interval=3, generator=generator)
            assert len(indices) == 8
            assert min(indices) >= 0
            assert max(indices) <= 49
            assert indices == sorted(indices)


def test_spatial_crops_three_along_long_side() -> None:
    frames = torch.arange(10 * 16).view(1, 1, 10, 16).expand(2, 3, -1, -1)
    crops = spatial_crops(frames, 10, num_crops=3)

    assert [crop.shape for crop in crops] == [torch.Size([2, 3, 10, 10])] * 3
    assert crops[0][0, 0, 0, 0] == 0
    assert crops[1][0, 0, 0, 0] == 3
    assert crops[2][0, 0, 0, 0] == 6


def test_load_test_views_shape(video_clips: Path) -> None:
    path = video_clips / "clips" / "k400_arm_wrestling.mp4"
    views = load_test_views(path, num_frames=4, size=32, mode="dense", num_clips=2, num_crops=3)

    assert views.shape == (6, 3, 4, 32, 32)
    assert views.dtype == torch.float32
    assert not torch.equal(views[0], views[3])


def test_average_view_scores_means_views() -> None:
    views = torch.zeros(3, 3, 2, 4, 4)
    scores = average_view_scores(lambda batch: torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]), views)

    assert torch.equal(scores, torch.tensor([1.0, 1.0]))


def test_video_dataset_from_csv(video_clips: Path) -> None:
    dataset = VideoDataset(video_clips / "labels.csv", num_frames=4, size=32)
    clip, label = dataset[0]

    assert len(dataset) == 9
    assert dataset.skipped == []
    assert clip.shape == (3, 4, 32, 32)
    assert dataset.classes[label] == "arm wrestling"


def test_video_dataset_skips_corrupt_videos(video_clips: Path, tmp_path: Path, caplog) -> None:
    for name, clip in (("yoga", "yoga.mp4"), ("cricket", GIF_NAME)):
        (tmp_path / name).mkdir()
        (tmp_path / name / clip).symlink_to(video_clips / "clips" / clip)
    corrupt = tmp_path / "yoga" / "broken.avi"
    corrupt.write_bytes(b"\x00" * 4096)

    with caplog.at_level(logging.WARNING):
        dataset = VideoDataset(tmp_path, num_frames=4, size=32, train=True)
    clip, label = dataset[1]

    assert len(scan_class_folders(tmp_path)) == 3
    assert len(dataset) == 2
    assert [path for path, _ in dataset.skipped] == [corrupt]
    assert str(corrupt) in caplog.text
    assert dataset.classes == ["cricket", "yoga"]
    assert clip.shape == (3, 4, 32, 32)
    assert label == 1
