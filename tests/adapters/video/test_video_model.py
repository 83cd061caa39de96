"""Tests of Video CoSwin: 3D window attention, inflation from CoSwin, gradients and odd sizes."""

from __future__ import annotations

import math

import pytest
import torch

from florence.adapters.video import VideoCoSwin, inflate_coswin
from florence.adapters.video.inflate import inflate_bias_table, inflate_conv_weight
from florence.adapters.video.layers import WindowAttention3d, build_window_layout_3d
from florence.models.coswin import CoSwin

# CPU-sized CoSwin: 32x32 frames, 16x16 then 8x8 tokens, window 4, so both stages have regular
# and shifted windows.
IMAGE_CONFIG = {
    "img_size": 32,
    "embed_dim": 16,
    "depths": (2, 2),
    "num_heads": (2, 4),
    "window_size": 4,
    "stem_kernel_size": 3,
    "stem_stride": 2,
    "stem_padding": 1,
    "drop_path_rate": 0.0,
}
VIDEO_CONFIG = {**IMAGE_CONFIG, "window_size": (2, 4, 4), "num_frames": 8}


def _reference_window_attention(
    attn: WindowAttention3d, x: torch.Tensor, window_size: tuple[int, int, int], shifted: bool
) -> torch.Tensor:
    """Compute shifted-window attention of a ``[B, T, H, W, C]`` map as one masked full attention.

    Every token of the padded, rolled map attends to every other, with -inf on keys outside its
    window, keys from another region of a shifted window, and keys that are temporal padding.
    """
    batch_size, *size, channels = x.shape
    window = [min(w, s) for w, s in zip(window_size, size)]
    shift = [w // 2 if shifted and s > w else 0 for w, s in zip(window_size, size)]
    padded = [math.ceil(s / w) * w for s, w in zip(size, window)]

    x = torch.nn.functional.pad(
        x, (0, 0, 0, padded[2] - size[2], 0, padded[1] - size[1], 0, padded[0] - size[0])
    )
    x = torch.roll(x, shifts=[-s for s in shift], dims=(1, 2, 3))

    coords = torch.stack(torch.meshgrid(*(torch.arange(p) for p in padded), indexing="ij"), dim=-1).reshape(-1, 3)
    window_id = coords // torch.tensor(window)
    region = torch.zeros_like(coords)
    for axis in range(3):
        if shift[axis]:
            position = coords[:, axis]
            region[:, axis] = (position >= padded[axis] - window[axis]).long() + (position >= padded[axis] - shift[axis]).long()
    source_time = (coords[:, 0] + shift[0]) % padded[0]
    allowed = (window_id[:, None] == window_id[None]).all(-1) & (region[:, None] == region[None]).all(-1)
    allowed &= (source_time < size[0])[None, :]

    delta = coords[:, None] - coords[None] + torch.tensor(window_size) - 1
    index = (delta[..., 0] * (2 * window_size[1] - 1) + delta[..., 1]) * (2 * window_size[2] - 1) + delta[..., 2]
    # Pairs outside one window have no table row; they are masked, so any valid row will do.
    index = index.clamp(0, attn.relative_position_bias_table.shape[0] - 1)
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)

    tokens = x.reshape(batch_size, -1, channels)
    qkv = attn.qkv(tokens).view(batch_size, tokens.shape[1], 3, attn.num_heads, attn.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    logits = (query * attn.scale) @ key.transpose(-2, -1) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ value).transpose(1, 2).reshape(batch_size, -1, channels)
    out = attn.proj(out).view(batch_size, *padded, channels)

    out = torch.roll(out, shifts=shift, dims=(1, 2, 3))
    return out[:, : size[0], : size[1], : size[2]]


@pytest.mark.parametrize(
    "size, window_size, shifted",
    [
        ((4, 8, 8), (2, 4, 4), False),
        ((4, 8, 8), (2, 4, 4), True),
        ((5, 7, 6), (2, 4, 4), False),
        ((5, 7, 6), (2, 4, 4), True),
        ((3, 9, 5), (2, 4, 4), True),
        ((7, 5, 6), (4, 4, 4), True),
        ((1, 4, 4), (2, 4, 4), True),
    ],
)
def test_window_attention_3d_matches_masked_attention(
    size: tuple[int, int, int], window_size: tuple[int, int, int], shifted: bool
) -> None:
    torch.manual_seed(0)
    attn = WindowAttention3d(8, 2, window_size=window_size)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.5)
    x = torch.randn(2, *size, 8)

    layout = build_window_layout_3d(size, window_size, shifted=shifted)
    output = layout.reverse(attn(layout.partition(x), layout))
    expected = _reference_window_attention(attn, x, window_size, shifted)

    assert output.shape == x.shape
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_frames", [1, 2, 3, 8, 9])
def test_inflation_identical_frames_match_image_model(num_frames: int) -> None:
    torch.manual_seed(0)
    image_model = CoSwin(**IMAGE_CONFIG).eval()
    video_model = inflate_coswin(image_model, temporal_window=2).eval()
    images = torch.randn(2, 3, 32, 32)
    clips = images[:, :, None].expand(-1, -1, num_frames, -1, -1).contiguous()

    with torch.no_grad():
        image_features = image_model(images)
        video_features = video_model(clips)

    torch.testing.assert_close(video_features, image_features, atol=1e-5, rtol=0)


def test_inflation_odd_frame_size_matches_image_model() -> None:
    torch.manual_seed(0)
    image_model = CoSwin(**IMAGE_CONFIG).eval()
    video_model = inflate_coswin(image_model, temporal_window=3, stem_temporal_kernel=5).eval()
    images = torch.randn(1, 3, 37, 29)
    clips = images[:, :, None].expand(-1, -1, 7, -1, -1).contiguous()

    with torch.no_grad():
        image_features = image_model(images)
        video_features = video_model(clips)

    torch.testing.assert_close(video_features, image_features, atol=1e-5, rtol=0)


