"""CoSwin: the Florence image encoder (Yuan et al. 2021, arXiv 2111.11432).

CoSwin is a Swin Transformer v1 (Liu et al. 2021, arXiv 2103.14030) whose patch embedding and
patch merging layers are CvT convolutional token embeddings (Wu et al. 2021, arXiv 2103.15808):

- stem: ``Conv2d(in_chans, C, 7, stride 4, padding 2)`` + ``LayerNorm``;
- between stages: ``Conv2d(C, 2C, 3, stride 2, padding 1)`` + ``LayerNorm``;
- blocks: pre-norm window attention with relative position bias, shifted windows on every
  second block, MLP ratio 4 with GELU, stochastic depth;
- no absolute position embedding, a final ``LayerNorm`` and global average pooling.

The class follows timm's ``SwinTransformer`` interface (``forward_features`` returns NHWC,
``forward_intermediates``, ``set_input_size``, ``no_weight_decay``) and its parameter names, so
timm's Swin blocks and CoSwin blocks share state dict keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence.models.layers import (
    ConvEmbed,
    DropPath,
    LayerNorm,
    Mlp,
    WindowAttention,
    WindowLayout,
    build_window_layout,
    to_2tuple,
)

_logger = logging.getLogger(__name__)

# Named sizes. Tiny to large use Swin's widths, depths and heads (head dim 32). Huge is
# chosen to land on Florence's published 637M image-encoder parameters; docs/models.md shows
# the arithmetic.
COSWIN_CONFIGS: dict[str, dict[str, Any]] = {
    "coswin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "coswin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "coswin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7),
    "coswin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7),
    "coswin_huge": dict(embed_dim=352, depths=(2, 2, 16, 2), num_heads=(11, 22, 44, 88), window_size=7),
}

_GLOBAL_POOL_TYPES = ("avg", "")

# Entries kept in each stage's window layout cache, one per input size and device.
_MAX_CACHED_LAYOUTS = 8


class CoSwinBlock(nn.Module):
    """Pre-norm Swin block: ``x + attn(norm1(x))`` over windows, then ``x + mlp(norm2(x))``.

    Whether the windows are shifted is decided by the :class:`WindowLayout` passed to
    ``forward``. ``shifted`` records which layout the owning stage passes.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
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
        self.attn = WindowAttention(
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

    def forward(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Map ``[B, H, W, C]`` to the same shape, with ``layout`` built for ``(H, W)``."""
        windows = layout.partition(self.norm1(x))
        windows = self.attn(windows, layout)
        x = x + self.drop_path1(layout.reverse(windows))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CoSwinStage(nn.Module):
    """One resolution of CoSwin: an optional 3x3 stride-2 conv embedding, then Swin blocks.

    Blocks alternate between regular and shifted windows. The window layouts of both kinds are
    built once per input size and device, and kept in a small cache.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: tuple[int, int],
        downsample: bool,
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
        self._layout_cache: dict[tuple[int, int, torch.device], tuple[WindowLayout, WindowLayout]] = {}

        if downsample:
            self.downsample = ConvEmbed(
                in_dim, dim, kernel_size=3, stride=2, padding=1, device=device, dtype=dtype
            )
        elif in_dim != dim:
            raise ValueError(f"a stage without downsampling needs in_dim == dim, got {in_dim} and {dim}")
        else:
            self.downsample = nn.Identity()

        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            CoSwinBlock(
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

    def window_layouts(self, size: tuple[int, int], device: torch.device) -> tuple[WindowLayout, WindowLayout]:
        """Return the (regular, shifted) window layouts of an ``H x W`` map, cached per size and device."""
        key = (size[0], size[1], device)
        layouts = self._layout_cache.get(key)
        if layouts is None:
            # Layouts built under torch.inference_mode would be inference tensors, which a later
            # training step cannot save for backward. Build them as normal tensors.
            with torch.inference_mode(False):
                layouts = (
                    build_window_layout(size, self.window_size, shifted=False, device=device),
                    build_window_layout(size, self.window_size, shifted=True, device=device),
                )
            if len(self._layout_cache) >= _MAX_CACHED_LAYOUTS:
                self._layout_cache.pop(next(iter(self._layout_cache)))
            self._layout_cache[key] = layouts
        return layouts

    def set_window_size(self, window_size: tuple[int, int]) -> None:
        """Resize every block's bias table to ``window_size`` and drop the cached layouts."""
        self.window_size = window_size
        self._layout_cache.clear()
        for block in self.blocks:
            block.attn.set_window_size(window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map an NHWC ``[B, H, W, C_in]`` map to ``[B, H', W', C]`` (``H' = ceil(H / 2)`` if downsampling)."""
        if isinstance(self.downsample, ConvEmbed):
            x = self.downsample(x.permute(0, 3, 1, 2))

        layouts = self.window_layouts((x.shape[1], x.shape[2]), x.device)
        for block in self.blocks:
            layout = layouts[1] if block.shifted else layouts[0]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, layout, use_reentrant=False)
            else:
                x = block(x, layout)
        return x


def _validate_config(
    img_size: tuple[int, int],
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: tuple[int, int],
    mlp_ratio: float,
    rates: dict[str, float],
    stem: dict[str, int],
    num_classes: int,
    global_pool: str,
) -> None:
    """Raise ValueError naming the first invalid CoSwin constructor argument."""
    if len(depths) != len(num_heads):
        raise ValueError(
            f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage; "
            f"got {len(depths)} and {len(num_heads)}"
        )
    if len(depths) == 0:
        raise ValueError("depths must name at least one stage")
    if any(depth < 1 for depth in depths):
        raise ValueError(f"every stage needs at least one block, got depths {tuple(depths)}")

    if embed_dim < 1:
        raise ValueError(f"embed_dim must be positive, got {embed_dim}")
    for stage, heads in enumerate(num_heads):
        dim = embed_dim * 2**stage
        if heads < 1 or dim % heads != 0:
            raise ValueError(
                f"stage {stage} has width {dim} (embed_dim {embed_dim} * 2**{stage}), which is not divisible "
                f"by num_heads {heads}; choose embed_dim and num_heads so that every stage's width divides"
            )

    if min(window_size) < 1:
        raise ValueError(f"window_size must be positive, got {window_size}")
    if min(img_size) < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")

    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")

    if stem["stem_kernel_size"] < 1 or stem["stem_stride"] < 1 or stem["stem_padding"] < 0:
        raise ValueError(f"invalid stem convolution {stem}: kernel and stride must be >= 1, padding >= 0")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if global_pool not in _GLOBAL_POOL_TYPES:
        raise ValueError(f"unknown global_pool {global_pool!r}; valid values: 'avg', '' (no pooling)")


class WindowBackboneMixin:
    """Classifier, pooling and training switches shared by CoSwin and Video CoSwin.

    The host ``nn.Module`` defines ``layers`` (stages with a ``grad_checkpointing`` flag),
    ``norm``, ``num_features``, ``head``, ``head_drop``, ``global_pool``, ``num_classes`` and
    ``forward_features``, which returns a channels-last map ``[B, ..., C]``.
    """

    def no_weight_decay(self) -> set[str]:
        """Names of the relative position bias tables, as in ``state_dict``, to exclude from weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (``torch.utils.checkpoint``, non-reentrant)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def _make_head(
        self, num_classes: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one of ``num_classes`` outputs (0: none)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            if global_pool not in _GLOBAL_POOL_TYPES:
                raise ValueError(f"unknown global_pool {global_pool!r}; valid values: 'avg', '' (no pooling)")
            self.global_pool = global_pool

        reference = self.norm.weight
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=reference.device, dtype=reference.dtype)
        if isinstance(self.head, nn.Linear) and reference.device.type != "meta":
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the ``forward_features`` map to ``[B, C]`` and apply the classifier unless ``pre_logits``."""
        if self.global_pool == "avg":
            x = x.mean(dim=tuple(range(1, x.ndim - 1)))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CoSwin(WindowBackboneMixin, nn.Module):
    """CoSwin image encoder and optional classifier, with timm's Swin interface.

    Accepts any input size. Inside each stage the token map is padded to a multiple of the
    window and cropped back, and a window larger than the map is clamped to it, with that
    axis left unshifted. ``img_size`` is the nominal input size, kept for callers and for
    ``set_input_size``; it does not constrain ``forward``.

    Args:
        img_size: nominal input size in pixels, an int or (height, width).
        in_chans: input image channels.
        embed_dim: width of the first stage; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths: blocks per stage.
        num_heads: attention heads per stage; each stage's width must divide by them.
        window_size: attention window side in tokens, an int or (height, width).
        mlp_ratio: MLP hidden width as a multiple of the block width.
        qkv_bias: add a bias to the query/key/value projection.
        drop_rate: dropout after the attention projection, inside the MLP, and before the head.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth rate of the last block; it rises linearly from 0.
        stem_kernel_size, stem_stride, stem_padding: the stem convolution (CvT: 7, 4, 2).
        num_classes: classifier outputs; 0 makes ``forward`` return pooled features.
        global_pool: ``"avg"``, or ``""`` to keep the ``[B, H, W, C]`` map.
        device, dtype: where and how to create parameters. On the meta device weight init is skipped.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | tuple[int, int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        stem_kernel_size: int = 7,
        stem_stride: int = 4,
        stem_padding: int = 2,
        num_classes: int = 0,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        img_size = to_2tuple(img_size)
        window_size = to_2tuple(window_size)
        stem = dict(stem_kernel_size=stem_kernel_size, stem_stride=stem_stride, stem_padding=stem_padding)
        rates = dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        _validate_config(
            img_size, embed_dim, depths, num_heads, window_size, mlp_ratio, rates, stem, num_classes, global_pool
        )

        self.img_size = img_size
        self.in_chans = in_chans
        self.window_size = window_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        num_stages = len(depths)
        widths = [embed_dim * 2**stage for stage in range(num_stages)]
        self.embed_dim = embed_dim
        self.num_features = widths[-1]
        self.head_hidden_size = self.num_features

        self.patch_embed = ConvEmbed(
            in_chans, embed_dim, stem_kernel_size, stem_stride, stem_padding, device=device, dtype=dtype
        )

        drop_path_rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        for stage in range(num_stages):
            first_block = sum(depths[:stage])
            stages.append(
                CoSwinStage(
                    in_dim=widths[max(stage - 1, 0)],
                    dim=widths[stage],
                    depth=depths[stage],
                    num_heads=num_heads[stage],
                    window_size=window_size,
                    downsample=stage > 0,
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
            self.feature_info.append(dict(num_chs=widths[stage], reduction=reduction, module=f"layers.{stage}"))
        self.layers = nn.Sequential(*stages)

        self.norm = LayerNorm(self.num_features, device=device, dtype=dtype)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, device=device, dtype=dtype)

        if not self.norm.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as Swin does: trunc-normal(0.02) Linear weights and bias tables, zero biases.

        LayerNorms get ones and zeros. Convolutions keep PyTorch's default init, as timm's Swin
        patch embedding does.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, WindowAttention):
                nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)

    def set_input_size(
        self,
        img_size: int | tuple[int, int] | None = None,
        window_size: int | tuple[int, int] | None = None,
    ) -> None:
        """Set the nominal input size and/or resize every stage to a new attention window.

        A new window resizes each block's relative position bias table by bicubic interpolation
        (Swin's recipe for fine-tuning at 384 with window 12) and replaces it with a new
        Parameter, so call this before building the optimizer.
        """
        if img_size is not None:
            img_size = to_2tuple(img_size)
            if min(img_size) < 1:
                raise ValueError(f"img_size must be positive, got {img_size}")
            self.img_size = img_size

        if window_size is not None:
            window_size = to_2tuple(window_size)
            if min(window_size) < 1:
                raise ValueError(f"window_size must be positive, got {window_size}")
            for stage in self.layers:
                stage.set_window_size(window_size)
            _logger.info("resized relative position bias tables from window %s to %s", self.window_size, window_size)
            self.window_size = window_size

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images shaped [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        return self.patch_embed(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_chans, H, W]`` images to the last stage's normalised ``[B, H', W', C]`` map."""
        x = self._embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the stages and also return their output maps, as timm's ``forward_intermediates``.

        Args:
            x: ``[B, in_chans, H, W]`` images.
            indices: stages to return: all if None, the last ``n`` if an int, else stage indices
                (negative counts from the end).
            norm: apply the final norm to the last stage's map, if it is returned.
            output_fmt: ``"NCHW"`` or ``"NHWC"`` for the returned maps.
            intermediates_only: return only the list of maps.
            stop_early: skip the stages after the last requested one. Unless that is the last
                stage, this needs ``intermediates_only``, because the final output is not computed.

        Returns:
            The list of maps, or ``(forward_features output, list of maps)``.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"unknown output_fmt {output_fmt!r}; valid values: 'NCHW', 'NHWC'")
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
            if output_fmt == "NCHW":
                feature = feature.permute(0, 3, 1, 2).contiguous()
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


def create_coswin(name: str, **overrides: Any) -> CoSwin:
    """Build a named CoSwin from ``COSWIN_CONFIGS``; ``overrides`` replace or add constructor arguments.

    ``create_coswin("coswin_huge", device="meta")`` builds without allocating memory.
    """
    if name not in COSWIN_CONFIGS:
        raise ValueError(f"unknown CoSwin model {name!r}; valid names: {', '.join(COSWIN_CONFIGS)}")
    config = {**COSWIN_CONFIGS[name], **overrides}
    return CoSwin(**config)
