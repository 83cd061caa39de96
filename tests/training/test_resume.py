from pathlib import Path

import torch
from safetensors.torch import load_file

from florence.config import load_config
from florence.training.trainer import Trainer
from tests.tiny import tiny_model_override

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "florence" / "configs" / "quickstart.yaml"
DATA = REPO / "data" / "cifar10_quickstart"


def _config(output_dir: Path, steps: int, *extra: str):
    return load_config(
        QUICKSTART,
        [
            f"output_dir={output_dir}",
            f"steps={steps}",
            "precision=fp32",
            "checkpoint_every=10",
            "log_every=5",
            "data.batch_size=16",
            "data.num_workers=0",
            f"data.train.0.root={DATA / 'train'}",
            f"data.train.0.classes_file={DATA / 'classes.txt'}",
            "optim.warmup_steps=5",
            # Drop path is on so that the model's own use of the RNG is covered too.
            tiny_model_override(drop_path_rate=0.1),
            *extra,
        ],
    )



def test_resume_matches_uninterrupted_run(tmp_path):
    straight = Trainer(_config(tmp_path / "straight", 20))
    straight.fit()

    first_half = Trainer(_config(tmp_path / "resumed", 20))
    first_half.fit(stop_after=10)
    second_half = Trainer(_config(tmp_path / "resumed", 20, "resume=true"))
    assert second_half.config.resume
    second_half.fit()

    expected = load_file(tmp_path / "straight" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"


def test_resume_without_checkpoint_starts_at_zero(tmp_path):
    trainer = Trainer(_config(tmp_path / "fresh", 2, "resume=true"))
    trainer.fit()

    assert trainer.state.step == 2


def test_checkpoint_folder_is_complete(tmp_path):
    Trainer(_config(tmp_path / "run", 10)).fit()
    checkpoints = tmp_path / "run" / "checkpoints"

    assert (checkpoints / "latest").read_text() == "step_0000010"
    assert (checkpoints / "step_0000010" / "model.safetensors").is_file()
    assert (checkpoints / "step_0000010" / "trainer_state.pt").is_file()
    assert not list(checkpoints.glob(".*.tmp"))
