import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from florence.cli.main import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_CONFIG = REPO / "florence" / "configs" / "quickstart.yaml"
SMALL_MODEL = (
    "model_overrides={embed_dim: 32, vision_cfg: {embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4},"
    " text_cfg: {width: 32, layers: 1, heads: 2}}"
)


def florence(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "florence.cli.main", *args]
    return subprocess.run(command, cwd=REPO, check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("cli_shards")
    result = florence(
        "data", "shards", "--config", str(QUICKSTART_CONFIG), "--output", str(output),
        "--limit", "96", "--max-samples", "32",
    )
    assert result.returncode == 0, result.stderr
    assert "samples: 96" in result.stdout
    return output


def test_data_shards_writes_index(shards):
    index = json.loads((shards / "index.json").read_text())

    assert [shard["samples"] for shard in index["shards"]] == [32, 32, 32]
    assert index["complete"]
    assert sorted(path.name for path in shards.glob("*.tar")) == [f"train-00000{n}.tar" for n in range(3)]


def test_data_shards_rerun_keeps_shards(shards, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    caplog.set_level(logging.INFO)
    before = {path.name: path.stat().st_mtime_ns for path in shards.glob("*.tar")}

    code = main([
        "data", "shards", "--config", str(QUICKSTART_CONFIG), "--output", str(shards),
        "--limit", "96", "--max-samples", "32",
    ])

    assert code == 0
    assert "already written" in caplog.text
    assert {path.name: path.stat().st_mtime_ns for path in shards.glob("*.tar")} == before


def test_train_from_shards(shards, tmp_path):
    result = florence(
        "train",
        f"output_dir={tmp_path / 'run'}",
        "steps=2",
        "log_every=1",
        "data.batch_size=16",
        "data.num_workers=1",
        f"data.train=[{{type: webdataset, urls: '{shards}', templates: train}}]",
        "eval.zeroshot.max_images=32",
        SMALL_MODEL,
    )

    assert result.returncode == 0, result.stderr
    assert "step: 2" in result.stdout
    assert "zeroshot_top1:" in result.stdout
    assert "training shards" in result.stderr


def test_data_shards_single_source(tmp_path, capsys):
    data = REPO / "data" / "cifar10_quickstart"
    code = main([
        "data", "shards", "--type", "classification", "--root", str(data / "test"),
        "--classes-file", str(data / "classes.txt"), "--output", str(tmp_path), "--limit", "10",
        "--pattern", "test-%04d.tar",
    ])

    assert code == 0
    assert "samples: 10" in capsys.readouterr().out
    assert (tmp_path / "test-0000.tar").is_file()


def test_data_shards_needs_a_source(tmp_path, capsys):
    code = main(["data", "shards", "--output", str(tmp_path)])

    assert code == 2
    assert "give --config" in capsys.readouterr().err


def test_mixed_sources_rejected(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = main([
        "train",
        f"output_dir={tmp_path / 'run'}",
        "steps=1",
        f"data.train=[{{type: webdataset, urls: '{shards}'}}, {{type: classification, root: data/cifar10_quickstart/train}}]",
        SMALL_MODEL,
    ])

    assert code == 2
    assert "mixes webdataset sources with classification" in capsys.readouterr().err
