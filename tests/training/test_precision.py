import json
from pathlib import Path

import pytest
import torch

from florence.checkpoint import load_model
from florence.config import load_config
from florence.training.checkpointing import latest_checkpoint
from florence.training.trainer import Trainer
from tests.tiny import tiny_model_override

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "florence" / "configs" / "quickstart.yaml"
DATA = REPO / "data" / "cifar10_quickstart"


def _trainer(output_dir: Path, *extra: str) -> Trainer:
    config = load_config(
        QUICKSTART,
        [
            f"output_dir={output_dir}",
            "steps=20",
            "log_every=1",
            "data.batch_size=16",
            "data.num_workers=0",
            f"data.train.0.root={DATA / 'train'}",
            f"data.train.0.classes_file={DATA / 'classes.txt'}",
            "eval.zeroshot=null",
            tiny_model_override(),
            *extra,
        ],
    )
    return Trainer(config)


def _first_batch(trainer: Trainer):
    _, loader = trainer._loader()
    images, texts, labels, _ = next(iter(loader))
    return images, texts, labels


def _poison_image_features(trainer: Trainer):
    """Make the image tower return NaN, as an overflowing activation would."""
    return trainer.model.visual.register_forward_hook(lambda module, inputs, output: output * float("nan"))


def _parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}


def test_fp16_step_loss_matches_fp32(tmp_path):
    full = _trainer(tmp_path / "fp32", "precision=fp32")
    half = _trainer(tmp_path / "fp16", "precision=fp16")
    batch = _first_batch(full)

    reference = full.train_step(*batch)
    # The first steps overflow at the initial scale of 2**16; each skip halves the scale and
    # leaves the weights as they were, so the first finite step starts from the same weights.
    overflows = [half.train_step(*batch) for _ in range(4)]
    scaled = next(values for values in overflows if not values["nonfinite"])

    assert scaled["loss"] == pytest.approx(reference["loss"], rel=1e-2)
    assert scaled["grad_norm"] == pytest.approx(reference["grad_norm"], rel=5e-2)
    assert scaled["loss_scale"] < 65536.0


def test_fp16_grad_cache_loss_is_unscaled(tmp_path):
    plain = _trainer(tmp_path / "plain", "precision=fp16")
    cached = _trainer(tmp_path / "cached", "precision=fp16", "grad_cache_chunk=6")
    batch = _first_batch(plain)

    assert cached.train_step(*batch)["loss"] == pytest.approx(plain.train_step(*batch)["loss"], rel=1e-3)


def test_nonfinite_step_is_skipped(tmp_path):
    trainer = _trainer(tmp_path / "run")
    batch = _first_batch(trainer)
    before = _parameters(trainer)

    hook = _poison_image_features(trainer)
    values = trainer.train_step(*batch)
    hook.remove()

    assert values["nonfinite"] == 1.0
    for name, parameter in trainer.model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert trainer.optimizer.state_dict()["state"] == {}
    assert trainer.train_step(*batch)["nonfinite"] == 0.0


def test_fp16_overflow_lowers_loss_scale(tmp_path):
    trainer = _trainer(tmp_path / "run", "precision=fp16")
    batch = _first_batch(trainer)

    hook = _poison_image_features(trainer)
    values = trainer.train_step(*batch)
    hook.remove()

    assert values["nonfinite"] == 1.0
    assert values["loss_scale"] == 32768.0
    assert values["loss"] != values["loss"]


def test_nonfinite_steps_in_a_row_stop_with_checkpoint(tmp_path):
    trainer = _trainer(tmp_path / "run", "max_nonfinite_steps=3", "checkpoint_every=0")
    initial = _parameters(trainer)
    _poison_image_features(trainer)

    with pytest.raises(FloatingPointError, match="3 steps in a row, up to step 3"):
        trainer.fit()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["nonfinite_steps"] for record in records] == [1, 2, 3]
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step_0000003"
    restored = dict(load_model(checkpoint / "model.safetensors").named_parameters())
    for name, parameter in initial.items():
        assert torch.equal(restored[name], parameter), name


def test_fp16_checkpoint_keeps_loss_scale(tmp_path):
    first = _trainer(tmp_path / "run", "precision=fp16", "steps=2", "checkpoint_every=2")
    first.fit()

    resumed = _trainer(tmp_path / "run", "precision=fp16", "steps=2", "resume=true")
    resumed.maybe_resume()

    # The tiny model's first fp16 steps overflow, so the scale has left its initial value.
    assert first.scaler.get_scale() < 65536.0
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
