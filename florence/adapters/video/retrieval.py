"""Text-to-video and video-to-text retrieval with a Florence image-text model.

Each video is embedded by :class:`~florence.adapters.video.zeroshot.VideoEncoder` (mean of the
frame embeddings, or the inflated Video CoSwin) and its test-view embeddings are averaged.
Recall@k uses the image-text retrieval metrics, with videos in place of images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from florence.adapters.video.io import VideoDecodeError
from florence.adapters.video.sampling import load_test_views
from florence.adapters.video.zeroshot import VideoEncoder
from florence.evaluation._common import resolve_device
from florence.evaluation.retrieval import retrieval_metrics

_logger = logging.getLogger(__name__)


@torch.inference_mode()
def encode_videos(
    model: nn.Module,
    paths: Sequence[str | Path],
    num_frames: int = 8,
    image_size: int | None = None,
    mode: str = "uniform",
    frame_interval: int = 2,
    num_clips: int = 1,
    num_crops: int = 1,
    tower: str = "frames",
) -> torch.Tensor:
    """Embed videos into L2-normalised float32 ``[N, D]``: the mean over test views, renormalised.

    The views are decoded on the CPU and moved to the device of the model's first parameter,
    where the embeddings are returned.
    """
    model.eval()
    image_size = image_size or model.visual.img_size[0]
    encoder = VideoEncoder(model, tower).eval()
    device = resolve_device(model, None)
    embeddings = []
    for path in paths:
        views = load_test_views(path, num_frames, image_size, mode, frame_interval, num_clips, num_crops).to(device)
        embeddings.append(F.normalize(encoder(views).mean(dim=0), dim=-1))
    return torch.stack(embeddings)


@torch.inference_mode()
def encode_captions(model: nn.Module, tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Embed captions into L2-normalised float32 ``[N, D]``."""
    model.eval()
    return model.encode_text(tokenizer(list(captions)), normalize=True)


def rank_captions(video_embedding: torch.Tensor, caption_embeddings: torch.Tensor) -> list[int]:
    """Return caption indices from the most to the least similar to one ``[D]`` video embedding.

    Ties keep the lower index first (a stable sort).
    """
    scores = caption_embeddings @ video_embedding
    return torch.sort(scores, descending=True, stable=True).indices.tolist()


@dataclass(frozen=True)
class CaptionRanking:
    """Candidate captions of one video ranked by similarity, with the rank of the intended one if known."""

    video: Path
    captions: list[str]
    scores: list[float]
    order: list[int]
    intended_index: int | None

    @property
    def intended_rank(self) -> int | None:
        """1-based rank of the intended caption, or None when the file names none."""
        return None if self.intended_index is None else self.order.index(self.intended_index) + 1


def read_caption_candidates(path: str | Path) -> list[tuple[Path, list[str], int | None]]:
    """Read ``(video, candidate captions, intended index or None)`` entries from a JSON file.

    The file contains one object or a list of objects with ``video`` (a path relative to the
    file), ``candidates`` (a list of captions) and optionally ``intended_match_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption candidates file {path} not found")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    entries = payload if isinstance(payload, list) else [payload]
    if not entries:
        raise ValueError(f"{path} lists no videos; add objects with 'video' and 'candidates'")
    return [_candidate_entry(entry, path, number) for number, entry in enumerate(entries)]


def _candidate_entry(entry: object, path: Path, number: int) -> tuple[Path, list[str], int | None]:
    where = f"{path}, entry {number}"
    if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
        # A malformed file is invalid input data, reported as ValueError like the other checks here.
        raise ValueError(  # noqa: TRY004
            f"{where}: expected an object with 'video' and 'candidates', got {str(entry)[:80]}"
        )
    captions = entry.get("candidates")
    if not isinstance(captions, list) or not captions or not all(isinstance(text, str) and text.strip() for text in captions):
        raise ValueError(f"{where}: 'candidates' must be a non-empty list of non-empty captions")
    intended = entry.get("intended_match_index")
    if intended is not None and (isinstance(intended, bool) or not isinstance(intended, int) or not 0 <= intended < len(captions)):
        raise ValueError(f"{where}: intended_match_index {intended!r} is not an index into the {len(captions)} candidates")
    video = Path(entry["video"])
    return (video if video.is_absolute() else path.parent / video), captions, intended


def rank_caption_candidates(
    model: nn.Module, tokenizer, path: str | Path, **encode_options
) -> list[CaptionRanking]:
    """Rank the candidate captions of each video in a candidates file (see :func:`read_caption_candidates`).

    ``encode_options`` go to :func:`encode_videos` (``num_frames``, ``num_clips``, ``tower``, ...).
    """
    rankings = []
    for video, captions, intended in read_caption_candidates(path):
        video_embedding = encode_videos(model, [video], **encode_options)[0]
        caption_embeddings = encode_captions(model, tokenizer, captions)
        scores = (caption_embeddings @ video_embedding).tolist()
        order = rank_captions(video_embedding, caption_embeddings)
        rankings.append(CaptionRanking(video, captions, scores, order, intended))
    return rankings


def video_text_retrieval(
    video_embeddings: torch.Tensor,
    caption_embeddings: torch.Tensor,
    caption_to_video: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Return ``video_to_text_R@k``, ``text_to_video_R@k`` and ``mean_recall``, in percent."""
    metrics = retrieval_metrics(video_embeddings, caption_embeddings, caption_to_video, ks)
    return {name.replace("image", "video"): value for name, value in metrics.items()}


def embed_video_collection(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    out: str | Path,
    num_frames: int = 8,
    tower: str = "frames",
) -> tuple[int, int, list[tuple[str, str]]]:
    """Embed videos into a ``florence embed`` folder, so ``florence index build`` and ``florence search`` work on them.

    The rows have kind ``"image"``, which is the kind the index reads, and the video path as
    source. Videos already in ``out`` are skipped, so a rerun embeds only new ones. Unreadable
    videos get a row with the error and no embedding, and are logged.

    Returns:
        (videos embedded now, videos already in ``out``, [(path, error)] for unreadable videos).
    """
    from florence.checkpoint import load_model
    from florence.serving.embed import Embedder, EmbeddingStore, build_manifest

    model = load_model(checkpoint)
    store = EmbeddingStore(out)
    store.open_for(build_manifest(Embedder(model), checkpoint))
    done = store.done_sources("image")
    pending = [str(Path(path).resolve()) for path in paths]
    pending = [path for path in pending if path not in done]

    embeddings: list = []
    errors: list[str | None] = []
    failed = []
    for path in pending:
        try:
            embeddings.append(encode_videos(model, [path], num_frames=num_frames, tower=tower)[0].numpy())
            errors.append(None)
        except VideoDecodeError as error:
            _logger.warning("skipping unreadable video %s: %s", path, error)
            embeddings.append(None)
            errors.append(str(error))
            failed.append((path, str(error)))
    if pending:
        store.write_part("image", pending, embeddings, errors, int(model.embed_dim))
    return len(pending) - len(failed), len(paths) - len(pending), failed
