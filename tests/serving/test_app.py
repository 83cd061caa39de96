"""HTTP API tests against a real uvicorn server on 127.0.0.1 (an ephemeral port)."""

import io
import logging
import socket

import numpy as np
import pytest
from PIL import Image

from tests.serving.conftest import TEST_LIMITS, flickr_photos, start_server

httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install 'florence-vision[serve]')")


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def photo() -> bytes:
    return flickr_photos()[0].read_bytes()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def _assert_error(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["status"] == status
    assert words in body["error"]


def test_healthz_ok(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_model_and_index(client, search_index):
    body = client.get("/readyz").json()

    assert body["status"] == "ready"
    assert body["index"] == {"kind": "flat", "count": len(search_index)}


def test_openapi_lists_routes(client):
    paths = client.get("/openapi.json").json()["paths"]

    for route in ("/embed/image", "/embed/text", "/classify", "/search/text", "/search/image", "/thumbnails/{row}", "/healthz", "/readyz"):
        assert route in paths


def test_page_served_at_root(client):
    response = client.get("/")

    assert response.status_code == 200
    assert "search-form" in response.text


def test_embed_text_matches_embedder(client, embedder):
    response = client.post("/embed/text", json={"texts": ["a dog on a beach", "two children"]})
    expected = embedder.encode_texts(["a dog on a beach", "two children"])

    assert response.status_code == 200
    assert response.json()["dim"] == embedder.dim
    np.testing.assert_allclose(response.json()["embeddings"], expected, atol=1e-5)


def test_embed_image_matches_index(client, photo, search_index):
    response = client.post("/embed/image", files={"file": ("photo.jpg", photo, "image/jpeg")})

    assert response.status_code == 200
    np.testing.assert_allclose(response.json()["embeddings"][0], search_index.index.reconstruct(0), atol=1e-5)


def test_classify_ranks_all_labels(client, photo):
    response = client.post("/classify", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"labels": "dog, child, stairs"})
    labels = response.json()["labels"]

    assert response.status_code == 200
    assert {entry["label"] for entry in labels} == {"dog", "child", "stairs"}
    assert sum(entry["probability"] for entry in labels) == pytest.approx(1.0, abs=1e-5)
    assert labels == sorted(labels, key=lambda entry: -entry["probability"])


def test_search_text_returns_k_thumbnails(client):
    response = client.post("/search/text", json={"query": "a dog running on grass", "k": 3})
    results = response.json()["results"]

    assert response.status_code == 200
    assert len(results) == 3
    thumbnail = client.get(results[0]["thumbnail"])
    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 256


def test_search_image_finds_same_photo(client, photo, search_index):
    response = client.post("/search/image", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"k": "2"})
    best = response.json()["results"][0]

    assert response.status_code == 200
    assert best["source"] == search_index.sources[0]
    assert best["score"] == pytest.approx(1.0, abs=1e-4)


