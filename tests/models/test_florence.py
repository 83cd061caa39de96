import math

import pytest
import torch
import torch.nn.functional as F

import florence
from florence.models import count_parameters
from florence.models.layers import LayerNorm
from florence.tokenizer import get_tokenizer
from tests.tiny import TINY_MODEL



def test_list_models_has_every_size():
    assert florence.list_models() == ["florence-b", "florence-h", "florence-l", "florence-s", "florence-t", "florence-tiny"]


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'florence-x'; valid names: florence-b"):
        florence.create_model("florence-x")


def test_unknown_override_key_is_rejected():
    with pytest.raises(ValueError, match="unknown model config key 'width'"):
        florence.create_model("florence-tiny", width=3)


def test_florence_h_parameter_counts():
    model = florence.create_model("florence-h", device="meta")
    text = count_parameters(model.text)
    total = count_parameters(model)

    assert text == 257_528_712
    assert abs(text / 256e6 - 1) < 0.02
    assert abs(total / 893e6 - 1) < 0.02
    assert model.text.blocks.__len__() == 12


def test_encoders_return_unit_vectors():
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **TINY_MODEL).eval()
    tokens = get_tokenizer()(["a photo of a cat.", "a dog"])

    with torch.no_grad():
        image_features = model.encode_image(torch.randn(3, 3, 32, 32))
        text_features = model.encode_text(tokens)

    assert image_features.shape == (3, 16)
    assert text_features.shape == (2, 16)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(text_features.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_text_trimming_matches_full_context():
    torch.manual_seed(0)
    text = florence.create_model("florence-tiny", **TINY_MODEL).text.eval()
    tokens = get_tokenizer()(["a photo of a cat.", "a much longer caption about a small dog on a beach"])

    with torch.no_grad():
        trimmed = text(tokens)
        # Run all 77 positions explicitly, as a model without trimming would.
        x = text.token_embedding(tokens) + text.positional_embedding
        for block in text.blocks:
            x = block(x)
        full = text.ln_final(x)[torch.arange(2), tokens.argmax(dim=-1)]

    assert torch.allclose(trimmed, full, atol=1e-5)


def test_logit_scale_init_and_cap():
    model = florence.create_model("florence-tiny", **TINY_MODEL)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)

    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()

    assert model.logit_scale.item() == pytest.approx(math.log(100))


def test_no_weight_decay_names_exist():
    model = florence.create_model("florence-tiny", **TINY_MODEL)
    names = dict(model.named_parameters())

    for name in model.no_weight_decay():
        assert name in names, name
    assert "text.positional_embedding" in model.no_weight_decay()
    assert any("relative_position_bias_table" in name for name in model.no_weight_decay())


def test_text_gradient_through_deduplicated_features_matches_duplicates():
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **TINY_MODEL)
    tokens = get_tokenizer()(["a cat", "a dog", "a cat"])

    def embedding_grad(features: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        (features * torch.arange(features.numel()).view_as(features)).sum().backward()
        return model.text.token_embedding.weight.grad.clone()

    direct = embedding_grad(model.encode_text(tokens))
    deduplicated = embedding_grad(model.encode_text(tokens[:2])[torch.tensor([0, 1, 0])])

    assert torch.allclose(direct, deduplicated, rtol=1e-5, atol=1e-3)


def test_bf16_autocast_gives_float_features_close_to_fp32():
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **TINY_MODEL).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        reference = model.encode_image(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(images)

    assert F.cosine_similarity(reference, low.float()).min() > 0.98


@pytest.mark.parametrize("norm_class", [LayerNorm, torch.nn.LayerNorm], ids=["florence", "torch"])
def test_layer_norm_runs_in_float32_under_fp16_autocast(norm_class):
    # PyTorch's CPU kernel accumulates float16 layer norm in float16; florence's must not.
    torch.manual_seed(0)
    norm = norm_class(512)
    inputs = (torch.randn(8, 512) * 3 + 1).half()

    with torch.autocast("cpu", dtype=torch.float16):
        output = norm(inputs)

    expected = F.layer_norm(inputs.float(), (512,), norm.weight, norm.bias, norm.eps).half()
    assert output.dtype == torch.float16
    assert torch.equal(output, expected) == (norm_class is LayerNorm)


def test_features_are_normalised_in_float32_under_autocast():
    model = florence.create_model("florence-tiny", **TINY_MODEL).eval()
    tokens = get_tokenizer()(["a photo of a cat."])

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encode_text(tokens)

    assert features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(1), atol=1e-6)
