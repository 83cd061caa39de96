"""3D building blocks of Video CoSwin: conv token embedding, window layouts, window attention.

Tokens travel between blocks as ``[B, T, H, W, C]`` maps. A :class:`WindowLayout3d` plays the
role of the image model's ``WindowLayout`` for one (T, H, W) map size, so the attention code and
the block structure are those of the 2D model with one more axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from florence.models.layers import (
    SHIFT_MASK_VALUE,
    LayerNorm,
    WindowAttention,
    permute_tokens,
)

Size3d = tuple[int, int, int]


def to_3tuple(value: int | tuple[int, int, int]) -> Size3d:
    """Return ``(value, value, value)`` for an int, or the triple itself."""
    if isinstance(value, int):
        return (value, value, value)
    time, height, width = value
    return (int(time), int(height), int(width))


class ConvEmbed3d(nn.Module):
    """3D convolutional token embedding: ``Conv3d`` (with bias) then ``LayerNorm`` over channels.

    Takes an NCTHW tensor and returns an NTHWC token map.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel_size: Size3d,
        stride: Size3d,
        padding: Size3d,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv3d(
            in_chans, embed_dim, kernel_size, stride=stride, padding=padding, device=device, dtype=dtype
        )
        self.norm = LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)
        return self.norm(x)