def test_concurrent_requests_share_batches(server, client):
    import concurrent.futures

    service = server.server.config.app.state.service
    before = service.text_batcher.stats.batches
    texts = [f"photo number {i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda text: client.post("/embed/text", json={"texts": [text]}), texts))

    assert all(response.status_code == 200 for response in responses)
    assert service.text_batcher.stats.largest > 1
    assert service.text_batcher.stats.batches - before < len(texts)


def test_non_image_upload_415(client):
    response = client.post("/classify", files={"file": ("notes.txt", b"plain text", "text/plain")}, data={"labels": "a, b"})

    _assert_error(response, 415, "'notes.txt' (text/plain) is not a readable image")
    assert "BytesIO" not in response.json()["error"]


def test_empty_upload_415(client):
    response = client.post("/embed/image", files={"file": ("empty.jpg", b"", "image/jpeg")})

    _assert_error(response, 415, "empty")


def test_oversize_body_413(client):
    data = b"\xff" * (TEST_LIMITS["max_upload_bytes"] + 1)

    response = client.post("/embed/image", files={"file": ("big.jpg", data, "image/jpeg")})

    _assert_error(response, 413, "larger than the limit")


def test_oversize_chunked_body_413(client):
    def chunks():
        for _ in range(TEST_LIMITS["max_upload_bytes"] // 10_000 + 2):
            yield b"x" * 10_000

    response = client.post("/embed/text", content=chunks(), headers={"content-type": "application/json"})

    _assert_error(response, 413, "larger than the limit")
    assert "send a smaller request body" in response.json()["error"]


def test_oversize_json_body_names_request_body(client):
    texts = ["x" * 1000] * (TEST_LIMITS["max_upload_bytes"] // 1000 + 1)

    response = client.post("/embed/text", json={"texts": texts})

    _assert_error(response, 413, "send a smaller request body")
    assert "image" not in response.json()["error"]


def test_oversize_upload_names_image(client):
    data = b"\xff" * (TEST_LIMITS["max_upload_bytes"] + 1)

    response = client.post("/embed/image", files={"file": ("big.jpg", data, "image/jpeg")})

    _assert_error(response, 413, "upload a smaller image")


def test_pixel_bomb_413(client):
    response = client.post("/embed/image", files={"file": ("wide.png", _png(2000, 1000), "image/png")})

    _assert_error(response, 413, "pixels")


def test_malformed_json_422(client):
    response = client.post("/search/text", content=b"{not json", headers={"content-type": "application/json"})

    _assert_error(response, 422, "invalid request")
    assert response.json()["detail"]


def test_missing_field_422(client):
    response = client.post("/search/text", json={"k": 3})

    _assert_error(response, 422, "query")


def test_unknown_json_field_422(client):
    response = client.post("/search/text", json={"query": "dog", "kk": 3})

    _assert_error(response, 422, "unknown field 'kk'; valid fields: query, k")


def test_unknown_texts_field_422(client):
    response = client.post("/embed/text", json={"texts": ["dog"], "normalize": False})

    _assert_error(response, 422, "unknown field 'normalize'; valid fields: texts")


def test_blank_query_names_query_field(client):
    response = client.post("/search/text", json={"query": "  ", "k": 3})

    _assert_error(response, 422, "query is empty")
    assert "texts" not in response.json()["error"]


def test_long_query_names_query_field(client):
    response = client.post("/search/text", json={"query": "dog " * 300, "k": 3})

    _assert_error(response, 422, "query has 1200 characters")


def test_blank_text_names_position(client):
    response = client.post("/embed/text", json={"texts": ["a dog", " "]})

    _assert_error(response, 422, "texts[1] is empty")


def test_missing_file_422(client):
    response = client.post("/classify", data={"labels": "a, b"})

    _assert_error(response, 422, "file")


def test_too_many_labels_422(client, photo):
    labels = ", ".join(f"label {i}" for i in range(TEST_LIMITS["max_labels"] + 1))

    response = client.post("/classify", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"labels": labels})

    _assert_error(response, 422, "the limit is 5")


def test_single_label_422(client, photo):
    response = client.post("/classify", files={"file": ("photo.jpg", photo, "image/jpeg")}, data={"labels": "dog"})

    _assert_error(response, 422, "at least two")


def test_k_out_of_range_422(client):
    response = client.post("/search/text", json={"query": "dog", "k": TEST_LIMITS["max_k"] + 1})

    _assert_error(response, 422, "out of range")


def test_thumbnail_unknown_row_404(client, search_index):
    response = client.get(f"/thumbnails/{len(search_index)}")

    _assert_error(response, 404, "not in the index")


@pytest.mark.parametrize("path", ["/thumbnails/..%2F..%2F..%2Fetc%2Fpasswd", "/thumbnails/%2Fetc%2Fpasswd", "/thumbnails/-1"])
def test_thumbnail_path_traversal_rejected(client, path):
    response = client.get(path)

    assert response.status_code in (404, 422)
    assert "root:" not in response.text


def test_thumbnail_raw_traversal_not_served(server):
    # httpx normalises "..", so send the raw request line over a socket to the same loopback server.
    host, port = server.server.servers[0].sockets[0].getsockname()[:2]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(b"GET /thumbnails/../../../../etc/passwd HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk

    status = int(reply.split(b" ", 2)[1])
    assert status in (400, 404, 422)
    assert b"root:" not in reply


def test_unknown_route_404(client):
    _assert_error(client.get("/nothing-here"), 404, "no route")


def test_search_without_index_503(server_without_index):
    with httpx.Client(base_url=server_without_index.url, timeout=60) as session:
        response = session.post("/search/text", json={"query": "dog", "k": 3})
        classify = session.post("/classify", files={"file": ("p.png", _png(40, 40), "image/png")}, data={"labels": "a, b"})

    _assert_error(response, 503, "without an index")
    assert classify.status_code == 200


def test_server_binds_loopback_only(server):
    host = server.server.servers[0].sockets[0].getsockname()[0]

    assert host == "127.0.0.1"


def test_server_healthy_after_errors(client):
    client.post("/embed/image", files={"file": ("x.txt", b"x", "text/plain")})

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_stop_log_counts_requests_not_warmup(embedder, search_index, caplog):
    live = start_server(embedder, search_index, **TEST_LIMITS)
    service = live.server.config.app.state.service
    batches_after_start = service.image_batcher.stats.batches + service.text_batcher.stats.batches
    with httpx.Client(base_url=live.url, timeout=60) as session:
        session.post("/embed/text", json={"texts": ["a dog"]})
    with caplog.at_level(logging.INFO, logger="florence.serving.app"):
        live.stop()
    stopped = [record.getMessage() for record in caplog.records if "server stopped" in record.getMessage()]

    assert batches_after_start == 0
    assert len(stopped) == 1
    assert "embedded 0 images in 0 batches (largest 0) and 1 text in 1 batch (largest 1)" in stopped[0]
    assert "BatchStats" not in stopped[0]
