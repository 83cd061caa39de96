"""Tests that the speed-motivated code paths of the CoSwin layers give the reference results.

The reference for the low-precision LayerNorm is layer norm of a float32 copy rounded to the
input's dtype: within one unit in the last place for bfloat16 inference, bit for bit in
training and for float16. The window layout cache is checked across inference mode and training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from florence.models.coswin import CoSwin
from florence.models.layers import LayerNorm

# bfloat16 keeps 8 significant bits, so one unit in the last place is at most 2**-7 of a value.
BFLOAT16_RELATIVE_ULP = 2.0**-7


def reference_layer_norm(norm: LayerNorm, inputs: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(inputs.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps).to(inputs.dtype)


def make_norm(width: int) -> LayerNorm:
    torch.manual_seed(0)
    norm = LayerNorm(width)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    return norm


def test_layer_norm_bfloat16_inference_within_one_ulp():
    norm = make_norm(768)
    # A large common offset makes bfloat16 accumulation of the mean and variance fail visibly.
    inputs = (torch.randn(4, 49, 768) * 2 + 30).bfloat16()

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = norm(inputs)
    expected = reference_layer_norm(norm, inputs)

    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.float(), expected.float(), rtol=BFLOAT16_RELATIVE_ULP, atol=1e-6)


def test_layer_norm_bfloat16_training_matches_float32_copy():
    norm = make_norm(96)
    inputs = (torch.randn(8, 7, 7, 96) * 3).bfloat16()
    upstream = torch.randn(8, 7, 7, 96).bfloat16()

    training_inputs = inputs.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (norm(training_inputs).float() * upstream.float()).sum().backward()
    training = [training_inputs.grad, norm.weight.grad.clone(), norm.bias.grad.clone()]

    norm.zero_grad(set_to_none=True)
    reference_inputs = inputs.clone().requires_grad_()
    (reference_layer_norm(norm, reference_inputs).float() * upstream.float()).sum().backward()
    reference = [reference_inputs.grad, norm.weight.grad, norm.bias.grad]

    for name, training_grad, reference_grad in zip(("input", "weight", "bias"), training, reference):
        assert training_grad.dtype == reference_grad.dtype, name
        assert torch.equal(training_grad, reference_grad), name


def test_layer_norm_float16_matches_float32_copy_exactly():
    norm = make_norm(512)
    inputs = (torch.randn(8, 512) * 3 + 1).half()

    with torch.autocast("cpu", dtype=torch.float16):
        output = norm(inputs)

    assert torch.equal(output, reference_layer_norm(norm, inputs))


def test_training_after_inference_mode_forward():
    torch.manual_seed(0)
    config = {
        "img_size": 32, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "window_size": 4,
        "stem_kernel_size": 3, "stem_stride": 2, "stem_padding": 1, "drop_path_rate": 0.0, "num_classes": 10,
    }
    model = CoSwin(**config)
    fresh = CoSwin(**config)
    fresh.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)

    with torch.inference_mode():
        model.eval()(images)
    model.train()(images).square().sum().backward()
    fresh.train()(images).square().sum().backward()

    for (name, parameter), fresh_parameter in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(parameter.grad, fresh_parameter.grad, rtol=0, atol=0, msg=name)
