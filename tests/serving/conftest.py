"""Fixtures for the serving tests: a tiny real model, real Flickr8k photos and a real server on loopback.

Photos come from ``$FLORENCE_SHARED_DATA/flickr8k_800`` (default ``../shared/data`` next to
the repository); tests that need them skip when the folder is missing.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import florence
from florence.checkpoint import save_weights
from tests.tiny import TINY_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]
PHOTOS = 8


def shared_data_dir() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def flickr_photos(count: int = PHOTOS) -> list[Path]:
    folder = shared_data_dir() / "flickr8k_800" / "images"
    photos = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if len(photos) < count:
        pytest.skip(f"Flickr8k photos not found in {folder}; set FLORENCE_SHARED_DATA to the shared data folder")
    return photos


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny florence-tiny (32x32 images, 16-dim embeddings) saved as safetensors."""
    torch.manual_seed(0)
    model = florence.create_model("florence-tiny", **TINY_MODEL)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_weights(model, path)
    return path


@pytest.fixture(scope="session")
def embedder(checkpoint):
    from florence.serving.embed import Embedder

    return Embedder.from_checkpoint(checkpoint)


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """A folder with copies of the first Flickr8k photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in flickr_photos():
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture(scope="session")
def search_index(tmp_path_factory, checkpoint, embedder):
    """An exact index of the first Flickr8k photos, embedded with the tiny model."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'florence-vision[serve]')")
    pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'florence-vision[serve]')")
    from florence.serving.collection import list_images
    from florence.serving.embed import EmbeddingStore, build_manifest, embed_images
    from florence.serving.index import build_index

    folder = tmp_path_factory.mktemp("collection")
    store = EmbeddingStore(folder / "embeddings")
    store.open_for(build_manifest(embedder, checkpoint))
    embed_images(embedder, list_images([str(photo) for photo in flickr_photos()]), store, progress=False)
    index = build_index(store.folder)
    index.save(folder / "index")
    return index


class LiveServer:
    """A uvicorn server on 127.0.0.1 with an ephemeral port, run in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start; see the log above")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(embedder, index, **limits) -> LiveServer:
    pytest.importorskip("fastapi", reason="fastapi is not installed (pip install 'florence-vision[serve]')")
    pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install 'florence-vision[serve]')")
    from florence.serving.app import create_app
    from florence.serving.service import ModelService, ServerLimits

    service = ModelService(embedder, index)
    return LiveServer(create_app(service, ServerLimits(**limits))).start()


# Small limits, so that tests can exceed them with small requests.
TEST_LIMITS = {"max_upload_bytes": 200_000, "max_pixels": 1_000_000, "max_labels": 5, "max_k": 20}


@pytest.fixture(scope="session")
def server(embedder, search_index) -> Iterator[LiveServer]:
    live = start_server(embedder, search_index, **TEST_LIMITS)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def server_without_index(embedder) -> Iterator[LiveServer]:
    live = start_server(embedder, None, **TEST_LIMITS)
    yield live
    live.stop()
