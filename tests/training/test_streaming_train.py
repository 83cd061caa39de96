import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from florence.config import load_config
from florence.training.trainer import Trainer
from tests.shard_data import write_quickstart_shards
from tests.tiny import tiny_model_override
from tests.torchrun import torchrun_train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_CONFIG = REPO / "florence" / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """160 quickstart images in 4 shards: 10 batches of 16 per epoch-equivalent."""
    folder = tmp_path_factory.mktemp("train_shards")
    write_quickstart_shards(folder, limit=160, max_samples=40)
    return folder


def _config(shards: Path, output_dir: Path, steps: int, *extra: str):
    return load_config(
        QUICKSTART_CONFIG,
        [
            f"output_dir={output_dir}",
            f"steps={steps}",
            "precision=fp32",
            "checkpoint_every=7",
            "log_every=5",
            "data.batch_size=16",
            "data.num_workers=0",
            f"data.train=[{{type: webdataset, urls: '{shards}', templates: train, shuffle_buffer: 50}}]",
            "eval.zeroshot=null",
            "optim.warmup_steps=5",
            tiny_model_override(drop_path_rate=0.1),
            *extra,
        ],
    )


def test_train_from_shards_runs(shards, tmp_path):
    trainer = Trainer(_config(shards, tmp_path / "run", 3))
    results = trainer.fit()

    assert results["step"] == 3
    assert results["skipped_samples"] == 0
    assert len(trainer.dataset) == 160


def test_resume_from_shards_matches_uninterrupted_run(shards, tmp_path):
    Trainer(_config(shards, tmp_path / "straight", 14)).fit()

    # Stopping at step 7 resumes within the first epoch-equivalent, and step 10 crosses into the next.
    Trainer(_config(shards, tmp_path / "resumed", 14)).fit(stop_after=7)
    resumed = Trainer(_config(shards, tmp_path / "resumed", 14, "resume=true"))
    resumed.fit()

    assert resumed.state.step == 14
    assert (resumed.state.epoch, resumed.state.batch_in_epoch) == (1, 4)
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), f"{name} differs after resume"


def test_mixed_shards_and_files_rejected(shards, tmp_path):
    config = _config(shards, tmp_path / "run", 2)
    files = load_config(QUICKSTART_CONFIG).data.train[0]
    config.data.train.append(files)

    with pytest.raises(ValueError, match="mixes webdataset sources with classification"):
        Trainer(config)


def test_torchrun_fsdp_fp16_from_shards(shards, tmp_path):
    # Two ranks read disjoint slots of the shards, with a DataLoader worker each, under FSDP
    # with fp16 loss scaling: the combination a cluster run of the full-size recipe uses.
    output_dir = tmp_path / "run"
    result = torchrun_train(
        "--config",
        str(QUICKSTART_CONFIG),
        "--strategy",
        "fsdp",
        f"output_dir={output_dir}",
        "steps=6",
        "log_every=1",
        "precision=fp16",
        "data.batch_size=8",
        "data.num_workers=1",
        f"data.train=[{{type: webdataset, urls: '{shards}', templates: train, shuffle_buffer: 50}}]",
        "eval.zeroshot=null",
        tiny_model_override(),
    )

    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4, 5, 6]
    assert all("loss_scale" in record for record in steps)
    assert any(record["nonfinite"] == 0.0 for record in steps)
    weights = load_file(output_dir / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
