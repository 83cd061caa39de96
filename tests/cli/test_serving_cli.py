"""The embed, index, search, serve and export commands, run as subprocesses on real photos."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import florence
from florence.checkpoint import save_weights
from tests.tiny import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]
PHOTOS = 6

pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'florence-vision[serve]')")
pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'florence-vision[serve]')")


def florence_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "florence.cli.main", *args]
    return subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder with a tiny checkpoint and a few Flickr8k photos plus one unreadable file."""
    data = Path(os.environ.get("FLORENCE_SHARED_DATA", REPO.parent / "shared" / "data")) / "flickr8k_800" / "images"
    photos = sorted(data.glob("*.jpg"))[:PHOTOS] if data.is_dir() else []
    if len(photos) < PHOTOS:
        pytest.skip(f"Flickr8k photos not found in {data}; set FLORENCE_SHARED_DATA to the shared data folder")

    root = tmp_path_factory.mktemp("serving-cli")
    (root / "photos").mkdir()
    for photo in photos:
        shutil.copy(photo, root / "photos" / photo.name)
    (root / "photos" / "broken.jpg").write_text("not an image")
    torch.manual_seed(0)
    save_weights(florence.create_model("florence-tiny", **TINY_MODEL), root / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def index(workspace) -> Path:
    embed = florence_cli("embed", str(workspace / "photos"), "--checkpoint", str(workspace / "model.safetensors"), "--out", str(workspace / "embeddings"))
    assert embed.returncode == 0, embed.stderr
    assert f"images: {PHOTOS + 1} listed, {PHOTOS} embedded ({PHOTOS} now, 0 earlier), 1 unreadable (1 now, 0 earlier" in embed.stdout
    assert "unreadable: " in embed.stdout
    assert "broken.jpg: not a readable image" in embed.stdout
    assert "BytesIO" not in embed.stdout + embed.stderr
    assert "faiss.loader" not in embed.stderr

    build = florence_cli("index", "build", str(workspace / "embeddings"), "--out", str(workspace / "index"))
    assert build.returncode == 0, build.stderr
    assert "index kind flat" in build.stderr
    assert "faiss.loader" not in build.stderr
    return workspace / "index"


def test_embed_rerun_resumes(workspace, index):
    result = florence_cli("embed", str(workspace / "photos"), "--checkpoint", str(workspace / "model.safetensors"), "--out", str(workspace / "embeddings"))

    assert result.returncode == 0, result.stderr
    assert f"images: {PHOTOS + 1} listed, {PHOTOS} embedded (0 now, {PHOTOS} earlier), 1 unreadable (0 now, 1 earlier" in result.stdout


def test_search_text_prints_ranked_paths(index):
    result = florence_cli("search", "a dog on a beach", "--index", str(index), "-k", "3", "--json")
    rows = [json.loads(line) for line in result.stdout.splitlines()]

    assert result.returncode == 0, result.stderr
    assert [row["rank"] for row in rows] == [1, 2, 3]
    assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    assert all(Path(row["source"]).is_file() for row in rows)
    assert "faiss.loader" not in result.stderr


def test_search_default_k_capped_at_index_size(index):
    result = florence_cli("search", "a dog on a beach", "--index", str(index))

    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == PHOTOS


@pytest.mark.parametrize("k", ["0", "-3", str(PHOTOS + 1)])
def test_search_k_out_of_range_fails(index, k):
    result = florence_cli("search", "a dog", "--index", str(index), "-k", k)

    assert result.returncode == 2
    assert f"florence: error: k={k} is out of range; pass 1 <= k <= {PHOTOS}" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_unreadable_image_fails(workspace, index):
    broken = workspace / "photos" / "broken.jpg"

    result = florence_cli("search", "--image", str(broken), "--index", str(index))

    assert result.returncode == 2
    assert f"florence: error: cannot read image {broken}: not a readable image" in result.stderr
    assert "BytesIO" not in result.stderr
    assert "Traceback" not in result.stderr


def test_embed_help_says_parts_are_exact():
    result = florence_cli("embed", "--help")

    assert "exact except for a run's last part" in " ".join(result.stdout.split())


def test_search_image_finds_itself(workspace, index):
    photo = sorted((workspace / "photos").glob("1*.jpg"))[2]

    result = florence_cli("search", "--image", str(photo), "--index", str(index), "-k", "1")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[2] == str(photo.resolve())


def test_search_without_query_fails(index):
    result = florence_cli("search", "--index", str(index))

    assert result.returncode == 2
    assert "give either a text query or --image" in result.stderr


def test_export_torchscript_writes_towers(workspace, tmp_path):
    result = florence_cli("export", "--checkpoint", str(workspace / "model.safetensors"), "--format", "torchscript", "--out", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "image_tower.pt").is_file()
    assert (tmp_path / "text_tower.pt").is_file()
    assert "TracerWarning" not in result.stderr


def test_serve_starts_and_stops(workspace, index):
    httpx = pytest.importorskip("httpx", reason="httpx is not installed")
    command = [sys.executable, "-m", "florence.cli.main", "serve", "--index", str(index), "--port", "0"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    log = []
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            log.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url is not None, "".join(log)

        ready = httpx.get(url + "/readyz", timeout=30)
        search = httpx.post(url + "/search/text", json={"query": "a dog", "k": 2}, timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
        log.append(rest)

    assert ready.json()["index"]["count"] == PHOTOS
    assert len(search.json()["results"]) == 2
    assert "server started" in "".join(log)
    assert "server stopped after" in "".join(log)
    assert "1 text in 1 batch (largest 1)" in "".join(log)
    assert "BatchStats" not in "".join(log)
    assert "faiss.loader" not in "".join(log)
