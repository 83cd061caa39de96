"""A tiny florence-tiny variant shared by the tests: builds in milliseconds, trains a step in well under a second."""

import json

TINY_MODEL = dict(
    embed_dim=16,
    vision_cfg=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4),
    text_cfg=dict(width=32, layers=1, heads=2),
)


def tiny_model_override(**vision: object) -> str:
    """Return a ``model_overrides=...`` config override for TINY_MODEL, with extra vision keys."""
    config = {**TINY_MODEL, "vision_cfg": {**TINY_MODEL["vision_cfg"], **vision}}
    return "model_overrides=" + json.dumps(config)
