"""Video CoSwin: CoSwin with 3D token embedding, 3D merging and 3D shifted-window attention.

Florence extends CoSwin to video (Yuan et al. 2021, arXiv 2111.11432) by turning
the 2D token-embedding and patch-merging convolutions into 3D convolutions and running
self-attention in 3D shifted local windows (as Video Swin does).

Defaults here:

- stem: ``Conv3d(in_chans, C, (3, k, k), stride (2, s, s), padding (1, p, p))`` + ``LayerNorm``,
  so the stem halves the number of frames, as Video Swin's (2, 4, 4) patches do;
- between stages: ``Conv3d(C, 2C, (3, 3, 3), stride (1, 2, 2), padding (1, 1, 1))`` + ``LayerNorm``,
  which merges tokens overlapping in time but keeps the number of frames;
- blocks: the image model's blocks with windows of (Mt, Mh, Mw) tokens, shifted on every second
  block by half a window along each axis;
- a final ``LayerNorm`` and global average pooling over time, height and width.

Inputs are ``[B, C, T, H, W]`` clips (PyTorch's ``Conv3d`` layout, as torchvision's video
models take). Feature maps are ``[B, T, H, W, C]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence.adapters.video.layers import (
    ConvEmbed3d,
    Size3d,
    WindowAttention3d,
    WindowLayout3d,
    build_window_layout_3d,
    to_3tuple,
)
from florence.models.coswin import WindowBackboneMixin, _validate_config
from florence.models.layers import DropPath, LayerNorm, Mlp, to_2tuple

_logger = logging.getLogger(__name__)

_MAX_CACHED_LAYOUTS = 8


class VideoCoSwinBlock(nn.Module):
    """Pre-norm Swin block over 3D windows, with the image model's parameter names."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Size3d,
        shifted: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = LayerNorm(dim, device=device, dtype=dtype)
        self.attn = WindowAttention3d(
            dim,
            num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            device=device,
            dtype=dtype,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, device=device, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, device=device, dtype=dtype)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, layout: WindowLayout3d) -> torch.Tensor:
        """Map ``[B, T, H, W, C]`` to the same shape, with ``layout`` built for ``(T, H, W)``."""
        windows = layout.partition(self.norm1(x))
        windows = self.attn(windows, layout)
        x = x + self.drop_path1(layout.reverse(windows))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VideoCoSwinStage(nn.Module):
    """One resolution of Video CoSwin: an optional 3D conv merge, then blocks over 3D windows."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Size3d,
        downsample: bool,
        merge_temporal_kernel: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.grad_checkpointing = False
        self._layout_cache: dict[tuple[int, int, int, torch.device], tuple[WindowLayout3d, WindowLayout3d]] = {}

        if downsample:
            self.downsample = ConvEmbed3d(
                in_dim,
                dim,
                kernel_size=(merge_temporal_kernel, 3, 3),
                stride=(1, 2, 2),
                padding=(merge_temporal_kernel // 2, 1, 1),
                device=device,
                dtype=dtype,
            )
        elif in_dim != dim:
            raise ValueError(f"a stage without downsampling needs in_dim == dim, got {in_dim} and {dim}")
        else:
            self.downsample = nn.Identity()

        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            VideoCoSwinBlock(
                dim,
                num_heads,
                window_size=window_size,
                shifted=index % 2 == 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[index],
                device=device,
                dtype=dtype,
            )
            for index in range(depth)
        )

    def window_layouts(self, size: Size3d, device: torch.device) -> tuple[WindowLayout3d, WindowLayout3d]:
        """Return the (regular, shifted) window layouts of a ``T x H x W`` map, cached per size and device."""
        key = (*size, device)
        layouts = self._layout_cache.get(key)
        if layouts is None:
            # Built outside inference mode so that a later training step can save them for backward.
            with torch.inference_mode(False):
                layouts = (
                    build_window_layout_3d(size, self.window_size, shifted=False, device=device),
                    build_window_layout_3d(size, self.window_size, shifted=True, device=device),
                )
            if len(self._layout_cache) >= _MAX_CACHED_LAYOUTS:
                self._layout_cache.pop(next(iter(self._layout_cache)))
            self._layout_cache[key] = layouts
        return layouts

    def set_window_size(self, window_size: Size3d) -> None:
        """Resize every block's bias table to ``window_size`` and drop the cached layouts."""
        self.window_size = window_size
        self._layout_cache.clear()
        for block in self.blocks:
            block.attn.set_window_size(window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, T, H, W, C_in]`` to ``[B, T, H', W', C]`` (``H' = ceil(H / 2)`` if downsampling)."""
        if isinstance(self.downsample, ConvEmbed3d):
            x = self.downsample(x.permute(0, 4, 1, 2, 3))

        layouts = self.window_layouts((x.shape[1], x.shape[2], x.shape[3]), x.device)
        for block in self.blocks:
            layout = layouts[1] if block.shifted else layouts[0]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x


class VideoCoSwin(WindowBackboneMixin, nn.Module):
    """Video CoSwin encoder and optional classifier, with CoSwin's backbone interface.

    Accepts any clip length and frame size: inside each stage the token map is padded to a
    multiple of the window and cropped back, and a window larger than the map is clamped to it,
    with that axis left unshifted. ``num_frames`` and ``img_size`` are nominal sizes kept for
    callers and ``set_input_size``; they do not constrain ``forward``.

    Args:
        num_frames: nominal clip length in frames.
        img_size: nominal frame size in pixels, an int or (height, width).
        window_size: attention window in tokens, (time, height, width).
        stem_temporal_kernel, stem_temporal_stride: temporal size and stride of the stem
            convolution; its temporal padding is ``kernel // 2``.
        merge_temporal_kernel: temporal size of the merging convolutions (stride 1, padding
            ``kernel // 2``).
        Other arguments are CoSwin's: ``in_chans``, ``embed_dim``, ``depths``, ``num_heads``,
        ``mlp_ratio``, ``qkv_bias``, ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``,
        ``stem_kernel_size``, ``stem_stride``, ``stem_padding`` (spatial), ``num_classes``,
        ``global_pool``, ``device``, ``dtype``.
    """

    # Written with ``model_config`` into the metadata of every saved weights file (see save_weights).
    model_name = "video-coswin"

    def __init__(
        self,
        num_frames: int = 16,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Size3d = (8, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        stem_kernel_size: int = 7,
        stem_stride: int = 4,
        stem_padding: int = 2,
        stem_temporal_kernel: int = 3,
        stem_temporal_stride: int = 2,
        merge_temporal_kernel: int = 3,
        num_classes: int = 0,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        window_size = to_3tuple(window_size)
        _validate_config(
            to_2tuple(img_size),
            embed_dim,
            depths,
            num_heads,
            window_size[1:],
            mlp_ratio,
            {"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate},
            {"stem_kernel_size": stem_kernel_size, "stem_stride": stem_stride, "stem_padding": stem_padding},
            num_classes,
            global_pool,
        )
        _validate_temporal_config(num_frames, window_size[0], stem_temporal_kernel, stem_temporal_stride, merge_temporal_kernel)
        # Constructor arguments that no method changes; ``model_config`` adds the ones that can change.
        self._fixed_config = {
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depths": list(depths),
            "num_heads": list(num_heads),
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "drop_rate": drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "drop_path_rate": drop_path_rate,
            "stem_kernel_size": stem_kernel_size,
            "stem_stride": stem_stride,
            "stem_padding": stem_padding,
            "stem_temporal_kernel": stem_temporal_kernel,
            "stem_temporal_stride": stem_temporal_stride,
            "merge_temporal_kernel": merge_temporal_kernel,
        }
        self.num_frames = num_frames
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.window_size = window_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        widths = [embed_dim * 2**stage for stage in range(len(depths))]
        self.num_features = widths[-1]
        self.head_hidden_size = self.num_features

        self.patch_embed = ConvEmbed3d(
            in_chans,
            embed_dim,
            kernel_size=(stem_temporal_kernel, stem_kernel_size, stem_kernel_size),
            stride=(stem_temporal_stride, stem_stride, stem_stride),
            padding=(stem_temporal_kernel // 2, stem_padding, stem_padding),
            device=device,
            dtype=dtype,
        )

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        for stage in range(len(depths)):
            first_block = sum(depths[:stage])
            stages.append(
                VideoCoSwinStage(
                    in_dim=widths[max(stage - 1, 0)],
                    dim=widths[stage],
                    depth=depths[stage],
                    num_heads=num_heads[stage],
                    window_size=window_size,
                    downsample=stage > 0,
                    merge_temporal_kernel=merge_temporal_kernel,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rates[first_block : first_block + depths[stage]],
                    device=device,
                    dtype=dtype,
                )
            )
            reduction = stem_stride * 2**stage
            self.feature_info.append({"num_chs": widths[stage], "reduction": reduction, "module": f"layers.{stage}"})
        self.layers = nn.Sequential(*stages)

        self.norm = LayerNorm(self.num_features, device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, device=device, dtype=dtype)
        if not self.norm.weight.is_meta:
            self.init_weights()

    @property
    def model_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model's architecture with ``VideoCoSwin(**model_config)``.

        They reflect ``reset_classifier`` and ``set_input_size`` calls. ``save_weights`` stores
        them as JSON in the safetensors metadata, next to ``model_name``.
        """
        return {
            **self._fixed_config,
            "num_frames": self.num_frames,
            "img_size": list(self.img_size),
            "window_size": list(self.window_size),
            "num_classes": self.num_classes,
            "global_pool": self.global_pool,
        }

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as CoSwin does: trunc-normal(0.02) Linear weights and bias tables, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttention3d):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        num_frames: int | None = None,
        window_size: int | Size3d | None = None,
    ) -> None:
        """Set the nominal frame size and clip length and/or resize every stage to a new 3D window.

        A new window resizes each block's bias table by trilinear interpolation and replaces it
        with a new Parameter, so call this before building the optimizer.
        """
        if img_size is not None:
            img_size = to_2tuple(img_size)
            if min(img_size) < 1:
                raise ValueError(f"img_size must be positive, got {img_size}")
            self.img_size = img_size
        if num_frames is not None:
            if num_frames < 1:
                raise ValueError(f"num_frames must be positive, got {num_frames}")
            self.num_frames = num_frames
        if window_size is not None:
            window_size = to_3tuple(window_size)
            if min(window_size) < 1:
                raise ValueError(f"window_size must be positive, got {window_size}")
            for stage in self.layers:
                stage.set_window_size(window_size)
            _logger.info("resized relative position bias tables from window %s to %s", self.window_size, window_size)
            self.window_size = window_size

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected clips shaped [B, {self.in_chans}, T, H, W], got {tuple(x.shape)}")
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_chans, T, H, W]`` clips to the last stage's normalised ``[B, T', H', W', C]`` map."""
        x = self._embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCTHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the stages and also return their output maps, as CoSwin's ``forward_intermediates``.

        ``output_fmt`` is ``"NCTHW"`` or ``"NTHWC"``. The other arguments are CoSwin's: ``indices``
        selects stages (all if None, the last ``n`` if an int), ``norm`` applies the final norm
        to the last stage's map, and ``stop_early`` needs ``intermediates_only`` unless the last
        requested stage is the last stage.
        """
        if output_fmt not in ("NCTHW", "NTHWC"):
            raise ValueError(f"unknown output_fmt {output_fmt!r}; valid values: 'NCTHW', 'NTHWC'")
        take_indices = self._feature_indices(indices)
        last_stage = len(self.layers) - 1
        run_until = max(take_indices) if stop_early else last_stage
        if run_until < last_stage and not intermediates_only:
            raise ValueError(
                f"stop_early=True ends at stage {run_until} of {last_stage + 1}, so there is no final output; "
                "pass intermediates_only=True"
            )

        intermediates = []
        x = self._embed(x)
        for index, stage in enumerate(self.layers[: run_until + 1]):
            x = stage(x)
            if index not in take_indices:
                continue
            feature = self.norm(x) if norm and index == last_stage else x
            if output_fmt == "NCTHW":
                feature = feature.permute(0, 4, 1, 2, 3).contiguous()
            intermediates.append(feature)

        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def _feature_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        num_stages = len(self.layers)
        if indices is None:
            return list(range(num_stages))
        if isinstance(indices, int):
            if not 0 < indices <= num_stages:
                raise ValueError(f"indices={indices} asks for the last {indices} of {num_stages} stages")
            return list(range(num_stages - indices, num_stages))

        resolved = []
        for index in indices:
            if not -num_stages <= index < num_stages:
                raise ValueError(f"stage index {index} is out of range for {num_stages} stages")
            resolved.append(index % num_stages)
        if not resolved:
            raise ValueError("indices is empty; name at least one stage")
        return sorted(set(resolved))


def _validate_temporal_config(
    num_frames: int,
    temporal_window: int,
    stem_temporal_kernel: int,
    stem_temporal_stride: int,
    merge_temporal_kernel: int,
) -> None:
    """Raise ValueError naming the first invalid temporal argument; CoSwin's checks cover the rest."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if temporal_window < 1:
        raise ValueError(f"the temporal window must be positive, got {temporal_window}")
    for name, kernel in (("stem_temporal_kernel", stem_temporal_kernel), ("merge_temporal_kernel", merge_temporal_kernel)):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"{name} must be a positive odd number so that 'same' padding is kernel // 2, got {kernel}")
    if stem_temporal_stride < 1:
        raise ValueError(f"stem_temporal_stride must be positive, got {stem_temporal_stride}")