def relative_position_index_3d(
    window_size: Size3d,
    table_window_size: Size3d,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the ``[N, N]`` rows of the 3D bias table for each query/key pair of a window.

    The table has one row per relative offset (dt, dy, dx) of a ``table_window_size`` window,
    ``(2 * Mt - 1) * (2 * Mh - 1) * (2 * Mw - 1)`` rows in row-major order. A smaller
    ``window_size`` (a window clamped to a small map) reads the central part of the same table.
    """
    if any(size > table for size, table in zip(window_size, table_window_size)):
        raise ValueError(f"window {window_size} is larger than the bias table's window {table_window_size}")

    grid = torch.stack(
        torch.meshgrid(*(torch.arange(size, device=device) for size in window_size), indexing="ij")
    ).flatten(1)
    delta = grid[:, :, None] - grid[:, None, :]
    table_time, table_height, table_width = table_window_size
    delta_time = delta[0] + table_time - 1
    delta_rows = delta[1] + table_height - 1
    delta_cols = delta[2] + table_width - 1
    return (delta_time * (2 * table_height - 1) + delta_rows) * (2 * table_width - 1) + delta_cols


def resize_relative_position_bias_table_3d(table: torch.Tensor, old_window: Size3d, new_window: Size3d) -> torch.Tensor:
    """Resize a 3D bias table to a new window by trilinear interpolation of each head's volume.

    The 3D counterpart of Swin's bicubic table resize (``align_corners=False``). PyTorch has no
    tricubic mode.
    """
    old_shape = tuple(2 * size - 1 for size in old_window)
    new_shape = tuple(2 * size - 1 for size in new_window)
    num_heads = table.shape[1]
    if table.shape[0] != math.prod(old_shape):
        raise ValueError(f"bias table has {table.shape[0]} rows but window {old_window} needs {math.prod(old_shape)}")

    volume = table.t().reshape(1, num_heads, *old_shape).float()
    volume = F.interpolate(volume, size=new_shape, mode="trilinear", align_corners=False)
    return volume.reshape(num_heads, math.prod(new_shape)).t().to(table.dtype).contiguous()


@dataclass(frozen=True, eq=False)
class WindowLayout3d:
    """Window partition of one (T, H, W) map size for one block: padding, shift, token order, mask.

    The ``[B, T, H, W, C]`` map is zero-padded at the end of each axis to ``padded_size``, rolled
    back by ``shift_size`` and cut into ``window_size`` windows, as the 2D layout does.

    ``mask`` is the ``[num_windows, N, N]`` additive mask, or None when no window needs one. It
    separates the regions of a shifted window, as in Swin, and it also masks keys that are
    temporal padding, so that a clip's features do not depend on how many frames of padding its
    length needs. Spatial padding is not masked, as in the 2D model, which keeps a clip of
    identical frames equal to the image model on that frame.
    """

    size: Size3d
    padded_size: Size3d
    window_size: Size3d
    shift_size: Size3d
    num_windows: int
    permutation: torch.Tensor | None
    inverse_permutation: torch.Tensor | None
    mask: torch.Tensor | None
    relative_position_index: torch.Tensor

    @property
    def window_volume(self) -> int:
        return math.prod(self.window_size)

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """Split a ``[B, T, H, W, C]`` map into ``[B * num_windows, N, C]`` windows."""
        batch_size, time, height, width, channels = x.shape
        padded_time, padded_height, padded_width = self.padded_size
        if (time, height, width) != self.padded_size:
            x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height, 0, padded_time - time))

        x = x.reshape(batch_size, math.prod(self.padded_size), channels)
        if self.permutation is not None:
            x = permute_tokens(x, self.permutation, self.inverse_permutation)
        return x.view(batch_size * self.num_windows, self.window_volume, channels)

    def reverse(self, windows: torch.Tensor) -> torch.Tensor:
        """Merge ``[B * num_windows, N, C]`` windows back into a ``[B, T, H, W, C]`` map."""
        channels = windows.shape[-1]
        x = windows.reshape(-1, math.prod(self.padded_size), channels)
        if self.permutation is not None:
            x = permute_tokens(x, self.inverse_permutation, self.permutation)

        x = x.view(-1, *self.padded_size, channels)
        time, height, width = self.size
        if (time, height, width) != self.padded_size:
            x = x[:, :time, :height, :width]
        return x


def _region_labels(length: int, window: int, shift: int, device: torch.device | str | None) -> torch.Tensor:
    """Label the positions of a rolled axis by the region they came from: 0, 1 or 2."""
    labels = torch.zeros(length, dtype=torch.long, device=device)
    if shift > 0:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


def _to_window_order(values: torch.Tensor, padded_size: Size3d, window_size: Size3d) -> torch.Tensor:
    """Reshape a ``[T', H', W']`` tensor over the padded map into ``[num_windows, N]``."""
    counts = [padded // window for padded, window in zip(padded_size, window_size)]
    values = values.view(counts[0], window_size[0], counts[1], window_size[1], counts[2], window_size[2])
    return values.permute(0, 2, 4, 1, 3, 5).reshape(math.prod(counts), math.prod(window_size))


def build_window_layout_3d(
    size: Size3d,
    window_size: Size3d,
    shifted: bool,
    device: torch.device | str | None = None,
) -> WindowLayout3d:
    """Build the :class:`WindowLayout3d` of a ``T x H x W`` map for a block with ``window_size`` windows.

    As in the 2D model, a window larger than the map is clamped to the map along that axis, and
    then that axis is not shifted. Otherwise a shifted block rolls by ``window // 2``.
    """
    window = tuple(min(window_axis, size_axis) for window_axis, size_axis in zip(window_size, size))
    shift = tuple(
        window_axis // 2 if shifted and size_axis > window_axis else 0
        for window_axis, size_axis in zip(window_size, size)
    )
    padded = tuple(math.ceil(size_axis / window_axis) * window_axis for size_axis, window_axis in zip(size, window))
    num_windows = math.prod(padded_axis // window_axis for padded_axis, window_axis in zip(padded, window))

    # source[t, i, j] is the flat index in the padded map of the token at (t, i, j) of the rolled map.
    axes = [(torch.arange(padded[axis], device=device) + shift[axis]) % padded[axis] for axis in range(3)]
    source = (axes[0][:, None, None] * padded[1] + axes[1][None, :, None]) * padded[2] + axes[2][None, None, :]
    permutation = _to_window_order(source, padded, window).reshape(-1)
    inverse_permutation = torch.empty_like(permutation)
    inverse_permutation[permutation] = torch.arange(permutation.numel(), device=device)
    if torch.equal(permutation, torch.arange(permutation.numel(), device=device)):
        permutation = inverse_permutation = None

    masked = None
    if any(shift):
        labels = [_region_labels(padded[axis], window[axis], shift[axis], device) for axis in range(3)]
        region = (labels[0][:, None, None] * 3 + labels[1][None, :, None]) * 3 + labels[2][None, None, :]
        region = _to_window_order(region, padded, window)
        masked = region[:, :, None] != region[:, None, :]
    if padded[0] != size[0]:
        is_padding = (axes[0] >= size[0])[:, None, None].expand(padded)
        is_padding = _to_window_order(is_padding.contiguous(), padded, window)
        padding_keys = is_padding[:, None, :].expand(-1, is_padding.shape[1], -1)
        masked = padding_keys if masked is None else masked | padding_keys

    mask = None
    if masked is not None:
        mask = torch.zeros(masked.shape, device=device).masked_fill_(masked, SHIFT_MASK_VALUE)

    return WindowLayout3d(
        size=tuple(size),
        padded_size=padded,
        window_size=window,
        shift_size=shift,
        num_windows=num_windows,
        permutation=permutation,
        inverse_permutation=inverse_permutation,
        mask=mask,
        relative_position_index=relative_position_index_3d(window, tuple(window_size), device),
    )


class WindowAttention3d(WindowAttention):
    """Multi-head self-attention inside 3D windows, with a (time, height, width) relative position bias.

    The attention arithmetic is the image model's :class:`WindowAttention`. Only the bias table
    differs: one row per relative offset (dt, dy, dx) of a ``window_size`` window.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Size3d = (2, 7, 7),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        window_size = to_3tuple(window_size)
        super().__init__(
            dim,
            num_heads,
            window_size=window_size[1:],
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            device=device,
            dtype=dtype,
        )
        self.window_size = window_size
        table_rows = math.prod(2 * size - 1 for size in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, num_heads, device=device, dtype=dtype))

    def set_window_size(self, window_size: int | Size3d) -> None:
        """Resize the bias table to a new 3D window by trilinear interpolation (a new Parameter)."""
        window_size = to_3tuple(window_size)
        if window_size == self.window_size:
            return

        with torch.no_grad():
            table = resize_relative_position_bias_table_3d(
                self.relative_position_bias_table, self.window_size, window_size
            )
        requires_grad = self.relative_position_bias_table.requires_grad
        self.relative_position_bias_table = nn.Parameter(table, requires_grad=requires_grad)
        self.window_size = window_size
