import warnings

import numpy as np
import pytest
import torch

import florence
from florence.checkpoint import load_model
from florence.export import ImageTower, _check_export, _check_inputs, export_model
from florence.tokenizer import get_tokenizer
from tests.tiny import TINY_MODEL

TEXTS = ["a dog", "two children climbing a very long set of wooden stairs in a house", "!", "a red bicycle on a beach"]


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint).eval()


def _inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    # Batch sizes differ from the traced examples (2), so the batch axis must be dynamic.
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, get_tokenizer(model.context_length)(TEXTS)


def test_onnx_matches_pytorch(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'florence-vision[export]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'florence-vision[export]')")
    paths = export_model(model, tmp_path, "onnx")
    images, tokens = _inputs(model)

    image_session = onnxruntime.InferenceSession(str(paths["image_tower"]), providers=["CPUExecutionProvider"])
    text_session = onnxruntime.InferenceSession(str(paths["text_tower"]), providers=["CPUExecutionProvider"])
    image_out = image_session.run(None, {"images": images.numpy()})[0]
    text_out = text_session.run(None, {"tokens": tokens.numpy()})[0]
    with torch.no_grad():
        image_ref = model.encode_image(images).numpy()
        text_ref = model.encode_text(tokens).numpy()

    assert image_out.shape == (5, model.embed_dim)
    assert text_out.shape == (len(TEXTS), model.embed_dim)
    np.testing.assert_allclose(image_out, image_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(text_out, text_ref, atol=1e-4, rtol=0)


def test_torchscript_matches_pytorch(model, tmp_path):
    paths = export_model(model, tmp_path, "torchscript")
    images, tokens = _inputs(model)

    image_tower = torch.jit.load(str(paths["image_tower"]))
    text_tower = torch.jit.load(str(paths["text_tower"]))
    with torch.no_grad():
        torch.testing.assert_close(image_tower(images), model.encode_image(images), atol=1e-4, rtol=0)
        torch.testing.assert_close(text_tower(tokens), model.encode_text(tokens), atol=1e-4, rtol=0)


def test_export_writes_description(model, tmp_path):
    import json

    export_model(model, tmp_path, "torchscript")
    description = json.loads((tmp_path / "export.json").read_text())

    assert description["files"] == {"image_tower": "image_tower.pt", "text_tower": "text_tower.pt"}
    assert description["image_input"]["shape"] == ["batch", 3, 32, 32]


def test_export_unknown_format_raises(model, tmp_path):
    with pytest.raises(ValueError, match="valid formats: onnx, torchscript"):
        export_model(model, tmp_path, "tflite")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_silences_tracer_warnings(model, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx is not installed (pip install 'florence-vision[export]')")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_model(model, tmp_path, fmt)

    assert [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []


def test_export_check_rejects_other_model(model, tmp_path):
    paths = export_model(model, tmp_path, "torchscript")
    torch.manual_seed(1)
    other = florence.create_model("florence-tiny", **TINY_MODEL).eval()
    images, _ = _check_inputs(model)

    with pytest.raises(RuntimeError, match="does not reproduce the PyTorch model"):
        _check_export(ImageTower(other), paths["image_tower"], images, "images")
