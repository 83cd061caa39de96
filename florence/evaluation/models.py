"""The model interface that the benchmark suite evaluates, with adapters for florence and open_clip.

Any CLIP-like model can be ranked beside florence's own by wrapping it in an ``EvalModel``:

- ``encode_image(images, normalize=...)`` maps preprocessed images ``[B, 3, H, W]`` to
  features ``[B, D]``;
- ``encode_text(tokens, normalize=...)`` maps token ids ``[B, L]`` to features ``[B, D]``;
- ``tokenizer`` turns a list of strings into token ids;
- ``transform`` turns a PIL image into the tensor ``encode_image`` expects;
- ``name`` is a readable model name for reports;
- ``fingerprint`` is a SHA-256 hex digest that changes whenever the weights change.

``load_eval_model`` builds one from the text of ``florence benchmark --model``. Nothing is
ever downloaded: weights are local files, or the model is randomly initialised with a seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from florence.evaluation._common import Tokenizer

logger = logging.getLogger(__name__)

OPEN_CLIP_PREFIX = "open_clip:"

ImageTransform = Callable[[Image.Image], Tensor]


class EvalModel(nn.Module):
    """A dual encoder with its tokenizer, image transform, name and weight fingerprint.

    The wrapped module is a submodule, so ``parameters()`` and ``.to()`` reach its weights
    and the functions in ``florence.evaluation`` accept an ``EvalModel`` wherever they take a
    model. Subclasses only translate calls. They never change what the model computes.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        transform: ImageTransform,
        name: str,
        fingerprint: str,
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.transform = transform
        self.name = name
        self.fingerprint = fingerprint
        self.checkpoint = checkpoint

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    @property
    def logit_scale(self) -> Tensor | None:
        return getattr(self.model, "logit_scale", None)

    def describe(self) -> dict[str, str]:
        """Return the fields that benchmark records store to identify the model."""
        return {"name": self.name, "fingerprint": self.fingerprint, "class": type(self.model).__name__}


def state_dict_fingerprint(model: nn.Module) -> str:
    """Return the SHA-256 of every parameter and buffer: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """Return the SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def florence_model(spec: str, seed: int = 0) -> EvalModel:
    """Wrap a florence checkpoint (a ``.safetensors`` file or a folder with one) or a registered name.

    A registered name such as ``florence-tiny`` builds the model with random weights drawn
    after ``torch.manual_seed(seed)``. Its fingerprint hashes those weights. ``checkpoint``
    is set only for a loaded file, which the fine-tuning task starts from.
    """
    from florence.checkpoint import WEIGHTS_NAME
    from florence.data.transforms import build_eval_transform
    from florence.evaluation.tasks import model_image_size
    from florence.models import create_model, list_models
    from florence.tokenizer import get_tokenizer

    path = Path(spec)
    if path.is_dir():
        path = path / WEIGHTS_NAME

    checkpoint = None
    if path.is_file():
        checkpoint = path
        model = _load_checkpoint(path)
        fingerprint = file_fingerprint(path)
        name = f"{model.model_name} ({_short_path(path)})"
    elif spec in list_models():
        torch.manual_seed(seed)
        model = create_model(spec)
        fingerprint = state_dict_fingerprint(model)
        name = f"{spec} (random init, seed {seed})"
    else:
        raise ValueError(_unknown_model_message(spec))

    tokenizer = get_tokenizer(model.context_length)
    transform = build_eval_transform(model_image_size(model))
    return EvalModel(model.eval(), tokenizer, transform, name, fingerprint, checkpoint)


