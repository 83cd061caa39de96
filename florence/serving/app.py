"""The FastAPI app: embedding, zero-shot classification, search, thumbnails and the web page.

Every error response is JSON ``{"error": message, "status": code}``, with a ``detail`` list
for request validation errors. Status codes:

- 413: request body over ``max_upload_bytes``, or an image over ``max_pixels`` pixels;
- 415: an upload that is not an image PIL can decode;
- 422: a malformed request (invalid JSON, a missing or unknown field, too many labels or texts, k out of range);
- 404: an unknown route or a thumbnail row that is not in the index;
- 503: search without an index, or any request before the model is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from PIL import Image

from florence.data.sources import IMAGE_LOAD_ERRORS
from florence.serving._optional import require
from florence.serving.batching import BatchStats
from florence.serving.collection import (
    ImageTooLargeError,
    decode_image,
    describe_read_error,
)
from florence.serving.service import ModelService, ServerLimits

_logger = logging.getLogger(__name__)

require("python_multipart")
require("fastapi")
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error with an HTTP status, returned to the client as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class StrictRequest(BaseModel):
    """A JSON request body that rejects unknown fields, so a misspelt field is not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, data: Any) -> Any:
        # Runs before pydantic's own extra="forbid" check, to name the valid fields in the error.
        if isinstance(data, dict):
            unknown = [key for key in data if key not in cls.model_fields]
            if unknown:
                raise PydanticCustomError(
                    "extra_forbidden",
                    "unknown field {field}; valid fields: {valid}",
                    {"field": repr(unknown[0]), "valid": ", ".join(cls.model_fields)},
                )
        return data


class TextsRequest(StrictRequest):
    texts: list[str] = Field(description="texts to embed", examples=[["a dog on a beach"]])


class TextSearchRequest(StrictRequest):
    query: str = Field(description="text to search the indexed images for", examples=["a dog on a beach"])
    k: int = Field(10, description="number of results")


class SearchResult(BaseModel):
    row: int
    source: str
    score: float = Field(description="cosine similarity between the query and the image embedding")
    thumbnail: str = Field(description="URL path of the image's JPEG thumbnail")


class SearchResponse(BaseModel):
    results: list[SearchResult]


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    labels: list[LabelScore] = Field(description="every label, highest probability first")


class EmbeddingResponse(BaseModel):
    embeddings: list[list[float]] = Field(description="L2-normalised embeddings, one per input")
    dim: int


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware that rejects request bodies over ``max_bytes`` with 413.

    It checks Content-Length before reading and counts the bytes of bodies sent without one
    (chunked transfer), so a client cannot get around the limit by leaving the header out.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = dict(scope["headers"])
        advice = "upload a smaller image" if headers.get(b"content-type", b"").startswith(b"multipart/") else "send a smaller request body"
        message = f"request body is larger than the limit of {self.max_bytes} bytes; {advice}"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            _logger.warning("%s %s: 413 %s (Content-Length %s)", scope["method"], scope["path"], message, length.decode())
            await _error_response(413, message)(scope, receive, send)
            return

        received = 0
        exceeded = False

        async def counting_receive():
            nonlocal received, exceeded
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return event

        async def guarded_send(event):
            # FastAPI turns errors raised while reading the body into its own 400 response,
            # which is dropped here in favour of the 413 below.
            if not exceeded:
                await send(event)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if exceeded:
            _logger.warning("%s %s: 413 %s", scope["method"], scope["path"], message)
            await _error_response(413, message)(scope, receive, send)


