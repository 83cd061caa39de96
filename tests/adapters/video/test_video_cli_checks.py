"""Tests of the `florence video` commands on bad input, and of seeded, restartable `video train` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from florence.adapters.video.classifier import CONFIG_NAME
from florence.cli.main import main

# Two short real clips that decode fast: a GIF of 79 frames and an AVI of 164 frames.
CLIPS = (("ucf101_v_CricketShot_g04_c01.gif", "cricket"), ("ucf101_apply_eye_makeup.avi", "eye makeup"))


def _csv(video_clips: Path, folder: Path, rows=CLIPS) -> Path:
    path = folder / "labels.csv"
    lines = "".join(f"{video_clips / 'clips' / name},{label}\n" for name, label in rows)
    path.write_text(f"path,label\n{lines}", encoding="utf-8")
    return path


def _train(csv_path: Path, output_dir: Path, checkpoint: Path, *options: str) -> int:
    return main(
        ["video", "train", str(csv_path), "--output-dir", str(output_dir), "--checkpoint", str(checkpoint),
         "--epochs", "1", "--num-frames", "2", "--clips-per-video", "1", "--batch-size", "2", "--device", "cpu",
         *options]
    )


def test_train_same_seed_same_weights(tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys) -> None:
    csv_path = _csv(video_clips, tmp_path)
    codes = [_train(csv_path, tmp_path / name, tiny_checkpoint, "--seed", seed)
             for name, seed in (("first", "3"), ("second", "3"), ("other_seed", "4"))]
    output = capsys.readouterr().out
    first, second, other = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second", "other_seed"))

    assert codes == [0, 0, 0]
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name
    assert not first["head.weight"].equal(other["head.weight"])
    assert "eval_top1: " in output
    assert "%" in output.split("eval_top1: ")[1].splitlines()[0]


def test_train_failed_run_leaves_folder_reusable(
    tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys
) -> None:
    output_dir = tmp_path / "run"
    (tmp_path / "one").mkdir()
    one_class = _csv(video_clips, tmp_path / "one", rows=[(name, "cricket") for name, _ in CLIPS])
    two_classes = _csv(video_clips, tmp_path)

    one_class_code = _train(one_class, output_dir, tiny_checkpoint)
    one_class_error = capsys.readouterr().err
    batch_code = _train(two_classes, output_dir, tiny_checkpoint, "--batch-size", "3")
    batch_error = capsys.readouterr().err
    lr_code = _train(two_classes, output_dir, tiny_checkpoint, "--lr", "0")
    lr_error = capsys.readouterr().err
    leftovers = sorted(path.name for path in output_dir.iterdir()) if output_dir.exists() else []
    fixed_code = _train(two_classes, output_dir, tiny_checkpoint)

    assert one_class_code == 2
    assert "the data has 1 class(es); a classifier needs at least 2" in one_class_error
    assert batch_code == 2
    assert "fewer than one global batch" in batch_error
    assert lr_code == 2
    assert "lr=0.0 is invalid" in lr_error
    assert CONFIG_NAME not in leftovers
    assert "classes.txt" not in leftovers
    assert fixed_code == 0
    assert json.loads((output_dir / CONFIG_NAME).read_text(encoding="utf-8"))["classes"] == ["cricket", "eye makeup"]


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("classify", "--top"), ("classify", "--image-size"), ("classify", "--num-frames"), ("classify", "--num-clips"),
        ("train", "--batch-size"), ("train", "--epochs"), ("train", "--image-size"), ("train", "--num-frames"),
        ("eval", "--num-clips"), ("eval", "--image-size"), ("embed", "--num-frames"), ("search", "--top"),
    ],
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_video_options_reject_below_one(command: str, option: str, value: str, capsys) -> None:
    required = {
        "classify": ["clip.mp4", "--labels", "yoga,dance"],
        "train": ["data.csv", "--output-dir", "out"],
        "eval": ["data.csv"],
        "embed": ["clip.mp4", "--out", "out"],
        "search": ["a dog", "--index", "index"],
    }[command]

    with pytest.raises(SystemExit) as raised:
        main(["video", command, *required, f"{option}={value}"])
    error = capsys.readouterr().err

    assert raised.value.code == 2
    assert f"argument {option}: {value} is out of range; pass an integer of 1 or more" in error


def test_classify_rejects_duplicate_labels(video_clips: Path, capsys) -> None:
    clip = video_clips / "clips" / "yoga.mp4"

    code = main(["video", "classify", str(clip), "--labels", "yoga,dance, yoga"])
    error = capsys.readouterr().err

    assert code == 2
    assert "names these labels more than once: 'yoga'" in error


def test_zero_shot_eval_rejects_duplicate_labels(
    tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys
) -> None:
    csv_path = _csv(video_clips, tmp_path)

    code = main(["video", "eval", str(csv_path), "--zero-shot", "--checkpoint", str(tiny_checkpoint),
                 "--labels", "cricket,eye makeup,cricket"])
    error = capsys.readouterr().err

    assert code == 2
    assert "names these labels more than once: 'cricket'" in error


def test_search_rejects_empty_query(tmp_path: Path, capsys) -> None:
    code = main(["video", "search", "  ", "--index", str(tmp_path)])
    error = capsys.readouterr().err

    assert code == 2
    assert "the text query '  ' is empty" in error


@pytest.mark.parametrize("payload", [[], {"video": "clip.mp4", "candidates": []}])
def test_search_rejects_empty_candidates(payload, tmp_path: Path, capsys) -> None:
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(payload), encoding="utf-8")

    code = main(["video", "search", "--captions-json", str(path)])
    error = capsys.readouterr().err

    assert code == 2
    assert str(path) in error
    assert "lists no videos" in error or "'candidates' must be a non-empty list" in error


@pytest.mark.parametrize("command", [["embed", "--out", "out"], ["classify", "--labels", "yoga,dance"]])
def test_video_commands_reject_still_image(command: list[str], tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.JPG"
    Image.new("RGB", (8, 8)).save(photo, format="JPEG")

    code = main(["video", command[0], str(photo), *command[1:]])
    error = capsys.readouterr().err

    assert code == 2
    assert f"{photo} is a still image, not a video; use 'florence embed' for images" in error


def test_video_commands_reject_folder_clip(video_clips: Path, capsys) -> None:
    folder = video_clips / "clips"

    code = main(["video", "classify", str(folder), "--labels", "yoga,dance"])
    error = capsys.readouterr().err

    assert code == 2
    assert f"{folder} is a folder; pass the video files in it" in error


def test_zero_shot_eval_rejects_video_classifier(
    tiny_checkpoint: Path, video_clips: Path, tmp_path: Path, capsys
) -> None:
    csv_path = _csv(video_clips, tmp_path)
    assert _train(csv_path, tmp_path / "run", tiny_checkpoint) == 0
    capsys.readouterr()

    code = main(["video", "eval", str(csv_path), "--zero-shot", "--checkpoint", str(tmp_path / "run")])
    error = capsys.readouterr().err

    assert code == 2
    assert "is a fine-tuned video classifier" in error
    assert "drop --zero-shot" in error
