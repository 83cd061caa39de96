import json

import pytest
from PIL import Image

from florence.cli.main import main
from tests.adapters.detection.helpers import TINY_BACKBONE

TINY_ARGS = ["--backbone", "florence-tiny", "--backbone-overrides", json.dumps(TINY_BACKBONE), "--channels", "16", "--blocks", "1"]


@pytest.fixture
def trained(coco128, tmp_path_factory):
    output = tmp_path_factory.mktemp("detect")
    args = ["detect", "train", "--data", str(coco128), "--images", "0:2", "--image-size", "64", "--steps", "2",
            "--batch-size", "2", "--warmup-steps", "1", "--output-dir", str(output), *TINY_ARGS]
    assert main(args) == 0
    return output


def test_train_writes_weights_and_checkpoint(trained):
    assert (trained / "model.safetensors").is_file()
    assert (trained / "checkpoints" / "latest").read_text() == "step_0000002"


def test_train_resume_continues_from_checkpoint(trained, coco128):
    args = ["detect", "train", "--data", str(coco128), "--images", "0:2", "--image-size", "64", "--steps", "3",
            "--batch-size", "2", "--output-dir", str(trained), "--resume", *TINY_ARGS]

    assert main(args) == 0
    assert (trained / "checkpoints" / "latest").read_text() == "step_0000003"
    steps = [json.loads(line).get("step") for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


def test_eval_zero_shot_writes_table(trained, coco128, tmp_path, capsys):
    table = tmp_path / "table.md"
    args = ["detect", "eval", "--checkpoint", str(trained / "model.safetensors"), "--data", str(coco128),
            "--images", "0:2", "--image-size", "64", "--zero-shot", "--table", str(table), "--json", str(tmp_path / "m.json")]

    assert main(args) == 0
    assert "| Coco128 Det | 2 | 80 | all |" in table.read_text()
    assert set(json.loads((tmp_path / "m.json").read_text())["Coco128 Det"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_detect_image_draws_boxes(trained, coco128, tmp_path, capsys):
    out = tmp_path / "boxes.png"
    image = coco128 / "images" / "000000000009.jpg"
    args = ["detect", str(image), "--classes", "person,bowl", "--checkpoint", str(trained / "model.safetensors"),
            "--out", str(out), "--min-score", "0", "--image-size", "64"]

    assert main(args) == 0
    with Image.open(out) as drawn, Image.open(image) as original:
        assert drawn.size == original.size
    assert "wrote" in capsys.readouterr().out


def test_detect_missing_image_is_error(trained, tmp_path, capsys):
    args = ["detect", str(tmp_path / "none.jpg"), "--classes", "cat", "--checkpoint", str(trained / "model.safetensors"),
            "--out", str(tmp_path / "x.png")]

    assert main(args) == 2
    assert "not found" in capsys.readouterr().err
