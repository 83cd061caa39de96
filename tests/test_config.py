from pathlib import Path

import pytest

from florence.config import TrainConfig, from_dict, load_config

QUICKSTART = Path(__file__).resolve().parents[1] / "florence" / "configs" / "quickstart.yaml"


def test_quickstart_config_loads():
    config = load_config(QUICKSTART)

    assert config.model == "florence-tiny"
    assert config.data.train[0].type == "classification"


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key\(s\) stepz in config; valid keys: model, .*steps"):
        from_dict(TrainConfig, {"stepz": 3})


def test_unknown_nested_key_names_section():
    with pytest.raises(ValueError, match=r"unknown key\(s\) learning_rate in config.optim; valid keys: lr"):
        load_config(QUICKSTART, ["optim.learning_rate=0.1"])


def test_override_parses_yaml_values():
    config = load_config(QUICKSTART, ["optim.lr=1e-3", "steps=7", "data.crop_scale=[0.5, 1.0]"])

    assert config.optim.lr == pytest.approx(1e-3)
    assert config.steps == 7
    assert config.data.crop_scale == (0.5, 1.0)


def test_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="config.steps must be of type int, got 'many'"):
        load_config(QUICKSTART, ["steps=many"])


def test_invalid_precision_is_rejected():
    with pytest.raises(ValueError, match="precision='fp8' is not supported"):
        load_config(QUICKSTART, ["precision=fp8"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ValueError, match="must look like key=value"):
        load_config(QUICKSTART, ["steps"])


def test_shared_data_variable_expands(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORENCE_SHARED_DATA", str(tmp_path))
    config = load_config(QUICKSTART, ["data.train.0.root=$FLORENCE_SHARED_DATA/cifar10"])

    assert config.data.train[0].root == f"{tmp_path}/cifar10"


def test_missing_config_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        load_config(tmp_path / "nothing.yaml")


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [1\n")

    with pytest.raises(ValueError, match="broken.yaml: invalid YAML"):
        load_config(path)
