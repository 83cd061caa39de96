import pytest

import florence
from florence.training.optim import cosine_lr, param_groups
from tests.tiny import TINY_MODEL



def test_param_groups_skip_norms_biases_tables_and_scale():
    model = florence.create_model("florence-tiny", **TINY_MODEL)
    decay, no_decay = param_groups(model, weight_decay=0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name: id(p) for name, p in model.named_parameters()}

    assert decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    assert names["logit_scale"] in no_decay_ids
    assert names["text.positional_embedding"] in no_decay_ids
    assert names["text.ln_final.weight"] in no_decay_ids
    assert names["text.blocks.0.attn.qkv.bias"] in no_decay_ids
    assert names["visual.layers.0.blocks.0.attn.relative_position_bias_table"] in no_decay_ids
    assert names["text.blocks.0.attn.qkv.weight"] not in no_decay_ids
    assert names["visual.patch_embed.proj.weight"] not in no_decay_ids
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_cosine_lr_warms_up_linearly():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)


def test_cosine_lr_decays_to_min_lr():
    assert cosine_lr(10, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.55)
    assert cosine_lr(100, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
    assert cosine_lr(150, 100, 1.0, warmup_steps=10, min_lr=0.1) == pytest.approx(0.1)
