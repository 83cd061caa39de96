"""Tests of zero-shot action recognition and ``florence video classify`` with a small Florence model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from florence.adapters.video.inflate import load_video_coswin
from florence.adapters.video.zeroshot import (
    LABEL_MAPS,
    VideoEncoder,
    classify_videos,
    read_label_map,
    top_k_accuracy,
)
from florence.cli.main import main
from florence.tokenizer import get_tokenizer


@pytest.mark.parametrize("tower", ["frames", "video"])
def test_video_encoder_static_clip_matches_image(tiny_model: torch.nn.Module, tower: str) -> None:
    images = torch.randn(2, 3, 32, 32)
    clips = images[:, :, None].expand(-1, -1, 4, -1, -1).contiguous()
    encoder = VideoEncoder(tiny_model, tower).eval()

    with torch.no_grad():
        expected = tiny_model.encode_image(images)
        embeddings = encoder(clips)

    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_load_video_coswin_from_florence_checkpoint(tiny_model: torch.nn.Module, tiny_checkpoint: Path) -> None:
    video_model = load_video_coswin(tiny_checkpoint, temporal_window=2).eval()
    image = torch.randn(1, 3, 32, 32)

    with torch.no_grad():
        expected = tiny_model.visual(image)
        features = video_model(image[:, :, None].expand(-1, -1, 3, -1, -1))

    assert video_model.window_size == (2, 8, 8)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_classify_videos_probabilities(tiny_model: torch.nn.Module, video_clips: Path) -> None:
    paths = [video_clips / "clips" / "yoga.mp4", video_clips / "clips" / "ucf101_v_CricketShot_g04_c01.gif"]
    classnames = ["yoga", "playing cricket", "playing guitar"]
    predictions = classify_videos(
        tiny_model, get_tokenizer(), paths, classnames, num_frames=4, num_clips=2, num_crops=3, top=2
    )

    assert [prediction.path for prediction in predictions] == paths
    for prediction in predictions:
        assert prediction.probabilities.shape == (3,)
        assert prediction.probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert len(prediction.top_labels) == 2
        assert prediction.top_probabilities[0] >= prediction.top_probabilities[1]


def test_top_k_accuracy_counts_hits(tiny_model: torch.nn.Module, video_clips: Path) -> None:
    paths = [video_clips / "clips" / "yoga.mp4"]
    predictions = classify_videos(tiny_model, get_tokenizer(), paths, ["a", "b", "c"], num_frames=2, top=3)
    top1_label = predictions[0].top_labels[0]
    other_label = predictions[0].top_labels[1]

    assert top_k_accuracy(predictions, [top1_label], ks=(1,)) == {"top1": 1.0}
    assert top_k_accuracy(predictions, [other_label], ks=(1, 2)) == {"top1": 0.0, "top2": 1.0}


def test_read_label_map_shipped_maps() -> None:
    sizes = {name: len(read_label_map(name)) for name in LABEL_MAPS}

    assert sizes == {"kinetics400": 400, "ucf101": 101, "ntu60": 60}
    assert "flipping pancake" in read_label_map("kinetics400")


def test_read_label_map_unknown_name() -> None:
    with pytest.raises(FileNotFoundError, match="label map 'kinetics999' not found"):
        read_label_map("kinetics999")


def test_cli_video_classify_prints_ranking(tiny_checkpoint: Path, video_clips: Path, capsys) -> None:
    clip = video_clips / "clips" / "k400_arm_wrestling.mp4"
    code = main(
        ["video", "classify", str(clip), "--labels", "arm wrestling,yoga", "--checkpoint", str(tiny_checkpoint),
         "--num-frames", "4", "--top", "2"]
    )
    output = capsys.readouterr().out.splitlines()

    assert code == 0
    assert output[0] == str(clip)
    assert len(output) == 3
    assert {line.split("%  ")[1] for line in output[1:]} == {"arm wrestling", "yoga"}


def test_cli_video_classify_corrupt_clip(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    clip = tmp_path / "broken.mp4"
    clip.write_bytes(b"\x00" * 2048)
    code = main(["video", "classify", str(clip), "--label-map", "ucf101", "--checkpoint", str(tiny_checkpoint)])

    assert code == 2
    assert "broken.mp4" in capsys.readouterr().err
