"""Fixtures for the evaluation tests: a tiny open_clip model, the CLIP tokenizer and real images.

Images come from the shared data folder (``$FLORENCE_SHARED_DATA``, default
``../shared/data`` next to the repository): CIFAR-10 test images and Flickr8k photos with
their human captions. Tests that need them skip when the files are missing.
"""

import csv
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32
CIFAR_IMAGES_PER_CLASS = 4
FLICKR_IMAGES = 8


def shared_data_dir() -> Path:
    return Path(os.environ.get("FLORENCE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"test data {path} not found; set FLORENCE_SHARED_DATA to the shared data folder")
    return path


def load_tokenizer() -> Callable[[list[str]], Tensor]:
    """Return florence's tokenizer, or open_clip's CLIP BPE tokenizer while florence has none."""
    try:
        from florence.tokenizer import get_tokenizer
    except ModuleNotFoundError as error:
        if error.name != "florence.tokenizer":
            raise
        return open_clip.get_tokenizer("ViT-B-32")

    return get_tokenizer()


def build_tiny_clip(seed: int = 0) -> open_clip.CLIP:
    """Build a randomly initialised 32-dim open_clip CLIP for 32x32 images (about 4M parameters)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "layers": 2,
            "width": 64,
            "head_width": 32,
            "mlp_ratio": 2.0,
            "patch_size": 8,
            "image_size": IMAGE_SIZE,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
    )
    return model.eval()


class MeanPoolDualEncoder(nn.Module):
    """A minimal dual encoder without ``logit_scale``: pooled pixels and mean token embeddings, each projected."""

    def __init__(self, embed_dim: int = 16, vocab_size: int = 49408) -> None:
        super().__init__()
        self.image_proj = nn.Linear(3 * 4 * 4, embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.text_proj = nn.Linear(embed_dim, embed_dim)

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
        features = self.image_proj(pooled)
        return nn.functional.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = (self.token_embedding(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        features = self.text_proj(pooled)
        return nn.functional.normalize(features, dim=-1) if normalize else features


@pytest.fixture(scope="session")
def tokenizer() -> Callable[[list[str]], Tensor]:
    return load_tokenizer()


@pytest.fixture
def tiny_clip() -> open_clip.CLIP:
    return build_tiny_clip()


@pytest.fixture
def mean_pool_model() -> MeanPoolDualEncoder:
    torch.manual_seed(0)
    return MeanPoolDualEncoder()


@pytest.fixture(scope="session")
def preprocess() -> Callable[[Image.Image], Tensor]:
    return open_clip.image_transform(IMAGE_SIZE, is_train=False)


@pytest.fixture(scope="session")
def cifar10(preprocess) -> tuple[Tensor, Tensor, list[str]]:
    """Return the first few CIFAR-10 test images of every class: images [N, 3, 32, 32], labels [N], class names."""
    folder = shared_data_dir() / "cifar10"
    archive_path = require_file(folder / "test.zip")
    classnames = require_file(folder / "classes.txt").read_text().split("\n")
    classnames = [name for name in classnames if name]

    with open(require_file(folder / "test.csv"), newline="") as file:
        rows = list(csv.DictReader(file))

    selected = []
    for label in range(len(classnames)):
        selected += [row for row in rows if int(row["label"]) == label][:CIFAR_IMAGES_PER_CLASS]

    with zipfile.ZipFile(archive_path) as archive:
        images = [preprocess(Image.open(io.BytesIO(archive.read(row["path"]))).convert("RGB")) for row in selected]

    labels = torch.tensor([int(row["label"]) for row in selected])
    return torch.stack(images), labels, classnames


@pytest.fixture(scope="session")
def flickr8k(preprocess) -> tuple[Tensor, list[str], list[int]]:
    """Return a few Flickr8k photos with all their captions: images [N, 3, 32, 32], captions, caption_to_image."""
    folder = shared_data_dir() / "flickr8k_800"
    with open(require_file(folder / "captions.tsv"), newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))

    image_paths = sorted({row["image"] for row in rows})[:FLICKR_IMAGES]
    image_index = {path: index for index, path in enumerate(image_paths)}
    images = [preprocess(Image.open(require_file(folder / path)).convert("RGB")) for path in image_paths]

    captions = [row["caption"] for row in rows if row["image"] in image_index]
    caption_to_image = [image_index[row["image"]] for row in rows if row["image"] in image_index]
    return torch.stack(images), captions, caption_to_image
