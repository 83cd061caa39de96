from pathlib import Path

import pytest
import torch

from florence.checkpoint import load_model
from florence.config import load_config
from florence.models import create_model
from florence.models.layers import resize_relative_position_bias_table
from florence.training.trainer import Trainer
from tests.tiny import tiny_model_override

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "recipe"
DATA = REPO / "data" / "cifar10_quickstart"
TABLE = "visual.layers.0.blocks.0.attn.relative_position_bias_table"


def _run_stage(stage: int, tmp_path: Path, *extra: str) -> Trainer:
    overrides = [
        f"output_dir={tmp_path / f'stage{stage}'}",
        "steps=2",
        "precision=fp32",
        "data.batch_size=16",
        "data.num_workers=0",
        "eval.zeroshot.max_images=40",
        *extra,
    ]
    if stage > 1:
        overrides.append(f"init_from={tmp_path / f'stage{stage - 1}' / 'model.safetensors'}")
    trainer = Trainer(load_config(RECIPE / f"tiny_stage{stage}.yaml", overrides))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_recipe_configs_load(stage):
    config = load_config(RECIPE / f"tiny_stage{stage}.yaml")

    assert config.model == "florence-tiny"
    assert config.data.train[0].templates == ("train" if stage == 1 else "none")


def test_recipe_stages_chain_and_resize_bias_tables(tmp_path):
    _run_stage(1, tmp_path, tiny_model_override())
    _run_stage(2, tmp_path, tiny_model_override())
    stage2 = load_model(tmp_path / "stage2" / "model.safetensors")
    table = stage2.state_dict()[TABLE]

    # Stage 3 starts before any update: its weights are stage 2's, tables resized 4 -> 6.
    stage3 = Trainer(
        load_config(
            RECIPE / "tiny_stage3.yaml",
            [
                f"output_dir={tmp_path / 'stage3'}",
                f"init_from={tmp_path / 'stage2'}",
                "data.num_workers=0",
                tiny_model_override(img_size=48, window_size=6),
            ],
        )
    )

    expected = resize_relative_position_bias_table(table, (4, 4), (6, 6))
    assert stage3.model.visual.img_size == (48, 48)
    assert torch.equal(stage3.model.state_dict()[TABLE], expected)
    torch.testing.assert_close(stage3.model.logit_scale, stage2.logit_scale)


def test_init_from_missing_file_names_path(tmp_path):
    missing = tmp_path / "nothing" / "model.safetensors"

    with pytest.raises(FileNotFoundError, match="nothing/model.safetensors"):
        Trainer(load_config(RECIPE / "tiny_stage2.yaml", [f"init_from={missing}", tiny_model_override()]))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_full_size_recipe_configs_build(stage):
    config = load_config(RECIPE / f"florence_h_stage{stage}.yaml")
    model = create_model(config.model, device="meta", **config.model_overrides)

    assert config.strategy == "fsdp"
    assert config.data.batch_size * 512 == 24576
    assert config.data.train[0].type == "webdataset"
    assert config.data.train[0].templates == ("train" if stage == 1 else "none")
    assert model.visual.img_size == ((384, 384) if stage == 3 else (224, 224))
    assert model.visual.window_size == ((12, 12) if stage == 3 else (7, 7))
    assert config.data.image_size == model.visual.img_size[0]


def test_init_from_other_architecture_names_models(tmp_path):
    _run_stage(1, tmp_path, tiny_model_override())

    with pytest.raises(ValueError, match="contains florence-tiny weights, whose shapes differ"):
        Trainer(
            load_config(
                RECIPE / "tiny_stage2.yaml",
                [f"init_from={tmp_path / 'stage1'}", "data.num_workers=0", tiny_model_override(embed_dim=32)],
            )
        )