def open_clip_model(arch: str, weights: str | Path | None = None, seed: int = 0) -> EvalModel:
    """Wrap an open_clip model built from an architecture name and optional local weights.

    ``arch`` is a name from ``open_clip.list_models()`` or the path of an open_clip model
    config JSON file (registered under the file's stem). ``weights`` is a local file that
    ``open_clip.load_checkpoint`` reads. Without it the weights are a random init drawn
    after ``torch.manual_seed(seed)``. The tokenizer and the evaluation transform are
    open_clip's own for that architecture, so results match open_clip's pipeline.
    """
    import open_clip

    arch = _register_open_clip_config(arch)
    if arch not in open_clip.list_models():
        close = [name for name in open_clip.list_models() if arch.lower() in name.lower()][:10]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"unknown open_clip architecture {arch!r}.{hint} Pass a name from open_clip.list_models() "
            "or the path of an open_clip model config JSON file"
        )

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(
            f"open_clip weights {weights} not found; pass the path of a local .pt, .bin or "
            f".safetensors file, or drop the ':WEIGHTS' part for a random init"
        )

    torch.manual_seed(seed)
    model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=None)
    if weights is None:
        fingerprint = state_dict_fingerprint(model)
        name = f"open_clip {arch} (random init, seed {seed})"
    else:
        weights = Path(weights)
        open_clip.load_checkpoint(model, str(weights))
        fingerprint = file_fingerprint(weights)
        name = f"open_clip {arch} ({_short_path(weights)})"

    return EvalModel(model.eval(), open_clip.get_tokenizer(arch), transform, name, fingerprint)


def load_eval_model(spec: str, seed: int = 0) -> EvalModel:
    """Build an ``EvalModel`` from ``florence benchmark --model`` text.

    Accepted forms: a florence checkpoint path (file or folder), a florence model name
    (random init with ``seed``), or ``open_clip:ARCH[:/path/to/weights]``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"invalid model {spec!r}; {_MODEL_FORMS}")

    if spec.startswith(OPEN_CLIP_PREFIX):
        arch, _, weights = spec[len(OPEN_CLIP_PREFIX) :].partition(":")
        if not arch:
            raise ValueError(f"invalid model {spec!r}: the open_clip architecture is missing, e.g. open_clip:ViT-B-32")
        return open_clip_model(arch, weights or None, seed=seed)

    return florence_model(spec, seed=seed)


def check_device(name: str) -> torch.device:
    """Return ``torch.device(name)`` after placing an empty tensor on it; raise ``ValueError`` with the fix if that fails.

    This catches a misspelt device type and a CUDA device on a machine without a CUDA
    driver or with fewer GPUs than the index, before any model or data is loaded.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"invalid device {name!r}; pass cpu, cuda or cuda:N (N is the GPU index)") from error

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(
            f"device {name!r} is not usable on this machine ({error}); it has {gpus} CUDA GPU(s), "
            "so pass cpu" + (f" or cuda:0 to cuda:{gpus - 1}" if gpus else "")
        ) from error
    return device


def _load_checkpoint(path: Path) -> nn.Module:
    """Load a florence checkpoint file, or raise ``ValueError`` naming it when it is not a safetensors file."""
    from safetensors import SafetensorError

    from florence.checkpoint import load_model

    try:
        return load_model(path)
    except SafetensorError as error:
        raise ValueError(f"cannot read {path} as a florence checkpoint ({error}); {_MODEL_FORMS}") from error


_MODEL_FORMS = (
    "pass a florence checkpoint (model.safetensors or its folder), a florence model name "
    "such as florence-tiny, or open_clip:ARCH[:/path/to/weights] such as open_clip:ViT-B-32"
)


def _unknown_model_message(spec: str) -> str:
    from florence.models import list_models

    return (
        f"unknown model {spec!r}: it is neither an existing checkpoint file (relative paths start at "
        f"{Path.cwd()}) nor a florence model name ({', '.join(list_models())}); {_MODEL_FORMS}"
    )


def _short_path(path: Path) -> str:
    """Return ``path`` relative to the current directory when it is inside it, else its last three parts.

    Symbolic links are kept as given, so the name shows the path the user passed.
    """
    absolute = path.absolute()
    if absolute.is_relative_to(Path.cwd()):
        return str(absolute.relative_to(Path.cwd()))
    return str(Path(*absolute.parts[-3:]))


def _register_open_clip_config(arch: str) -> str:
    """Return ``arch``, or, for a config JSON path, register the file with open_clip and return its stem."""
    if not arch.endswith(".json"):
        return arch

    import open_clip

    path = Path(arch)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} not found; pass an existing JSON file")

    open_clip.add_model_config(path)
    return path.stem
