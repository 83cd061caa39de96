import shutil
from pathlib import Path

import pytest
import torch

from florence.config import load_config
from florence.data.dataset import ImageLoadError
from florence.training.trainer import Trainer
from tests.tiny import tiny_model_override

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "florence" / "configs" / "quickstart.yaml"
DATA = REPO / "data" / "cifar10_quickstart"


def _make_folder_with_bad_images(root: Path) -> tuple[Path, Path]:
    """Copy 24 real images of two classes and add a truncated JPEG and a non-image file."""
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for source in sorted((DATA / "train" / name).glob("*.jpg"))[:12]:
            shutil.copy(source, root / name / source.name)
    real = (root / "cat" / "0000.jpg").read_bytes()
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes(real[: len(real) // 2])
    not_an_image = root / "dog" / "notes.jpg"
    not_an_image.write_text("not an image")
    return truncated, not_an_image


def _config(root: Path, output: Path, *extra: str):
    return load_config(
        QUICKSTART,
        [
            f"output_dir={output}",
            "steps=3",
            "precision=fp32",
            "data.batch_size=13",
            "data.num_workers=0",
            f"data.train.0.root={root}",
            "data.train.0.classes_file=null",
            "eval.zeroshot=null",
            tiny_model_override(),
            *extra,
        ],
    )


def test_bad_images_are_skipped_counted_and_logged(tmp_path, caplog):
    truncated, not_an_image = _make_folder_with_bad_images(tmp_path / "images")
    torch.set_num_threads(1)

    results = Trainer(_config(tmp_path / "images", tmp_path / "run")).fit()

    assert results["step"] == 3
    assert results["skipped_samples"] >= 1
    assert str(truncated) in caplog.text or str(not_an_image) in caplog.text


def test_strict_mode_fails_with_the_path(tmp_path):
    _make_folder_with_bad_images(tmp_path / "images")
    trainer = Trainer(_config(tmp_path / "images", tmp_path / "run", "data.strict=true", "steps=10"))

    with pytest.raises(ImageLoadError, match=r"(truncated|notes)\.jpg.*strict=False"):
        trainer.fit()
