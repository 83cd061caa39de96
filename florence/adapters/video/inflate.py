"""Build a Video CoSwin from a 2D CoSwin or Florence model by weight inflation.

Inflation rule (``temporal_init="center"``, the default):

- every 2D convolution kernel ``[O, I, k, k]`` becomes a 3D kernel ``[O, I, kt, k, k]`` that is
  zero except at the centre temporal tap ``kt // 2``, which contains the 2D kernel. Because
  the temporal padding is ``kt // 2``, the centre tap of every output frame reads a real
  frame, so each output frame is exactly the 2D convolution of one input frame;
- every relative position bias table ``[(2Mh-1)(2Mw-1), heads]`` is copied to every temporal
  offset dt of the ``[(2Mt-1)(2Mh-1)(2Mw-1), heads]`` table, so the initial bias depends only on
  the spatial offset;
- all other weights (norms, attention, MLPs, the classifier) are copied unchanged.

With these weights a clip of identical frames gives the image model's pooled features on that
frame: every temporal token equals the image model's token, and each key of a 3D window is
then one of ``Mt`` identical copies of a 2D key with the same bias, so softmax gives the 2D
attention output. Temporal padding keys are masked (see ``WindowLayout3d``).

``temporal_init="average"`` spreads the 2D kernel evenly over the ``kt`` taps. It keeps the
response to a constant clip only away from the clip's first and last ``kt // 2`` frames,
because the temporal zero padding enters there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from florence.adapters.video.layers import to_3tuple
from florence.adapters.video.model import VideoCoSwin
from florence.models.coswin import COSWIN_CONFIGS, CoSwin
from florence.models.layers import resize_relative_position_bias_table

_logger = logging.getLogger(__name__)

TEMPORAL_INIT_MODES = ("center", "average")


def coswin_config(image_model: CoSwin) -> dict[str, Any]:
    """Return the constructor arguments of ``image_model`` that Video CoSwin shares with CoSwin."""
    stages = list(image_model.layers)
    first_block = stages[0].blocks[0]
    stem = image_model.patch_embed.proj
    return {
        "img_size": image_model.img_size,
        "in_chans": image_model.in_chans,
        "embed_dim": image_model.embed_dim,
        "depths": tuple(len(stage.blocks) for stage in stages),
        "num_heads": tuple(stage.blocks[0].attn.num_heads for stage in stages),
        "mlp_ratio": first_block.mlp.fc1.out_features / first_block.mlp.fc1.in_features,
        "qkv_bias": first_block.attn.qkv.bias is not None,
        "stem_kernel_size": stem.kernel_size[0],
        "stem_stride": stem.stride[0],
        "stem_padding": stem.padding[0],
        "num_classes": image_model.num_classes,
        "global_pool": image_model.global_pool,
    }


def inflate_conv_weight(weight: torch.Tensor, temporal_kernel: int, temporal_init: str = "center") -> torch.Tensor:
    """Turn a 2D kernel ``[O, I, k, k]`` into a 3D kernel ``[O, I, kt, k, k]`` (see the module docstring)."""
    if temporal_init not in TEMPORAL_INIT_MODES:
        raise ValueError(f"unknown temporal_init {temporal_init!r}; valid values: {', '.join(TEMPORAL_INIT_MODES)}")
    if temporal_init == "average":
        return weight.unsqueeze(2).repeat(1, 1, temporal_kernel, 1, 1) / temporal_kernel

    inflated = weight.new_zeros(weight.shape[0], weight.shape[1], temporal_kernel, *weight.shape[2:])
    inflated[:, :, temporal_kernel // 2] = weight
    return inflated


def inflate_bias_table(
    table: torch.Tensor, image_window: tuple[int, int], video_window: tuple[int, int, int]
) -> torch.Tensor:
    """Copy a 2D bias table to every temporal offset of a ``video_window`` table.

    A 2D table of another spatial window is first resized bicubically, as for a window change
    in the image model.
    """
    spatial_window = tuple(video_window[1:])
    if tuple(image_window) != spatial_window:
        table = resize_relative_position_bias_table(table, tuple(image_window), spatial_window)
    return table.repeat(2 * video_window[0] - 1, 1)


def inflate_state_dict(
    image_state: dict[str, torch.Tensor],
    video_model: VideoCoSwin,
    image_window: tuple[int, int],
    temporal_init: str = "center",
) -> dict[str, torch.Tensor]:
    """Map a CoSwin state dict (``visual.`` prefixes allowed) onto ``video_model``'s keys and shapes."""
    if any(name.startswith("visual.") for name in image_state):
        image_state = {name[len("visual.") :]: value for name, value in image_state.items() if name.startswith("visual.")}

    targets = video_model.state_dict()
    inflated = {}
    for name, value in image_state.items():
        if name not in targets:
            continue
        target = targets[name]
        if name.endswith("relative_position_bias_table"):
            value = inflate_bias_table(value, image_window, video_model.window_size)
        elif value.ndim == 4 and target.ndim == 5:
            value = inflate_conv_weight(value, target.shape[2], temporal_init)
        if value.shape != target.shape:
            raise ValueError(f"{name}: the image weight inflates to {tuple(value.shape)}, the video model needs {tuple(target.shape)}")
        inflated[name] = value
    return inflated


