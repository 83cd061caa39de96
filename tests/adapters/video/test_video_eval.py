"""Tests of `florence video eval`: fine-tuned classifiers and zero-shot labels on the shared clips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from florence.adapters.video.classifier import (
    CONFIG_NAME,
    VideoClassifierConfig,
    find_classifier_files,
    load_video_classifier,
    write_classifier_config,
)
from florence.adapters.video.dataset import VideoDataset
from florence.adapters.video.evaluate import ViewSampling, evaluate_video_classification
from florence.adapters.video.sampling import load_test_views
from florence.adapters.video.zeroshot import zero_shot_scorer
from florence.cli.main import main
from florence.tokenizer import get_tokenizer

CLIPS = ("yoga.mp4", "ucf101_v_CricketShot_g04_c01.gif", "playing_guitar.mp4")


def _subset_csv(video_clips: Path, folder: Path, names: tuple[str, ...] = CLIPS) -> Path:
    """Copy the rows of ``names`` from the shared labels.csv, with absolute video paths."""
    with (video_clips / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if Path(row["path"]).name in names]
    path = folder / "labels.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "kinetics400_label"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"path": str(video_clips / row["path"]), "label": row["label"],
                             "kinetics400_label": row["kinetics400_label"]})
    return path


@pytest.fixture(scope="module")
def trained_run(tiny_checkpoint: Path, video_clips: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A one-epoch classifier on two clips, as `florence video train` writes it."""
    folder = tmp_path_factory.mktemp("trained")
    data = _subset_csv(video_clips, folder, CLIPS[:2])
    output_dir = folder / "run"
    code = main(["video", "train", str(data), "--output-dir", str(output_dir), "--checkpoint", str(tiny_checkpoint),
                 "--epochs", "1", "--num-frames", "2", "--clips-per-video", "1", "--batch-size", "2"])
    assert code == 0
    return data, output_dir


def test_train_writes_classifier_config(trained_run) -> None:
    _, output_dir = trained_run
    config = json.loads((output_dir / CONFIG_NAME).read_text(encoding="utf-8"))

    assert config["classes"] == ["CricketShot", "yoga"]
    assert config["num_frames"] == 2
    assert config["image_size"] == 32
    assert config["model"]["num_classes"] == 2


def test_classifier_found_from_run_and_step(trained_run) -> None:
    _, output_dir = trained_run
    step = output_dir / "checkpoints" / "step_0000001"

    from_run = find_classifier_files(output_dir)
    from_step = find_classifier_files(step)
    from_weights = find_classifier_files(step / "model.safetensors")

    assert from_run == (output_dir / CONFIG_NAME, step / "model.safetensors")
    assert from_step == from_run
    assert from_weights == from_run


