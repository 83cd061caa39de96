import json

import pytest
import torch
from safetensors.torch import save_file

import florence
from florence.checkpoint import load_weights, read_metadata, save_weights
from tests.tiny import TINY_MODEL



def _small_model(seed: int = 0):
    torch.manual_seed(seed)
    return florence.create_model("florence-tiny", **TINY_MODEL)


def test_round_trip_restores_weights_and_config(tmp_path):
    model = _small_model(seed=0)
    save_weights(model, tmp_path / "model.safetensors")

    loaded = florence.load_model(tmp_path / "model.safetensors")

    assert loaded.model_name == "florence-tiny"
    assert loaded.model_config["vision_cfg"]["embed_dim"] == 16
    for (name, expected), (_, actual) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(expected, actual), name


def test_round_trip_gives_same_embeddings(tmp_path):
    model = _small_model(seed=1).eval()
    save_weights(model, tmp_path / "model.safetensors")
    loaded = florence.load_model(tmp_path).eval()
    images = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        assert torch.equal(model.encode_image(images), loaded.encode_image(images))


def test_metadata_contains_config(tmp_path):
    save_weights(_small_model(), tmp_path / "model.safetensors")
    metadata = read_metadata(tmp_path / "model.safetensors")

    assert metadata["model_name"] == "florence-tiny"
    assert json.loads(metadata["model_config"])["text_cfg"]["width"] == 32


def test_load_reports_missing_and_unexpected_keys(tmp_path, caplog):
    model = _small_model()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    del state["logit_scale"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "partial.safetensors"))

    missing, unexpected = load_weights(model, tmp_path / "partial.safetensors")

    assert missing == ["logit_scale"]
    assert unexpected == ["extra.weight"]
    assert "missing keys: logit_scale" in caplog.text
    assert "unexpected keys: extra.weight" in caplog.text


def test_strict_load_raises_on_mismatch(tmp_path):
    model = _small_model()
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "logit_scale"}
    save_file(state, str(tmp_path / "partial.safetensors"))

    with pytest.raises(RuntimeError, match="logit_scale"):
        load_weights(model, tmp_path / "partial.safetensors", strict=True)


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        florence.load_model(tmp_path / "nothing.safetensors")


def test_atomic_write_uses_default_file_mode(tmp_path):
    import stat

    from florence.checkpoint import atomic_write_bytes

    written = tmp_path / "record.json"
    plain = tmp_path / "plain.json"
    atomic_write_bytes(written, b"{}")
    plain.write_bytes(b"{}")

    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