def _count(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def _describe_batches(stats: BatchStats, noun: str) -> str:
    """Describe batcher statistics in words, e.g. '5 images in 3 batches (largest 2)'."""
    return f"{_count(stats.items, noun, noun + 's')} in {_count(stats.batches, 'batch', 'batches')} (largest {stats.largest})"


def _error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status)


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(service: ModelService, limits: ServerLimits | None = None) -> FastAPI:
    """Build the app around ``service``; the lifespan starts and stops the service's batchers."""
    limits = limits or ServerLimits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.perf_counter()
        await service.start()
        index = service.index
        _logger.info(
            "server started: model %s (embedding size %d, image size %d), %s, ready in %.1f s",
            service.embedder.model_name,
            service.embedder.dim,
            service.embedder.image_size,
            f"{index.kind} index of {len(index)} images" if index is not None else "no index (search disabled)",
            time.perf_counter() - started,
        )
        try:
            yield
        finally:
            await service.stop()
            _logger.info(
                "server stopped after %d requests (%d errors); embedded %s and %s",
                app.state.requests,
                app.state.errors,
                _describe_batches(service.image_batcher.stats, "image"),
                _describe_batches(service.text_batcher.stats, "text"),
            )

    app = FastAPI(
        title="florence",
        summary="Image and text embedding, zero-shot classification and image search with a Florence model",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.limits = limits
    app.state.requests = 0
    app.state.errors = 0
    _add_error_handlers(app)
    _add_routes(app, service, limits)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_upload_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        app.state.requests += 1
        response = await call_next(request)
        if response.status_code >= 400:
            app.state.errors += 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        _logger.warning("%s %s: %d %s", request.method, request.url.path, error.status, error.message)
        return _error_response(error.status, error.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = json.loads(json.dumps(error.errors(), default=str))
        message = _describe_validation(errors)
        _logger.warning("%s %s: 422 %s", request.method, request.url.path, message)
        return _error_response(422, message, detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if isinstance(error.__cause__, _BodyTooLarge):
            return _error_response(413, "request body is too large")  # BodySizeLimit replaces and logs it
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.url.path}; see /docs for the API"
        _logger.warning("%s %s: %d %s", request.method, request.url.path, error.status_code, message)
        return _error_response(error.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        _logger.error("%s %s: 500 %s", request.method, request.url.path, error, exc_info=error)
        return _error_response(500, f"internal error: {type(error).__name__}; see the server log")


async def _read_image(upload: UploadFile, limits: ServerLimits) -> Image.Image:
    """Decode an uploaded image in a worker thread, mapping failures to 415 and 413."""
    data = await upload.read()
    name = upload.filename or "upload"
    if not data:
        raise APIError(415, f"file {name!r} is empty; upload a JPEG, PNG, WebP, GIF, BMP or TIFF image")
    try:
        return await asyncio.to_thread(decode_image, data, limits.max_pixels)
    except ImageTooLargeError as error:
        raise APIError(413, f"file {name!r}: {error}; upload a smaller image") from None
    except IMAGE_LOAD_ERRORS as error:
        raise APIError(
            415,
            f"file {name!r} ({upload.content_type or 'no content type'}) is not a readable image "
            f"({describe_read_error(error)}); upload a JPEG, PNG, WebP, GIF, BMP or TIFF image",
        ) from None


def _parse_labels(text: str, limits: ServerLimits) -> list[str]:
    """Split comma- or newline-separated labels, dropping blanks and duplicates."""
    labels = list(dict.fromkeys(part.strip() for part in text.replace("\n", ",").split(",") if part.strip()))
    if len(labels) < 2:
        raise APIError(422, f"labels {text!r} must name at least two comma-separated labels, e.g. 'cat, dog'")
    if len(labels) > limits.max_labels:
        raise APIError(422, f"{len(labels)} labels given; the limit is {limits.max_labels} per request")
    long = [label for label in labels if len(label) > limits.max_label_chars]
    if long:
        raise APIError(422, f"label {long[0][:40]!r}... is longer than {limits.max_label_chars} characters")
    return labels


def _check_k(k: int, limits: ServerLimits) -> None:
    if not 1 <= k <= limits.max_k:
        raise APIError(422, f"k={k} is out of range; pass 1 <= k <= {limits.max_k}")


def _check_texts(texts: list[str], limits: ServerLimits) -> None:
    if not texts:
        raise APIError(422, "texts is empty; pass at least one text")
    if len(texts) > limits.max_texts:
        raise APIError(422, f"{len(texts)} texts given; the limit is {limits.max_texts} per request")
    for position, text in enumerate(texts):
        _check_text(text, f"texts[{position}]", limits)


def _check_text(text: str, field: str, limits: ServerLimits) -> None:
    """Reject an empty or overlong text, naming the request ``field`` it came from."""
    if not text.strip():
        raise APIError(422, f"{field} is empty; pass a non-blank text")
    if len(text) > limits.max_text_chars:
        raise APIError(422, f"{field} has {len(text)} characters; the limit is {limits.max_text_chars}")


def _require_ready(service: ModelService) -> None:
    if not service.ready:
        raise APIError(503, "the model is not ready yet; retry when /readyz returns 200")


def _require_index(service: ModelService) -> None:
    _require_ready(service)
    if service.index is None:
        raise APIError(503, "search is not available: the server was started without an index (florence serve --index DIR)")


def _search_response(service: ModelService, query, k: int) -> SearchResponse:
    hits = service.search(query, k)
    return SearchResponse(
        results=[SearchResult(row=hit.row, source=hit.source, score=hit.score, thumbnail=f"/thumbnails/{hit.row}") for hit in hits]
    )


def _add_routes(app: FastAPI, service: ModelService, limits: ServerLimits) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("florence.serving").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/healthz", summary="liveness: 200 while the process serves requests")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: 200 once the model is loaded and warmed up, 503 before")
    async def readyz() -> JSONResponse:
        if not service.ready:
            return _error_response(503, "not ready: the model is loading")
        index = service.index
        return JSONResponse(
            {
                "status": "ready",
                "model": service.embedder.model_name,
                "dim": service.embedder.dim,
                "index": None if index is None else {"kind": index.kind, "count": len(index)},
            }
        )

    @app.post("/embed/image", response_model=EmbeddingResponse, summary="embed one uploaded image")
    async def embed_image(file: Annotated[UploadFile, File(description="image file")]) -> EmbeddingResponse:
        _require_ready(service)
        vector = await service.embed_image(await _read_image(file, limits))
        return EmbeddingResponse(embeddings=[vector.tolist()], dim=len(vector))

    @app.post("/embed/text", response_model=EmbeddingResponse, summary="embed texts")
    async def embed_text(request: TextsRequest) -> EmbeddingResponse:
        _require_ready(service)
        _check_texts(request.texts, limits)
        vectors = await service.embed_texts(request.texts)
        return EmbeddingResponse(embeddings=vectors.tolist(), dim=vectors.shape[1])

    @app.post("/classify", response_model=ClassifyResponse, summary="rank your labels for an image (zero-shot)")
    async def classify(
        file: Annotated[UploadFile, File(description="image file")],
        labels: Annotated[str, Form(description="comma- or newline-separated labels, e.g. 'cat, dog, rocket'")],
    ) -> ClassifyResponse:
        _require_ready(service)
        names = _parse_labels(labels, limits)
        ranking = await service.classify(await _read_image(file, limits), names)
        return ClassifyResponse(labels=[LabelScore(label=label, probability=p) for label, p in ranking])

    @app.post("/search/text", response_model=SearchResponse, summary="find indexed images matching a text")
    async def search_text(request: TextSearchRequest) -> SearchResponse:
        _require_index(service)
        _check_text(request.query, "query", limits)
        _check_k(request.k, limits)
        query = (await service.embed_texts([request.query]))[0]
        return _search_response(service, query, request.k)

    @app.post("/search/image", response_model=SearchResponse, summary="find indexed images similar to an uploaded image")
    async def search_image(
        file: Annotated[UploadFile, File(description="image file")],
        k: Annotated[int, Form(description="number of results")] = 10,
    ) -> SearchResponse:
        _require_index(service)
        _check_k(k, limits)
        query = await service.embed_image(await _read_image(file, limits))
        return _search_response(service, query, k)

    @app.get(
        "/thumbnails/{row}",
        summary="JPEG thumbnail of an indexed image, by its row in the index",
        responses={200: {"content": {"image/jpeg": {}}}},
    )
    async def thumbnail(row: int) -> Response:
        _require_index(service)
        try:
            data = await asyncio.to_thread(service.thumbnail, row, limits.max_pixels)
        except IndexError:
            raise APIError(404, f"row {row} is not in the index (valid rows: 0..{len(service.index) - 1})") from None
        except (*IMAGE_LOAD_ERRORS, ImageTooLargeError, KeyError) as error:
            raise APIError(404, f"indexed image of row {row} can no longer be read: {error}") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})
