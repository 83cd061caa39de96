import itertools

import pytest
import torch

from florence.adapters.detection.dyhead import DynamicHeadBlock, ModulatedDeformConv
from tests.adapters.detection.helpers import tiny_detector


@pytest.mark.parametrize("size", [(64, 64), (70, 45), (33, 97)])
def test_offsets_match_level_they_modulate(size):
    model = tiny_detector().eval()
    block = model.dyhead[0]
    calls = []

    def record(module, inputs, output):
        _, offset, mask = inputs
        calls.append((module, offset.shape[-2:], mask.shape[-2:], output.shape[-2:]))

    hooks = [m.register_forward_hook(record) for m in block.modules() if isinstance(m, ModulatedDeformConv)]
    with torch.no_grad():
        levels = model.fpn(model.backbone.forward_intermediates(torch.rand(1, 3, *size), indices=3, intermediates_only=True))
        outputs = block(levels)
    for hook in hooks:
        hook.remove()

    # 5 levels: 5 same-level, 4 finer-level and 4 coarser-level convolutions.
    assert len(calls) == 13
    for module, offset_size, mask_size, output_size in calls:
        assert offset_size == output_size, f"{module} offsets {offset_size} vs output {output_size}"
        assert mask_size == output_size, f"{module} masks {mask_size} vs output {output_size}"
    assert [o.shape for o in outputs] == [level.shape for level in levels]


@pytest.mark.parametrize("size", [(64, 64), (70, 45), (33, 97)])
def test_offsets_and_masks_shape_per_level(size):
    model = tiny_detector().eval()
    block: DynamicHeadBlock = model.dyhead[0]
    with torch.no_grad():
        levels = model.fpn(model.backbone.forward_intermediates(torch.rand(2, 3, *size), indices=3, intermediates_only=True))
        for level in levels:
            offset, mask = block.offsets_and_masks(level)

            assert offset.shape == (2, 18, *level.shape[-2:])
            assert mask.shape == (2, 9, *level.shape[-2:])


def test_mask_values_in_unit_interval():
    block = DynamicHeadBlock(16, groups=4)
    torch.nn.init.normal_(block.offset.weight, std=1.0)

    _, mask = block.offsets_and_masks(torch.randn(1, 16, 8, 8))

    assert mask.min() >= 0
    assert mask.max() <= 1


def test_each_level_sized_half_of_previous():
    model = tiny_detector()
    with torch.no_grad():
        levels = model.features(torch.rand(1, 3, 70, 45))
    sizes = [tuple(level.shape[-2:]) for level in levels]

    for finer, coarser in itertools.pairwise(sizes):
        assert coarser == ((finer[0] + 1) // 2, (finer[1] + 1) // 2)
