"""Named Florence model configurations and the ``create_model`` / ``list_models`` entry points."""

from __future__ import annotations

import copy
from typing import Any

import torch

from florence.models.coswin import COSWIN_CONFIGS
from florence.models.florence import Florence

# Text tower sizes. Florence's published figure is a 12-layer Transformer of 256M parameters;
# width and heads are not published. Width 1176 with 21 heads of 56 keeps CLIP's MLP ratio 4
# and gives 257.5M parameters with the 49,408-token embedding (docs/models.md has the sum).
_TEXT_FLORENCE = dict(width=1176, layers=12, heads=21)
_TEXT_CLIP_BASE = dict(width=512, layers=12, heads=8)
_TEXT_CLIP_LARGE = dict(width=768, layers=12, heads=12)


def _vision(name: str, **overrides: Any) -> dict[str, Any]:
    config = dict(COSWIN_CONFIGS[name])
    config.update(overrides)
    return config


MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # CPU-sized: 32x32 inputs, a 3x3 stride-2 stem, three stages at 16, 8 and 4 tokens a side.
    "florence-tiny": dict(
        embed_dim=256,
        vision_cfg=dict(
            img_size=32, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8), window_size=8,
            stem_kernel_size=3, stem_stride=2, stem_padding=1, drop_path_rate=0.0,
        ),
        text_cfg=dict(width=128, layers=4, heads=4, context_length=77),
    ),
    "florence-t": dict(embed_dim=512, vision_cfg=_vision("coswin_tiny"), text_cfg=_TEXT_CLIP_BASE),
    "florence-s": dict(embed_dim=512, vision_cfg=_vision("coswin_small"), text_cfg=_TEXT_CLIP_BASE),
    "florence-b": dict(embed_dim=512, vision_cfg=_vision("coswin_base"), text_cfg=_TEXT_CLIP_BASE),
    "florence-l": dict(embed_dim=768, vision_cfg=_vision("coswin_large"), text_cfg=_TEXT_CLIP_LARGE),
    "florence-h": dict(embed_dim=1024, vision_cfg=_vision("coswin_huge"), text_cfg=_TEXT_FLORENCE),
}


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str) -> dict[str, Any]:
    """Return a deep copy of the named configuration, or raise with the valid names."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return copy.deepcopy(MODEL_CONFIGS[name])


def merge_model_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``overrides`` such as ``{"vision_cfg": {"drop_path_rate": 0.1}}`` to ``config``.

    Unknown top-level keys are rejected; nested keys are checked by the tower constructors.
    """
    merged = copy.deepcopy(config)
    for key, value in overrides.items():
        if key not in ("embed_dim", "vision_cfg", "text_cfg", "init_logit_scale"):
            raise ValueError(
                f"unknown model config key {key!r}; valid keys: embed_dim, vision_cfg, text_cfg, init_logit_scale"
            )
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def create_model(
    name: str,
    checkpoint: str | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> Florence:
    """Build a named Florence model, optionally loading weights from a safetensors checkpoint.

    ``device="meta"`` builds without allocating memory, which makes parameter counting of the
    large sizes instant. Weights are never downloaded: ``checkpoint`` is a local path.
    """
    config = merge_model_config(get_model_config(name), overrides)
    model = Florence(**config, device=device)
    model.model_name = name
    model.model_config = config
    if checkpoint is not None:
        from florence.checkpoint import load_weights

        load_weights(model, checkpoint)
    return model


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