def test_loaded_classifier_matches_trained_weights(trained_run) -> None:
    _, output_dir = trained_run
    from florence.checkpoint import read_weights

    model, config = load_video_classifier(output_dir)
    saved = read_weights(output_dir / "checkpoints" / "step_0000001")

    assert not model.training
    assert config.classes == ["CricketShot", "yoga"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_classifier_config_rejects_other_classes(trained_run) -> None:
    _, output_dir = trained_run
    _, config = load_video_classifier(output_dir)
    changed = VideoClassifierConfig(**{**config.__dict__, "classes": ["a", "b"]})

    with pytest.raises(ValueError, match="another classes"):
        write_classifier_config(output_dir, changed)


def test_classifier_without_config_rejected(trained_run, tmp_path: Path) -> None:
    _, output_dir = trained_run
    step = tmp_path / "step"
    step.mkdir()
    (step / "model.safetensors").write_bytes((output_dir / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes())

    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        find_classifier_files(step)


def test_cli_eval_classifier_views(trained_run, tmp_path: Path, capsys) -> None:
    data, output_dir = trained_run
    out = tmp_path / "eval.json"

    code = main(["video", "eval", str(data), "--checkpoint", str(output_dir), "--num-clips", "2", "--num-crops", "3",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text(encoding="utf-8"))

    assert code == 0
    assert "2 videos, 2 classes, 2 clip(s) x 3 crop(s) of 2 frames at 32 px" in printed
    assert "top1" in printed
    assert "mean_per_class_recall" in printed
    assert record["mode"] == "classifier"
    assert record["classes"] == ["CricketShot", "yoga"]
    assert record["views"]["num_clips"] == 2
    assert record["views"]["num_crops"] == 3
    assert record["metrics"]["num_videos"] == 2
    assert 0.0 <= record["metrics"]["top1_ci_low"] <= record["metrics"]["top1"] <= record["metrics"]["top1_ci_high"]
    assert [prediction["label"] for prediction in record["predictions"]] == ["CricketShot", "yoga"]
    assert list(tmp_path.iterdir()) == [out]


def test_eval_averages_view_scores(tiny_model, video_clips: Path, tmp_path: Path) -> None:
    dataset = VideoDataset(_subset_csv(video_clips, tmp_path, CLIPS[:2]))
    views = ViewSampling(num_frames=2, image_size=32, num_clips=2, num_crops=3)
    score_views = zero_shot_scorer(tiny_model, get_tokenizer(), dataset.classes)

    result = evaluate_video_classification(score_views, dataset, views, bootstrap_samples=20)
    first_views = load_test_views(dataset.samples[0][0], 2, 32, num_clips=2, num_crops=3)
    expected = score_views(first_views).mean(dim=0)

    assert first_views.shape == (6, 3, 2, 32, 32)
    assert result.predictions[0]["top_scores"][0] == pytest.approx(expected.max().item(), abs=1e-6)
    assert result.metrics["num_videos"] == 2


def test_cli_eval_zero_shot_label_map(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    data = _subset_csv(video_clips, tmp_path)
    out = tmp_path / "zero_shot.json"

    code = main(["video", "eval", str(data), "--zero-shot", "--checkpoint", str(tiny_checkpoint), "--label-map",
                 "kinetics400", "--label-column", "kinetics400_label", "--num-frames", "2", "--per-video",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text(encoding="utf-8"))

    assert code == 0
    assert "3 videos, 400 classes" in printed
    assert "label 'playing guitar'" in printed
    assert record["mode"] == "zero-shot"
    assert record["tower"] == "frames"
    assert len(record["classes"]) == 400
    assert len(record["predictions"][0]["top_labels"]) == 5
    assert record["metrics"]["top5"] >= record["metrics"]["top1"]


def test_cli_eval_zero_shot_skips_unreadable(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    data = _subset_csv(video_clips, tmp_path, CLIPS[:2])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2048)
    with data.open("a", encoding="utf-8") as handle:
        handle.write(f"{broken},yoga,yoga\n")
    out = tmp_path / "eval.json"

    code = main(["video", "eval", str(data), "--zero-shot", "--checkpoint", str(tiny_checkpoint), "--num-frames", "2",
                 "--tower", "video", "--out", str(out)])
    printed = capsys.readouterr().out
    record = json.loads(out.read_text(encoding="utf-8"))

    assert code == 0
    assert "2 videos, 2 classes" in printed
    assert "top5 covers all 2 classes" in printed
    assert f"unreadable: {broken}" in printed
    assert record["metrics"]["num_unreadable"] == 1
    assert record["tower"] == "video"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--zero-shot", "--checkpoint", "CKPT", "--label-map", "kinetics400"], "pick a --label-column"),
        (["--labels", "yoga,cricket"], "--labels applies only with --zero-shot"),
        ([], "pass --checkpoint with the --output-dir"),
        (["--checkpoint", "MISSING"], "not found"),
    ],
)
def test_cli_eval_bad_arguments(tiny_checkpoint, video_clips, tmp_path, capsys, arguments, message) -> None:
    data = _subset_csv(video_clips, tmp_path, CLIPS[:2])
    placeholders = {"CKPT": str(tiny_checkpoint), "MISSING": str(tmp_path / "missing")}
    arguments = [placeholders.get(value, value) for value in arguments]

    code = main(["video", "eval", str(data), *arguments])

    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_eval_missing_data(tmp_path: Path, capsys) -> None:
    code = main(["video", "eval", str(tmp_path / "none.csv"), "--zero-shot"])

    assert code == 2
    assert "video data" in capsys.readouterr().err
