"""Tests of video fine-tuning with checkpoints and resume, and of video-text retrieval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florence.adapters.video import VideoCoSwin
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.finetune import (
    VideoFinetuneConfig,
    finetune_video_classifier,
)
from florence.adapters.video.retrieval import (
    encode_captions,
    encode_videos,
    rank_captions,
    video_text_retrieval,
)
from florence.cli.main import main
from florence.models import create_model
from florence.serving.embed import EmbeddingStore
from florence.tokenizer import get_tokenizer

VIDEO_CONFIG = {
    "img_size": 32,
    "embed_dim": 16,
    "depths": (1, 1),
    "num_heads": (2, 4),
    "window_size": (2, 4, 4),
    "stem_kernel_size": 3,
    "stem_stride": 2,
    "stem_padding": 1,
    "drop_path_rate": 0.0,
}


def _two_clip_csv(video_clips: Path, folder: Path) -> Path:
    path = folder / "labels.csv"
    clips = video_clips / "clips"
    path.write_text(
        f"path,label\n{clips / 'yoga.mp4'},yoga\n{clips / 'ucf101_v_CricketShot_g04_c01.gif'},cricket\n",
        encoding="utf-8",
    )
    return path


def _records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_finetune_resumes_from_checkpoint(video_clips: Path, tmp_path: Path) -> None:
    csv_path = _two_clip_csv(video_clips, tmp_path)
    train = VideoDataset(csv_path, num_frames=2, size=32, train=True)
    evaluation = VideoDataset(csv_path, num_frames=2, size=32)
    output_dir = tmp_path / "run"
    config = VideoFinetuneConfig(output_dir=str(output_dir), epochs=1, batch_size=2, clips_per_video=1,
                                 stop_at_accuracy=None)

    torch.manual_seed(0)
    first = finetune_video_classifier(VideoCoSwin(**VIDEO_CONFIG, num_classes=2), train, evaluation, config)
    config.epochs = 2
    second = finetune_video_classifier(VideoCoSwin(**VIDEO_CONFIG, num_classes=2), train, evaluation, config)
    records = _records(output_dir)

    assert first["epoch"] == 0
    assert second["epoch"] == 1
    assert [record["epoch"] for record in records] == [0, 1]
    assert [record["step"] for record in records] == [1, 2]
    assert (output_dir / "checkpoints" / "step_0000002" / "model.safetensors").is_file()


def test_finetune_rejects_wrong_head(video_clips: Path, tmp_path: Path) -> None:
    csv_path = _two_clip_csv(video_clips, tmp_path)
    dataset = VideoDataset(csv_path, num_frames=2, size=32)
    config = VideoFinetuneConfig(output_dir=str(tmp_path / "run"))

    with pytest.raises(ValueError, match=r"reset_classifier\(len\(dataset.classes\)\)"):
        finetune_video_classifier(VideoCoSwin(**VIDEO_CONFIG, num_classes=5), dataset, dataset, config)


def test_rank_captions_stable_order() -> None:
    video = torch.tensor([1.0, 0.0])
    captions = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])

    assert rank_captions(video, captions) == [1, 2, 3, 0]


def test_video_text_retrieval_real_clips(video_clips: Path, video_clips2: Path) -> None:
    torch.manual_seed(0)
    model = create_model("florence-tiny").eval()
    paths = [video_clips / "clips" / "cleaning_pool.mp4", video_clips2 / "clips" / "internvid_example1_dog_snow.mp4"]
    captions = ["A person is cleaning a swimming pool", "A playful dog and its owner wrestle in the snowy yard."]

    videos = encode_videos(model, paths, num_frames=2)
    texts = encode_captions(model, get_tokenizer(), captions)
    metrics = video_text_retrieval(videos, texts, [0, 1], ks=(1, 2))

    assert videos.shape == (2, 256)
    assert torch.allclose(videos.norm(dim=-1), torch.ones(2))
    assert set(metrics) == {"video_to_text_R@1", "video_to_text_R@2", "text_to_video_R@1", "text_to_video_R@2",
                            "mean_recall"}
    assert metrics["video_to_text_R@2"] == 100.0


def test_cli_video_train_writes_checkpoint(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    csv_path = _two_clip_csv(video_clips, tmp_path)
    output_dir = tmp_path / "run"
    code = main(
        ["video", "train", str(csv_path), "--output-dir", str(output_dir), "--checkpoint", str(tiny_checkpoint),
         "--epochs", "1", "--num-frames", "2", "--clips-per-video", "1", "--batch-size", "2"]
    )

    assert code == 0
    assert "eval_top1" in capsys.readouterr().out
    assert (output_dir / "checkpoints" / "latest").is_file()
    assert [record["epoch"] for record in _records(output_dir)] == [0]


def test_cli_video_embed_then_search(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    clips = [video_clips / "clips" / "yoga.mp4", video_clips / "clips" / "ucf101_v_CricketShot_g04_c01.gif"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2048)
    out = tmp_path / "embeddings"
    arguments = ["video", "embed", *map(str, clips), str(broken), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                 "--num-frames", "2"]

    first_code = main(arguments)
    first_output = capsys.readouterr().out
    second_code = main(arguments)
    second_output = capsys.readouterr().out
    sources, vectors = EmbeddingStore(out).read_embeddings("image")
    index_code = main(["index", "build", str(out), "--out", str(tmp_path / "index")])
    search_code = main(["search", "a person doing yoga", "--index", str(tmp_path / "index"), "-k", "2"])
    search_output = capsys.readouterr().out

    assert first_code == 0
    assert "2 embedded now, 0 already" in first_output
    assert "1 unreadable" in first_output
    assert second_code == 0
    assert "0 embedded now, 3 already" in second_output
    assert sorted(sources) == sorted(str(clip.resolve()) for clip in clips)
    assert vectors.shape == (2, 256)
    assert index_code == 0
    assert search_code == 0
    assert "yoga.mp4" in search_output
