import pytest
import torch

from florence.adapters.detection import load_detector
from florence.checkpoint import save_weights
from tests.adapters.detection.helpers import tiny_detector


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 44.0, 20.0]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.mark.parametrize("classifier", ["text", "linear"])
def test_every_trainable_parameter_gets_gradient(classifier):
    torch.manual_seed(0)
    model = tiny_detector(classifier=classifier)

    losses = model.loss(model(torch.rand(2, 3, 48, 48)), _targets())
    losses["loss"].backward()

    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert torch.isfinite(losses["loss"])
    assert losses["box"] > 0


def test_text_tower_is_frozen():
    model = tiny_detector()

    trainable = [name for name, p in model.named_parameters() if p.requires_grad and name.startswith("text")]

    assert trainable == []


def test_zero_shot_class_lists_on_one_checkpoint(tmp_path):
    save_weights(tiny_detector(), tmp_path / "model.safetensors")
    model = load_detector(str(tmp_path / "model.safetensors")).eval()
    model.model_config["score_threshold"] = 0.0
    images = torch.rand(1, 3, 40, 56)

    for class_names in (["person"], ["person", "dog", "bicycle"], [f"class {i}" for i in range(7)]):
        outputs = model(images, class_names)
        predictions = model.predict(images, class_names=class_names)

        assert outputs["cls_logits"].shape[-1] == len(class_names)
        assert predictions[0]["labels"].max() < len(class_names)


def test_checkpoint_round_trip_gives_same_outputs(tmp_path):
    model = tiny_detector().eval()
    save_weights(model, tmp_path / "model.safetensors")
    loaded = load_detector(str(tmp_path / "model.safetensors")).eval()
    images = torch.rand(1, 3, 32, 32)

    with torch.no_grad():
        expected, actual = model(images)["cls_logits"], loaded(images)["cls_logits"]

    torch.testing.assert_close(actual, expected)


def test_linear_classifier_rejects_unknown_class():
    model = tiny_detector(classifier="linear")

    with pytest.raises(ValueError, match="no output for \\['zebra'\\]"):
        model(torch.rand(1, 3, 32, 32), ["zebra"])


def test_linear_classifier_selects_subset_of_classes():
    model = tiny_detector(classifier="linear").eval()
    images = torch.rand(1, 3, 32, 32)

    with torch.no_grad():
        both = model(images)["cls_logits"]
        dog = model(images, ["dog"])["cls_logits"]

    torch.testing.assert_close(dog, both[..., 1:])


def test_predictions_clipped_to_image_size():
    model = tiny_detector().eval()
    model.model_config["score_threshold"] = 0.0

    prediction = model.predict(torch.rand(1, 3, 64, 64), image_sizes=[(50, 40)])[0]

    assert len(prediction["boxes"]) == model.model_config["max_detections"]
    assert prediction["boxes"][:, [0, 2]].max() <= 40
    assert prediction["boxes"][:, [1, 3]].max() <= 50


def test_unknown_config_key_rejected():
    with pytest.raises(ValueError, match="unknown detector config keys"):
        tiny_detector(num_block=3)


def test_florence_weights_initialise_encoders(tmp_path):
    from florence.adapters.detection.model import load_florence_weights
    from florence.models import create_model
    from tests.adapters.detection.helpers import TINY_BACKBONE

    florence = create_model("florence-tiny", **TINY_BACKBONE)
    save_weights(florence, tmp_path / "florence.safetensors")
    model = tiny_detector()

    load_florence_weights(model, str(tmp_path / "florence.safetensors"))

    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, florence.visual.patch_embed.proj.weight)
    torch.testing.assert_close(model.text_projection.weight, florence.text_projection.weight)