def test_inflation_classifier_matches_image_model() -> None:
    torch.manual_seed(0)
    image_model = CoSwin(**IMAGE_CONFIG, num_classes=5).eval()
    video_model = inflate_coswin(image_model).eval()
    images = torch.randn(2, 3, 32, 32)
    clips = images[:, :, None].expand(-1, -1, 4, -1, -1).contiguous()

    with torch.no_grad():
        expected = image_model(images)
        logits = video_model(clips)

    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_inflate_conv_weight_center_tap() -> None:
    weight = torch.randn(4, 3, 3, 3)
    inflated = inflate_conv_weight(weight, 3)

    assert inflated.shape == (4, 3, 3, 3, 3)
    assert torch.equal(inflated[:, :, 1], weight)
    assert inflated[:, :, 0].abs().sum() == 0
    assert inflated[:, :, 2].abs().sum() == 0


def test_inflate_conv_weight_average_sums_to_image_kernel() -> None:
    weight = torch.randn(4, 3, 3, 3)
    inflated = inflate_conv_weight(weight, 5, temporal_init="average")

    torch.testing.assert_close(inflated.sum(dim=2), weight)


def test_inflate_conv_weight_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown temporal_init 'edge'"):
        inflate_conv_weight(torch.randn(1, 1, 3, 3), 3, temporal_init="edge")


def test_inflate_bias_table_copies_every_temporal_offset() -> None:
    table = torch.randn(7 * 7, 3)
    inflated = inflate_bias_table(table, (4, 4), (3, 4, 4))

    assert inflated.shape == (5 * 7 * 7, 3)
    for offset in range(5):
        assert torch.equal(inflated[offset * 49 : (offset + 1) * 49], table)


def test_video_coswin_every_parameter_gets_gradient() -> None:
    torch.manual_seed(0)
    model = VideoCoSwin(**VIDEO_CONFIG, num_classes=3)
    clips = torch.randn(2, 3, 5, 32, 32)

    model(clips).square().sum().backward()

    no_grad = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    zero_grad = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is not None and parameter.grad.abs().sum() == 0
    ]
    assert no_grad == []
    assert zero_grad == []


@pytest.mark.parametrize("clip_shape", [(1, 17, 23), (3, 31, 9), (7, 33, 35), (2, 5, 5)])
def test_video_coswin_odd_clip_sizes(clip_shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = VideoCoSwin(**VIDEO_CONFIG, num_classes=3).eval()
    time, height, width = clip_shape

    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, time, height, width))
        logits = model.forward_head(features)

    expected_time = math.ceil(time / 2)
    expected_height = math.ceil(math.ceil(height / 2) / 2)
    expected_width = math.ceil(math.ceil(width / 2) / 2)
    assert features.shape == (1, expected_time, expected_height, expected_width, 32)
    assert logits.shape == (1, 3)
    assert torch.isfinite(logits).all()


def test_video_coswin_grad_checkpointing_same_output() -> None:
    torch.manual_seed(0)
    model = VideoCoSwin(**VIDEO_CONFIG)
    clips = torch.randn(1, 3, 4, 32, 32)
    expected = model(clips)

    model.set_grad_checkpointing(True)
    output = model(clips)
    output.sum().backward()

    torch.testing.assert_close(output, expected)
    assert model.patch_embed.proj.weight.grad is not None


def test_video_coswin_forward_intermediates_shapes() -> None:
    model = VideoCoSwin(**VIDEO_CONFIG).eval()
    clips = torch.randn(1, 3, 4, 32, 32)

    with torch.no_grad():
        final, maps = model.forward_intermediates(clips)
        nthwc = model.forward_intermediates(clips, indices=[0], output_fmt="NTHWC", intermediates_only=True)
        features = model.forward_features(clips)

    assert [tuple(feature.shape) for feature in maps] == [(1, 16, 2, 16, 16), (1, 32, 2, 8, 8)]
    assert tuple(nthwc[0].shape) == (1, 2, 16, 16, 16)
    torch.testing.assert_close(final, features)


def test_video_coswin_set_input_size_resizes_tables() -> None:
    model = VideoCoSwin(**VIDEO_CONFIG)
    model.set_input_size(img_size=48, num_frames=12, window_size=(3, 6, 6))

    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert model.img_size == (48, 48)
    assert model.num_frames == 12
    assert table.shape == (5 * 11 * 11, 2)
    assert model(torch.randn(1, 3, 6, 48, 48)).shape == (1, 32)


def test_video_coswin_no_weight_decay_names_tables() -> None:
    model = VideoCoSwin(**VIDEO_CONFIG)
    names = model.no_weight_decay()

    assert len(names) == 4
    assert all(name.endswith("relative_position_bias_table") for name in names)


def test_video_coswin_rejects_image_batch() -> None:
    model = VideoCoSwin(**VIDEO_CONFIG)
    with pytest.raises(ValueError, match=r"expected clips shaped \[B, 3, T, H, W\]"):
        model(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"stem_temporal_kernel": 2}, "stem_temporal_kernel must be a positive odd number"),
        ({"merge_temporal_kernel": 0}, "merge_temporal_kernel must be a positive odd number"),
        ({"num_frames": 0}, "num_frames must be positive"),
        ({"window_size": (0, 4, 4)}, "temporal window must be positive"),
        ({"num_heads": (3, 4)}, "not divisible by num_heads 3"),
        ({"drop_path_rate": 1.5}, r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_video_coswin_rejects_invalid_config(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VideoCoSwin(**{**VIDEO_CONFIG, **override})