def inflate_coswin(
    image_model: CoSwin,
    temporal_window: int = 2,
    num_frames: int = 16,
    temporal_init: str = "center",
    **video_overrides: Any,
) -> VideoCoSwin:
    """Build a Video CoSwin with ``image_model``'s architecture and inflated weights.

    Args:
        image_model: a CoSwin, or a Florence model's ``visual`` tower.
        temporal_window: the attention window's length in temporal tokens; the spatial window
            is the image model's.
        num_frames: nominal clip length.
        temporal_init: ``"center"`` (exact on clips of identical frames) or ``"average"``.
        video_overrides: other Video CoSwin arguments, e.g. ``stem_temporal_kernel``.
    """
    config = coswin_config(image_model)
    image_window = tuple(image_model.window_size)
    config.update(window_size=(temporal_window, *image_window), num_frames=num_frames, drop_path_rate=0.0)
    config.update(video_overrides)
    config["window_size"] = to_3tuple(config["window_size"])

    reference = image_model.norm.weight
    video_model = VideoCoSwin(**config, device=reference.device, dtype=reference.dtype)
    state = inflate_state_dict(image_model.state_dict(), video_model, image_window, temporal_init)
    result = video_model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise RuntimeError(f"inflation left video weights without an image counterpart: {result.missing_keys}")
    return video_model


def load_image_coswin(path: str | Path, coswin_name: str | None = None) -> CoSwin:
    """Load the CoSwin of a Florence checkpoint, or a bare CoSwin checkpoint given its config name.

    A Florence checkpoint written by ``florence train`` names its model in the safetensors
    metadata. A CoSwin state dict without metadata needs ``coswin_name``, one of ``COSWIN_CONFIGS``.
    """
    from florence.checkpoint import load_model, load_weights, read_metadata

    metadata = read_metadata(path)
    if metadata.get("model_name") == VideoCoSwin.model_name:
        raise ValueError(
            f"{path} contains Video CoSwin weights, not an image model; load it with "
            "florence.adapters.video.classifier.load_video_classifier or florence video eval"
        )
    if "model_name" in metadata:
        return load_model(path, device="cpu").visual
    if coswin_name is None:
        raise ValueError(
            f"{path} has no model_name in its metadata; pass the CoSwin config name "
            f"(one of {', '.join(COSWIN_CONFIGS)})"
        )
    if coswin_name not in COSWIN_CONFIGS:
        raise ValueError(f"unknown CoSwin model {coswin_name!r}; valid names: {', '.join(COSWIN_CONFIGS)}")
    image_model = CoSwin(**COSWIN_CONFIGS[coswin_name])
    load_weights(image_model, path, strict=True)
    return image_model


def load_video_coswin(path: str | Path, coswin_name: str | None = None, **inflate_kwargs: Any) -> VideoCoSwin:
    """Build a Video CoSwin inflated from a 2D checkpoint; ``inflate_kwargs`` go to :func:`inflate_coswin`."""
    image_model = load_image_coswin(path, coswin_name)
    video_model = inflate_coswin(image_model, **inflate_kwargs)
    _logger.info("inflated %s into a Video CoSwin with window %s", path, video_model.window_size)
    return video_model
