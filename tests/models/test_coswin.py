"""Tests of the CoSwin image encoder and its layers.

Block parity is checked against timm's ``SwinTransformerBlock`` and ``WindowAttention`` (the
installed timm), and against a direct transcription of Swin's pad-then-roll block where timm
differs (shifted windows on a map that needs padding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

from florence.models.coswin import COSWIN_CONFIGS, CoSwin, CoSwinBlock, create_coswin
from florence.models.layers import (
    DropPath,
    WindowAttention,
    build_window_layout,
    resize_relative_position_bias_table,
)

# CPU-sized model: 32x32 images, a 3x3 stride-2 stem, 16x16 then 8x8 tokens, window 4, so both
# stages have regular and shifted windows.
TINY_CONFIG = dict(
    img_size=32,
    embed_dim=16,
    depths=(2, 2),
    num_heads=(2, 4),
    window_size=4,
    stem_kernel_size=3,
    stem_stride=2,
    stem_padding=1,
    drop_path_rate=0.0,
)

# Parameter counts of the named sizes without a classifier. They exceed timm 1.0.31's Swin
# counts (27.5M, 48.8M, 86.7M, 195.0M) because 3x3 conv merges have more weights than 2x2 linear
# merges.
EXPECTED_PARAMETERS = {
    "coswin_tiny": 29_462_874,
    "coswin_small": 50_780_778,
    "coswin_base": 90_194_744,
    "coswin_large": 202_753_236,
    "coswin_huge": 633_280_450,
}


def make_tiny(**overrides) -> CoSwin:
    torch.manual_seed(0)
    return CoSwin(**{**TINY_CONFIG, **overrides})


def randomize_(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give every parameter, including LayerNorm affine terms and bias tables, random values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, std)


def set_attn_impl(model: torch.nn.Module, attn_impl: str) -> None:
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.attn_impl = attn_impl


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def swin_reference_block(block: CoSwinBlock, x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Swin's block written out directly: pad to the window, then roll, slice-built shift mask."""
    batch_size, height, width, channels = x.shape
    attn = block.attn
    heads = attn.num_heads
    area = window * window

    shortcut = x
    x = block.norm1(x)
    padded = F.pad(x, (0, 0, 0, (-width) % window, 0, (-height) % window))
    padded_height, padded_width = padded.shape[1:3]
    rolled = torch.roll(padded, (-shift, -shift), dims=(1, 2)) if shift else padded

    def partition(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.view(tensor.shape[0], padded_height // window, window, padded_width // window, window, -1)
        return tensor.permute(0, 1, 3, 2, 4, 5).reshape(-1, area, tensor.shape[-1])

    windows = partition(rolled)
    qkv = attn.qkv(windows).view(-1, area, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    query, key, value = qkv[0], qkv[1], qkv[2]
    scores = (query * attn.scale) @ key.transpose(-2, -1)

    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    index = relative[..., 0] * (2 * window - 1) + relative[..., 1]
    scores = scores + attn.relative_position_bias_table[index].permute(2, 0, 1).unsqueeze(0)

    if shift:
        regions = torch.zeros(1, padded_height, padded_width, 1)
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[:, rows, cols, :] = label
                label += 1
        region_windows = partition(regions).squeeze(-1)
        mask = (region_windows[:, None, :] != region_windows[:, :, None]).float() * -100.0
        num_windows = mask.shape[0]
        scores = scores.view(-1, num_windows, heads, area, area) + mask[None, :, None]
        scores = scores.view(-1, heads, area, area)

    out = (scores.softmax(dim=-1) @ value).transpose(1, 2).reshape(-1, area, channels)
    out = attn.proj(out).view(batch_size, padded_height // window, padded_width // window, window, window, channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch_size, padded_height, padded_width, channels)
    if shift:
        out = torch.roll(out, (shift, shift), dims=(1, 2))
    x = shortcut + out[:, :height, :width]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(
    ("size", "shifted"),
    [((14, 14), False), ((14, 14), True), ((14, 21), True), ((10, 12), False)],
    ids=["regular", "shifted", "shifted-rectangular", "regular-padded"],
)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_block_matches_timm(size, shifted, attn_impl):
    block = CoSwinBlock(32, num_heads=2, window_size=7, shifted=shifted)
    randomize_(block)
    block.attn.attn_impl = attn_impl
    timm_block = SwinTransformerBlock(32, size, num_heads=2, window_size=7, shift_size=3 if shifted else 0)
    timm_block.load_state_dict(block.state_dict())
    x = torch.randn(2, *size, 32)

    layout = build_window_layout(size, (7, 7), shifted=shifted)
    output = block(x, layout)

    assert layout.shift_size == ((3, 3) if shifted else (0, 0))
    torch.testing.assert_close(output, timm_block(x), rtol=0, atol=1e-5)


def test_block_clamped_window_matches_timm():
    """A 5x5 map with window 7: both clamp to one 5x5 window, unshifted, using the table's centre."""
    block = CoSwinBlock(32, num_heads=2, window_size=7, shifted=True)
    randomize_(block)
    timm_block = SwinTransformerBlock(32, (5, 5), num_heads=2, window_size=7, shift_size=3)
    state = block.state_dict()
    table = state["attn.relative_position_bias_table"].view(13, 13, 2)
    state["attn.relative_position_bias_table"] = table[2:11, 2:11].reshape(81, 2)
    timm_block.load_state_dict(state)
    x = torch.randn(2, 5, 5, 32)

    layout = build_window_layout((5, 5), (7, 7), shifted=True)

    assert layout.window_size == (5, 5)
    assert layout.shift_size == (0, 0)
    torch.testing.assert_close(block(x, layout), timm_block(x), rtol=0, atol=1e-5)


def test_window_attention_matches_timm():
    attn = WindowAttention(32, num_heads=4, window_size=7)
    randomize_(attn)
    timm_attn = TimmWindowAttention(32, num_heads=4, window_size=7)
    timm_attn.load_state_dict(attn.state_dict())
    layout = build_window_layout((14, 14), (7, 7), shifted=True)
    windows = torch.randn(2 * layout.num_windows, 49, 32)

    torch.testing.assert_close(attn(windows, layout), timm_attn(windows, mask=layout.mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("size", "shifted"), [((10, 12), True), ((9, 16), True), ((10, 12), False)])
def test_block_padded_matches_swin_reference(size, shifted):
    """timm 1.0.31 rolls before padding, but CoSwin pads first, as torchvision's Swin does."""
    block = CoSwinBlock(32, num_heads=2, window_size=7, shifted=shifted)
    randomize_(block)
    x = torch.randn(2, *size, 32)

    output = block(x, build_window_layout(size, (7, 7), shifted=shifted))
    expected = swin_reference_block(block, x, window=7, shift=3 if shifted else 0)

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_sdpa_matches_eager():
    model = make_tiny(num_classes=10)
    randomize_(model, std=0.1)
    images = torch.randn(2, 3, 32, 32)
    set_attn_impl(model, "sdpa")
    sdpa = model(images)
    sdpa.square().sum().backward()
    sdpa_grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    set_attn_impl(model, "eager")
    eager = model(images)
    eager.square().sum().backward()

    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, sdpa_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_unknown_attn_impl_rejected():
    model = make_tiny()
    set_attn_impl(model, "flash")

    with pytest.raises(ValueError, match="unknown attn_impl 'flash'"):
        model(torch.randn(1, 3, 32, 32))


def test_every_parameter_gets_gradient():
    model = make_tiny(num_classes=10)
    images = torch.randn(2, 3, 32, 32)

    model(images).square().sum().backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_gradients():
    model = make_tiny(num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    model(images).square().sum().backward()
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(images).square().sum().backward()

    assert all(stage.grad_checkpointing for stage in model.layers)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def coswin_tiny() -> CoSwin:
    torch.manual_seed(0)
    return create_coswin("coswin_tiny").eval()


@pytest.mark.parametrize(
    ("size", "stage_sizes"),
    [
        ((224, 224), [(56, 56), (28, 28), (14, 14), (7, 7)]),
        ((256, 256), [(64, 64), (32, 32), (16, 16), (8, 8)]),
        ((300, 200), [(75, 50), (38, 25), (19, 13), (10, 7)]),
    ],
)
def test_coswin_tiny_input_sizes(coswin_tiny, size, stage_sizes):
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        features, intermediates = coswin_tiny.forward_intermediates(images)
        pooled = coswin_tiny(images)

    assert pooled.shape == (1, 768)
    assert features.shape == (1, *stage_sizes[-1], 768)
    assert len(intermediates) == 4
    for stage, (feature, stage_size) in enumerate(zip(intermediates, stage_sizes, strict=True)):
        assert feature.shape == (1, 96 * 2**stage, *stage_size), f"stage {stage}"
    assert torch.isfinite(pooled).all()


def test_tiny_config_32x32():
    model = make_tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        intermediates = model.forward_intermediates(images, intermediates_only=True)
        pooled = model(images)

    assert [tuple(feature.shape) for feature in intermediates] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    assert pooled.shape == (2, 32)
    assert [info["reduction"] for info in model.feature_info] == [2, 4]
    assert [info["num_chs"] for info in model.feature_info] == [16, 32]


def test_small_map_clamps_window():
    """coswin_tiny at 32x32: the last two stages (2x2, 1x1 tokens) get one clamped window."""
    model = create_coswin("coswin_tiny").eval()
    with torch.no_grad():
        intermediates = model.forward_intermediates(torch.randn(1, 3, 32, 32), intermediates_only=True)
    layouts = model.layers[3].window_layouts((1, 1), torch.device("cpu"))

    assert [tuple(feature.shape[2:]) for feature in intermediates] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert layouts[1].window_size == (1, 1)
    assert layouts[1].shift_size == (0, 0)


def test_forward_intermediates_indices():
    model = make_tiny(depths=(1, 1, 1), num_heads=(1, 2, 4)).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features, last_two = model.forward_intermediates(images, indices=2)
        selected = model.forward_intermediates(images, indices=[0, -1], output_fmt="NHWC", intermediates_only=True)
        early = model.forward_intermediates(images, indices=[0], intermediates_only=True, stop_early=True)
        normed = model.forward_intermediates(images, indices=[-1], norm=True, intermediates_only=True)
        expected_features = model.forward_features(images)

    assert [feature.shape[1] for feature in last_two] == [32, 64]
    assert [tuple(feature.shape) for feature in selected] == [(1, 16, 16, 16), (1, 4, 4, 64)]
    assert len(early) == 1
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(normed[0], expected_features.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(images, indices=[3])
    with pytest.raises(ValueError, match="pass intermediates_only=True"):
        model.forward_intermediates(images, indices=[0], stop_early=True)


def test_window_layout_cached_per_size():
    model = make_tiny().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
        first = model.layers[0].window_layouts((16, 16), torch.device("cpu"))
        model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 40, 24))

    assert model.layers[0].window_layouts((16, 16), torch.device("cpu"))[1] is first[1]
    assert len(model.layers[0]._layout_cache) == 2


def test_set_input_size_window_12_at_384():
    model = CoSwin(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7, num_classes=5)
    old_table = model.layers[0].blocks[0].attn.relative_position_bias_table.detach().clone()

    model.set_input_size(img_size=384, window_size=12)
    new_table = model.layers[0].blocks[0].attn.relative_position_bias_table
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 384, 384))
    layout = model.layers[0].window_layouts((96, 96), torch.device("cpu"))[1]

    assert new_table.shape == (23 * 23, 1)
    assert new_table.requires_grad
    torch.testing.assert_close(new_table.view(23, 23)[11, 11], old_table.view(13, 13)[6, 6])
    assert model.img_size == (384, 384)
    assert layout.window_size == (12, 12)
    assert layout.shift_size == (6, 6)
    assert logits.shape == (1, 5)
    assert model.no_weight_decay() <= set(model.state_dict())


def test_resize_bias_table_same_size_is_identity():
    table = torch.randn(13 * 13, 3)

    resized = resize_relative_position_bias_table(table, (7, 7), (7, 7))

    torch.testing.assert_close(resized, table)


def test_resize_bias_table_bicubic_positions():
    """Each new row of a ramp table contains about its source row, (row + 0.5) * 13 / 23 - 0.5.

    PyTorch's bicubic kernel reproduces a ramp only to within about 0.03 (measured), while
    align_corners=True would be 0.12 off at row 5.
    """
    rows = torch.arange(13.0)[:, None].expand(13, 13)
    table = rows.reshape(169, 1)

    resized = resize_relative_position_bias_table(table, (7, 7), (12, 12)).view(23, 23)

    for new_row in (5, 11, 17):
        source_row = (new_row + 0.5) * 13 / 23 - 0.5
        torch.testing.assert_close(resized[new_row], torch.full((23,), source_row), rtol=0, atol=0.05)


def test_stage_blocks_alternate_shift():
    model = make_tiny()
    regular, shifted = model.layers[0].window_layouts((16, 16), torch.device("cpu"))

    assert [block.shifted for stage in model.layers for block in stage.blocks] == [False, True, False, True]
    assert regular.shift_size == (0, 0)
    assert regular.mask is None
    assert shifted.shift_size == (2, 2)
    assert shifted.mask.shape == (16, 16, 16)


def test_no_weight_decay_names():
    model = make_tiny()

    names = model.no_weight_decay()

    assert len(names) == sum(TINY_CONFIG["depths"])
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in names
    assert names <= set(model.state_dict())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_named_size_parameter_count(name):
    model = create_coswin(name, device="meta")

    assert parameter_count(model) == EXPECTED_PARAMETERS[name]
    assert all(parameter.is_meta for parameter in model.parameters())


def test_huge_within_2_percent_of_637m():
    model = create_coswin("coswin_huge", device="meta")

    assert abs(parameter_count(model) / 637e6 - 1) < 0.02


def test_named_sizes_have_head_dim_32():
    for name, config in COSWIN_CONFIGS.items():
        widths = [config["embed_dim"] * 2**stage for stage in range(len(config["depths"]))]
        assert [width // heads for width, heads in zip(widths, config["num_heads"], strict=True)] == [32] * 4, name


def test_create_coswin_unknown_name():
    with pytest.raises(ValueError, match="unknown CoSwin model 'coswin_giant'; valid names: coswin_tiny"):
        create_coswin("coswin_giant")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(embed_dim=20, num_heads=(3, 6)), "not divisible by num_heads 3"),
        (dict(depths=(2, 2, 2)), r"one entry per stage; got 3 and 2"),
        (dict(depths=(2, 0)), "at least one block"),
        (dict(window_size=0), "window_size must be positive"),
        (dict(global_pool="max"), "unknown global_pool 'max'"),
        (dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
        (dict(stem_stride=0), "invalid stem convolution"),
    ],
)
def test_invalid_config_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny(**overrides)


def test_wrong_input_channels_rejected():
    model = make_tiny()

    with pytest.raises(ValueError, match=r"expected images shaped \[B, 3, H, W\], got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


def test_reset_classifier():
    model = make_tiny()
    assert isinstance(model.get_classifier(), torch.nn.Identity)

    model.reset_classifier(7)
    logits = model(torch.randn(2, 3, 32, 32))

    assert logits.shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8, 8, 32)


def test_bfloat16_autocast_runs():
    model = make_tiny(num_classes=10)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))

    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


def test_drop_path_zeroes_and_rescales_samples():
    torch.manual_seed(0)
    drop_path = DropPath(0.5).train()

    output = drop_path(torch.ones(256, 4))

    kept = output[:, 0] != 0
    assert 64 < kept.sum() < 192
    assert torch.all(output[kept] == 2.0)
    assert torch.all(output[~kept] == 0.0)
    assert torch.equal(drop_path.eval()(torch.ones(3, 4)), torch.ones(3, 4))
