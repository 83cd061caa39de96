from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from florence.checkpoint import load_model, save_weights
from florence.data.dataset import ClassificationDataset
from florence.data.transforms import build_eval_transform
from florence.evaluation.finetune import finetune
from florence.evaluation.zeroshot import build_zero_shot_classifier, zero_shot_accuracy
from florence.models import create_model
from florence.tokenizer import get_tokenizer
from tests.evaluation.features import DATA, class_names
from tests.tiny import TINY_MODEL

SOURCE = {"root": str(DATA / "test"), "classes_file": str(DATA / "classes.txt")}
FAST = ("data.num_workers=0", "log_every=1")


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = create_model("florence-tiny", **TINY_MODEL)
    path = tmp_path / "init" / "model.safetensors"
    save_weights(model, path)
    return path


def test_finetune_checkpoint_loads_and_scores(tiny_checkpoint, tmp_path):
    classes = class_names()
    path = finetune(
        tiny_checkpoint, classes, SOURCE, tmp_path / "finetuned",
        steps=3, batch_size=16, lr=1e-3, image_size=32, extra_overrides=FAST,
    )

    model = load_model(path).eval()
    initial = load_model(tiny_checkpoint)
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, initial.state_dict()[name])]
    assert any(name.startswith("visual.") for name in changed)

    dataset = ClassificationDataset(SOURCE["root"], build_eval_transform(32), classes_file=SOURCE["classes_file"])
    loader = DataLoader(torch.utils.data.Subset(dataset, range(0, len(dataset), 20)), batch_size=50)
    classifier = build_zero_shot_classifier(model, get_tokenizer(), classes, ["{}"])
    metrics = zero_shot_accuracy(model, classifier, loader)
    assert metrics["num_samples"] == 100
    assert 0.0 <= metrics["top1"] <= 100.0


def test_finetune_repeatable(tiny_checkpoint, tmp_path):
    arguments = {"steps": 2, "batch_size": 8, "lr": 1e-3, "image_size": 32, "seed": 1, "extra_overrides": FAST}
    first = finetune(tiny_checkpoint, class_names(), SOURCE, tmp_path / "first", **arguments)
    second = finetune(tiny_checkpoint, class_names(), SOURCE, tmp_path / "second", **arguments)

    first_state, second_state = load_model(first).state_dict(), load_model(second).state_dict()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)


def test_finetune_rejects_open_clip_weights(tmp_path):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    path = tmp_path / "open_clip.safetensors"
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, str(path))

    with pytest.raises(ValueError, match="not a florence checkpoint"):
        finetune(path, class_names(), SOURCE, tmp_path / "out", steps=1, batch_size=4, lr=1e-3, image_size=32)


def test_finetune_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        finetune("ViT-B-32", class_names(), SOURCE, tmp_path / "out", steps=1, batch_size=4, lr=1e-3, image_size=32)


def test_finetune_class_mismatch_raises(tiny_checkpoint, tmp_path):
    classes = list(reversed(class_names()))

    with pytest.raises(ValueError, match="differ from the classes"):
        finetune(tiny_checkpoint, classes, SOURCE, tmp_path / "out", steps=1, batch_size=4, lr=1e-3, image_size=32)


@pytest.mark.parametrize(
    "arguments",
    [{"steps": 0}, {"batch_size": 1}, {"lr": 0.0}, {"precision": "fp8"}, {"templates": "imagenet"}],
)
def test_finetune_invalid_arguments_raise(tiny_checkpoint, tmp_path, arguments):
    values = {"steps": 1, "batch_size": 4, "lr": 1e-3, "image_size": 32} | arguments

    with pytest.raises(ValueError):
        finetune(tiny_checkpoint, class_names(), SOURCE, tmp_path / "out", **values)
