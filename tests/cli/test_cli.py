import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "cifar10_quickstart"
SMALL_MODEL = (
    "model_overrides={embed_dim: 32, vision_cfg: {embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4},"
    " text_cfg: {width: 32, layers: 1, heads: 2}}"
)


def florence(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "florence.cli.main", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A few quickstart steps with a small model; returns the output folder."""
    output = tmp_path_factory.mktemp("cli") / "run"
    result = florence(
        "train",
        f"output_dir={output}",
        "steps=4",
        "log_every=2",
        "checkpoint_every=2",
        "data.batch_size=32",
        "data.num_workers=0",
        "eval.zeroshot.max_images=64",
        SMALL_MODEL,
    )
    assert result.returncode == 0, result.stderr
    assert "zeroshot_top1:" in result.stdout
    return output


def test_train_writes_weights_metrics_and_checkpoints(trained):
    assert (trained / "model.safetensors").is_file()
    assert (trained / "checkpoints" / "latest").read_text() == "step_0000004"
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert any('"loss"' in line for line in lines)
    assert any('"zeroshot_top1"' in line for line in lines)
    assert list((trained / "tensorboard").iterdir())


def test_train_resume_continues_to_new_step_count(trained, tmp_path):
    output = tmp_path / "resumed"
    shutil.copytree(trained, output)

    result = florence("train", "--resume", f"output_dir={output}", "steps=6", "data.batch_size=32",
                      "data.num_workers=0", "eval.zeroshot.max_images=32", SMALL_MODEL)

    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr
    assert "step: 6" in result.stdout


def test_eval_zeroshot_prints_top1(trained):
    result = florence("eval", "zeroshot", "--checkpoint", str(trained / "model.safetensors"),
                      "--data", str(DATA / "test"), "--classes", str(DATA / "classes.txt"), "--max-images", "50")

    assert result.returncode == 0, result.stderr
    assert "zeroshot_top1:" in result.stdout
    assert "zeroshot_num_samples: 50" in result.stdout


def test_classify_ranks_labels_for_real_photos(trained, tmp_path):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    paths = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(str(path))

    result = florence("classify", *paths, "--labels", "cat,coffee,rocket,person",
                      "--checkpoint", str(trained / "model.safetensors"))

    assert result.returncode == 0, result.stderr
    for path in paths:
        assert path in result.stdout
    assert result.stdout.count("%") == 16


def test_models_lists_every_size():
    result = florence("models")

    assert result.returncode == 0, result.stderr
    for name in ("florence-tiny", "florence-t", "florence-b", "florence-h"):
        assert name in result.stdout


def test_unknown_config_key_lists_valid_keys(tmp_path):
    result = florence("train", f"output_dir={tmp_path}", "optim.learning_rate=1")

    assert result.returncode == 2
    assert "unknown key(s) learning_rate in config.optim; valid keys: lr" in result.stderr


def test_unknown_flag_lists_valid_options():
    result = florence("train", "--learning-rate", "1")

    assert result.returncode == 2
    assert "--config" in result.stderr
    assert "--resume" in result.stderr


def test_classify_missing_image_names_path(trained, tmp_path):
    missing = tmp_path / "missing.jpg"
    result = florence("classify", str(missing), "--labels", "cat,dog", "--checkpoint", str(trained / "model.safetensors"))

    assert result.returncode == 2
    assert str(missing) in result.stderr


def test_train_outside_repository_explains_data_path(tmp_path):
    result = florence("train", f"output_dir={tmp_path / 'run'}", cwd=tmp_path)

    assert result.returncode == 2
    assert "data/cifar10_quickstart/train" in result.stderr
    assert "repository root" in result.stderr
