import json
from pathlib import Path

import pytest
import torch

from florence.config import load_config
from florence.training.trainer import Trainer
from tests.tiny import tiny_model_override
from tests.torchrun import torchrun_train

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "florence" / "configs" / "quickstart.yaml"
DATA = REPO / "data" / "cifar10_quickstart"

TINY_OVERRIDES = [
    "precision=fp32",
    "data.num_workers=0",
    f"data.train.0.root={DATA / 'train'}",
    f"data.train.0.classes_file={DATA / 'classes.txt'}",
    "eval.zeroshot=null",
    tiny_model_override(),
]


def test_grad_cache_step_matches_plain_step(tmp_path):
    trainers = {
        chunk: Trainer(
            load_config(
                QUICKSTART,
                [*TINY_OVERRIDES, f"output_dir={tmp_path / str(chunk)}", "data.batch_size=16", f"grad_cache_chunk={chunk}"],
            )
        )
        for chunk in (0, 6)
    }
    _, loader = trainers[0]._loader()
    images, texts, labels, _ = next(iter(loader))

    plain = trainers[0].train_step(images, texts, labels)
    cached = trainers[6].train_step(images, texts, labels)

    assert abs(cached["loss"] - plain["loss"]) < 1e-5
    assert cached["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    expected = dict(trainers[0].model.named_parameters())
    for name, parameter in trainers[6].model.named_parameters():
        torch.testing.assert_close(
            parameter.grad, expected[name].grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_negative_grad_cache_chunk_rejected():
    with pytest.raises(ValueError, match="grad_cache_chunk=-1 must be 0"):
        load_config(QUICKSTART, [*TINY_OVERRIDES, "grad_cache_chunk=-1"])


def test_unknown_strategy_rejected():
    with pytest.raises(ValueError, match="strategy='zero' is invalid; valid strategies: ddp, fsdp"):
        load_config(QUICKSTART, [*TINY_OVERRIDES, "strategy=zero"])


def test_fsdp_ignored_in_one_process(tmp_path):
    config = load_config(QUICKSTART, [*TINY_OVERRIDES, f"output_dir={tmp_path}", "strategy=fsdp", "data.batch_size=4"])
    trainer = Trainer(config)
    _, loader = trainer._loader()
    images, texts, labels, _ = next(iter(loader))

    values = trainer.train_step(images, texts, labels)

    assert not trainer.sharded
    assert values["grad_norm"] > 0


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory) -> list[float]:
    """Return the per-step losses of one process training on batches of 16."""
    output_dir = tmp_path_factory.mktemp("single")
    config = load_config(QUICKSTART, [*TINY_OVERRIDES, f"output_dir={output_dir}", "steps=3", "log_every=1", "data.batch_size=16"])
    Trainer(config).fit()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@pytest.mark.parametrize(
    ("strategy", "grad_cache_chunk", "grad_checkpointing"),
    [("ddp", 0, False), ("ddp", 4, False), ("fsdp", 0, False), ("fsdp", 3, True)],
)
def test_torchrun_two_processes_train(tmp_path, single_process_losses, strategy, grad_cache_chunk, grad_checkpointing):
    # Rank r reads rows 8r to 8r + 7 of each global batch of 16, with the same per-sample
    # augmentation, so the two ranks together see the single process's batches. Gradient
    # checkpointing and the gradient cache change memory use, not the result.
    output_dir = tmp_path / "run"
    result = torchrun_train(
        "--config",
        str(QUICKSTART),
        *TINY_OVERRIDES,
        f"output_dir={output_dir}",
        "steps=3",
        "log_every=1",
        "data.batch_size=8",
        f"grad_cache_chunk={grad_cache_chunk}",
        f"grad_checkpointing={str(grad_checkpointing).lower()}",
        f"strategy={strategy}",
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert (output_dir / "model.safetensors").is_file()
    assert (output_dir / "checkpoints" / "latest").read_text() == "step_0000003"
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    # Only rank 0 writes metrics: one record per step and one final record.
    assert [record["step"] for record in records if "loss" in record] == [1, 2, 3]
    assert records[-1]["step"] == 3
    losses = [record["loss"] for record in records if "loss" in record]
    assert losses == pytest.approx(single_process_losses, rel=1e-4)
