"""Building blocks of the CoSwin image encoder: window attention, window layouts, conv embedding.

Tokens travel between blocks as NHWC maps ``[B, H, W, C]``. A block splits its map into
windows with a :class:`WindowLayout`, which contains everything that depends only on the map
size: the effective window and shift, the padding, the token permutation and the shift mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Logit offset between tokens from different regions of a shifted window, as in timm 1.0.31's Swin.
SHIFT_MASK_VALUE = -100.0


def to_2tuple(value: int | tuple[int, int]) -> tuple[int, int]:
    """Return ``(value, value)`` for an int, or the pair itself."""
    if isinstance(value, int):
        return (value, value)
    height, width = value
    return (int(height), int(width))


class DropPath(nn.Module):
    """Stochastic depth: zeroes the whole residual branch of a random subset of samples in training.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expected output is unchanged.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x

        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            mask.div_(keep_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc2(drop(gelu(fc1(x))))`` with timm's module names."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, in_features, device=device, dtype=dtype)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in float32 and returned in the input's dtype.

    CUDA autocast already runs layer norm in float32, but CPU autocast runs it in bfloat16 or
    float16, whose mean and variance lose precision over wide channels. The parameters and the
    state-dict keys are those of ``nn.LayerNorm``.

    Without autograd (``torch.no_grad`` or ``torch.inference_mode``), a bfloat16 input on CPU
    goes straight to PyTorch's mixed-dtype kernel, which takes float32 weights, computes in
    float32 and writes bfloat16, so no float32 copy is allocated and converted. With torch 2.14
    it took a fifth of the time on a Swin-T stage-1 map (batch 8, one thread). Its output
    differs from the float32 copy's by at most one bfloat16 unit in the last place.
    Training keeps the float32 copy, because that kernel's backward sums the weight and bias
    gradients with visibly less precision. Float16 inputs always take the float32 copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
                return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
            output = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return output.to(x.dtype)


class ConvEmbed(nn.Module):
    """CvT convolutional token embedding: ``Conv2d`` (with bias) then ``LayerNorm`` over channels.

    Takes an NCHW tensor and returns an NHWC token map. An NHWC map permuted to NCHW is
    accepted without a copy, because the convolution keeps the channels-last memory format.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel_size: int,
        stride: int,
        padding: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size, stride=stride, padding=padding, device=device, dtype=dtype
        )
        self.norm = LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x)


def relative_position_index(
    window_size: tuple[int, int],
    table_window_size: tuple[int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the ``[N, N]`` rows of the bias table for each query/key pair of a window.

    The table has one row per relative offset of a ``table_window_size`` window, i.e.
    ``(2 * Mh - 1) * (2 * Mw - 1)`` rows in row-major order of (dy, dx). ``window_size`` may be
    smaller than the table's window (a window clamped to a small feature map). Its offsets are
    a subset of the table's, so it reads the central part of the same table.
    """
    window_height, window_width = window_size
    table_height, table_width = table_window_size
    if window_height > table_height or window_width > table_width:
        raise ValueError(f"window {window_size} is larger than the bias table's window {table_window_size}")

    rows = torch.arange(window_height, device=device).repeat_interleave(window_width)
    cols = torch.arange(window_width, device=device).repeat(window_height)
    delta_rows = rows[:, None] - rows[None, :] + table_height - 1
    delta_cols = cols[:, None] - cols[None, :] + table_width - 1
    return delta_rows * (2 * table_width - 1) + delta_cols


def resize_relative_position_bias_table(
    table: torch.Tensor,
    old_window_size: tuple[int, int],
    new_window_size: tuple[int, int],
) -> torch.Tensor:
    """Resize a ``[(2*Mh-1)*(2*Mw-1), heads]`` bias table to a new window by bicubic interpolation.

    Follows ``load_pretrained`` in microsoft/Swin-Transformer ``utils.py``: each head's table is
    treated as a ``(2*Mh-1) x (2*Mw-1)`` image and resized with ``align_corners=False``. The
    zero offset stays at the centre, so its bias is kept exactly.
    """
    old_height, old_width = 2 * old_window_size[0] - 1, 2 * old_window_size[1] - 1
    new_height, new_width = 2 * new_window_size[0] - 1, 2 * new_window_size[1] - 1
    num_heads = table.shape[1]
    if table.shape[0] != old_height * old_width:
        raise ValueError(
            f"bias table has {table.shape[0]} rows but window {old_window_size} needs {old_height * old_width}"
        )

    image = table.t().reshape(1, num_heads, old_height, old_width).float()
    image = F.interpolate(image, size=(new_height, new_width), mode="bicubic", align_corners=False)
    return image.reshape(num_heads, new_height * new_width).t().to(table.dtype).contiguous()


class _PermuteTokens(torch.autograd.Function):
    """Gather tokens along dim 1 by a permutation, and gather by its inverse in the backward pass.

    Autograd's own backward for ``index_select`` scatters with ``index_add``. On CPU, partition plus
    reverse of a Swin-T stage-1 map (batch 8, 2 threads) took 5.2 ms forward+backward this way
    against 6.0 ms with ``index_select``'s own backward and 7.5 ms with roll plus permute.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse, permutation)
        return x.index_select(1, permutation)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        inverse, permutation = ctx.saved_tensors
        return _PermuteTokens.apply(grad_output, inverse, permutation), None, None


def permute_tokens(x: torch.Tensor, permutation: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Gather the tokens of ``x`` ``[B, L, C]`` in ``permutation`` order (``inverse`` undoes it).

    Uses ``_PermuteTokens`` only when a gradient is needed. Without one (inference, or a
    ``torch.jit.trace`` under ``no_grad``) it is a plain ``index_select``, because TorchScript
    cannot save a graph that calls a custom autograd Function.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _PermuteTokens.apply(x, permutation, inverse)
    return x.index_select(1, permutation)


@dataclass(frozen=True, eq=False)
class WindowLayout:
    """Window partition of one map size for one block: padding, shift, token order and mask.

    The ``[B, H, W, C]`` map is zero-padded at the bottom and right to ``padded_size``, rolled up
    and left by ``shift_size``, and cut into windows of ``window_size``. Padding comes before the
    roll, as in torchvision 0.29's ``shifted_window_attention`` (timm 1.0.31 rolls first).

    ``permutation[p]`` is the flat index in the padded map of the token at flat position ``p`` of
    the window-ordered sequence. It is None when that order is the row-major order already.
    ``mask`` is the ``[num_windows, N, N]`` additive shift mask, or None for unshifted windows.
    Padding tokens are not masked, as in Swin.
    """

    size: tuple[int, int]
    padded_size: tuple[int, int]
    window_size: tuple[int, int]
    shift_size: tuple[int, int]
    num_windows: int
    permutation: torch.Tensor | None
    inverse_permutation: torch.Tensor | None
    mask: torch.Tensor | None
    relative_position_index: torch.Tensor

    @property
    def window_area(self) -> int:
        return self.window_size[0] * self.window_size[1]

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """Split an ``[B, H, W, C]`` map into ``[B * num_windows, N, C]`` windows."""
        batch_size, height, width, channels = x.shape
        padded_height, padded_width = self.padded_size
        if (height, width) != self.padded_size:
            x = F.pad(x, (0, 0, 0, padded_width - width, 0, padded_height - height))

        x = x.reshape(batch_size, padded_height * padded_width, channels)
        if self.permutation is not None:
            x = permute_tokens(x, self.permutation, self.inverse_permutation)
        return x.view(batch_size * self.num_windows, self.window_area, channels)

    def reverse(self, windows: torch.Tensor) -> torch.Tensor:
        """Merge ``[B * num_windows, N, C]`` windows back into an ``[B, H, W, C]`` map."""
        channels = windows.shape[-1]
        padded_height, padded_width = self.padded_size
        x = windows.reshape(-1, padded_height * padded_width, channels)
        if self.permutation is not None:
            x = permute_tokens(x, self.inverse_permutation, self.permutation)

        x = x.view(-1, padded_height, padded_width, channels)
        height, width = self.size
        if (height, width) != self.padded_size:
            x = x[:, :height, :width]
        return x


def _region_labels(length: int, window: int, shift: int, device: torch.device | str | None) -> torch.Tensor:
    """Label the rows (or columns) of a rolled map by the region they came from: 0, 1 or 2."""
    labels = torch.zeros(length, dtype=torch.long, device=device)
    if shift > 0:
        labels[length - window : length - shift] = 1
        labels[length - shift :] = 2
    return labels


def build_window_layout(
    size: tuple[int, int],
    window_size: tuple[int, int],
    shifted: bool,
    device: torch.device | str | None = None,
) -> WindowLayout:
    """Build the :class:`WindowLayout` of an ``H x W`` map for a block with ``window_size`` windows.

    As in timm's Swin, a window larger than the map is clamped to the map along that axis, and
    then that axis is not shifted. Otherwise a shifted block rolls by ``window // 2``. The
    relative position index addresses a bias table built for the unclamped ``window_size``.
    """
    height, width = size
    window_height = min(window_size[0], height)
    window_width = min(window_size[1], width)
    shift_height = window_size[0] // 2 if shifted and height > window_size[0] else 0
    shift_width = window_size[1] // 2 if shifted and width > window_size[1] else 0
    padded_height = math.ceil(height / window_height) * window_height
    padded_width = math.ceil(width / window_width) * window_width
    windows_down = padded_height // window_height
    windows_across = padded_width // window_width

    # source[i, j] is the flat index in the padded map of row i, column j of the rolled map.
    source_rows = (torch.arange(padded_height, device=device) + shift_height) % padded_height
    source_cols = (torch.arange(padded_width, device=device) + shift_width) % padded_width
    source = source_rows[:, None] * padded_width + source_cols[None, :]
    source = source.view(windows_down, window_height, windows_across, window_width)
    permutation = source.transpose(1, 2).reshape(-1)
    inverse_permutation = torch.empty_like(permutation)
    inverse_permutation[permutation] = torch.arange(permutation.numel(), device=device)
    if torch.equal(permutation, torch.arange(permutation.numel(), device=device)):
        permutation = inverse_permutation = None

    mask = None
    if shift_height or shift_width:
        row_labels = _region_labels(padded_height, window_height, shift_height, device)
        col_labels = _region_labels(padded_width, window_width, shift_width, device)
        labels = row_labels[:, None] * 3 + col_labels[None, :]
        labels = labels.view(windows_down, window_height, windows_across, window_width).transpose(1, 2)
        labels = labels.reshape(windows_down * windows_across, window_height * window_width)
        different_region = labels[:, :, None] != labels[:, None, :]
        mask = torch.zeros(different_region.shape, device=device).masked_fill_(different_region, SHIFT_MASK_VALUE)

    return WindowLayout(
        size=(height, width),
        padded_size=(padded_height, padded_width),
        window_size=(window_height, window_width),
        shift_size=(shift_height, shift_width),
        num_windows=windows_down * windows_across,
        permutation=permutation,
        inverse_permutation=inverse_permutation,
        mask=mask,
        relative_position_index=relative_position_index((window_height, window_width), window_size, device),
    )


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with Swin's learned relative position bias.

    The bias table has one row per relative offset in a ``window_size`` window and one column
    per head, as in Swin. ``attn_impl`` picks how the scores are computed:

    - ``"sdpa"``: ``scaled_dot_product_attention`` with bias plus shift mask as a float ``attn_mask``;
    - ``"eager"``: the same arithmetic as explicit matmul and softmax, the reference;
    - ``"auto"`` (default): eager on CPU, SDPA elsewhere. With 49-token windows, PyTorch 2.14's
      CPU SDPA runs either its math backend (5-D inputs, or a mask that needs gradients) with an
      extra NaN-safe softmax, or a flash kernel that is slower at this length. In a benchmark of
      the attention step of Swin-T's first stage (batch 8, 2 threads, forward+backward), eager
      took about 10% less time than SDPA.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int | tuple[int, int] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = to_2tuple(window_size)
        self.attn_impl = "auto"

        table_rows = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_rows, num_heads, device=device, dtype=dtype))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def set_window_size(self, window_size: int | tuple[int, int]) -> None:
        """Resize the bias table to a new window by bicubic interpolation (a new Parameter)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return

        with torch.no_grad():
            table = resize_relative_position_bias_table(
                self.relative_position_bias_table, self.window_size, window_size
            )
        requires_grad = self.relative_position_bias_table.requires_grad
        self.relative_position_bias_table = nn.Parameter(table, requires_grad=requires_grad)
        self.window_size = window_size

    def relative_position_bias(self, index: torch.Tensor) -> torch.Tensor:
        """Gather the ``[heads, N, N]`` bias for a window from the table rows in ``index``."""
        num_tokens = index.shape[0]
        bias = self.relative_position_bias_table[index.view(-1)]
        return bias.view(num_tokens, num_tokens, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
        """Attend within each window of ``x``, shaped ``[B * num_windows, N, C]`` by ``layout``."""
        num_batch_windows, num_tokens, channels = x.shape
        qkv = self.qkv(x)
        attn_mask = self.relative_position_bias(layout.relative_position_index)

        # A shifted layout's mask differs per window, so queries get a separate window axis
        # [B, num_windows, heads, N, head_dim] that the [num_windows, heads, N, N] mask broadcasts
        # over. Expanding the mask to the batch instead would copy it for every image.
        if layout.mask is None:
            qkv = qkv.view(num_batch_windows, num_tokens, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            num_windows = layout.num_windows
            batch_size = num_batch_windows // num_windows
            qkv = qkv.view(batch_size, num_windows, num_tokens, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)
            attn_mask = attn_mask.unsqueeze(0) + layout.mask.unsqueeze(1)
        attn_mask = attn_mask.to(query.dtype)

        if self.attn_impl not in ("auto", "sdpa", "eager"):
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; valid values: 'auto', 'sdpa', 'eager'")
        use_sdpa = self.attn_impl == "sdpa" or (self.attn_impl == "auto" and query.device.type != "cpu")

        # NOTE: CUDA's fused SDPA kernels take 4-D inputs only, so shifted blocks (5-D) fall back
        # to the math backend there. No GPU measurement backs the "auto" choice off CPU.
        if use_sdpa:
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale
            )
        else:
            attn = (query * self.scale) @ key.transpose(-2, -1) + attn_mask
            # Softmax in float32: CPU autocast would otherwise run it in the low precision.
            attn = self.attn_drop(attn.float().softmax(dim=-1).to(value.dtype))
            x = attn @ value

        x = x.transpose(-3, -2).reshape(num_batch_windows, num_tokens, channels)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}"
