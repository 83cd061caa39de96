"""Export the image and text towers of a Florence model to ONNX or TorchScript.

Each tower maps its input to L2-normalised embeddings, as ``encode_image`` and
``encode_text`` do, with a dynamic batch axis:

- image tower: ``images`` float32 ``[batch, 3, S, S]`` (S is the model's image size,
  preprocessed as ``florence.data.transforms.build_eval_transform`` does) to ``embeddings``
  float32 ``[batch, embed_dim]``;
- text tower: ``tokens`` int64 ``[batch, context_length]`` (the output of
  ``florence.tokenizer.Tokenizer``) to ``embeddings`` float32 ``[batch, embed_dim]``.

Both exports trace the model. The text tower trims a batch to its longest text, so it is
traced with a text that fills the whole context: the exported graph always runs all
``context_length`` positions, which gives the same embeddings because attention is causal.

Tracing fixes the image size and the text length, and torch warns (TracerWarning) at every
shape check that it turns into a constant. Those warnings are silenced, and instead each
exported tower is run on a batch of another size and checked against the PyTorch model.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

_logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17

# Largest absolute difference between exported and PyTorch embeddings that export accepts.
CHECK_ATOL = 1e-3


class ImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def example_inputs(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Return an image batch and a token batch whose end-of-text tokens sit at the last position."""
    from florence.evaluation.tasks import model_image_size
    from florence.tokenizer import get_tokenizer

    size = model_image_size(model)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = get_tokenizer(model.context_length)(["photo " * model.context_length] * batch)
    return images, tokens


def _check_inputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return inputs unlike the traced examples: a batch of 3, and texts of different lengths."""
    from florence.tokenizer import get_tokenizer

    images, _ = example_inputs(model, batch=3)
    texts = ["a dog", "two children climbing a long set of wooden stairs", "photo " * model.context_length]
    return images, get_tokenizer(model.context_length)(texts)


def export_model(model: nn.Module, out_dir: str | Path, fmt: str = "onnx") -> dict[str, Path]:
    """Write ``image_tower`` and ``text_tower`` files of format ``fmt`` and an ``export.json`` into ``out_dir``.

    Returns the path of each tower file. Raises ValueError for an unknown format and
    ImportError (naming the pip extra) when ONNX export needs the onnx package.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    images, tokens = example_inputs(model)
    towers = {"image_tower": (ImageTower(model), images, "images"), "text_tower": (TextTower(model), tokens, "tokens")}

    check_inputs = dict(zip(towers, _check_inputs(model)))
    paths = {}
    for name, (tower, example, input_name) in towers.items():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            if fmt == "onnx":
                paths[name] = _export_onnx(tower, example, input_name, out_dir / f"{name}.onnx")
            else:
                paths[name] = _export_torchscript(tower, example, out_dir / f"{name}.pt")
        _check_export(tower, paths[name], check_inputs[name], input_name)
        _logger.info("exported %s to %s", name, paths[name])

    description = {
        "format": fmt,
        "model_name": getattr(model, "model_name", type(model).__name__),
        "embed_dim": int(model.embed_dim),
        "image_input": {"name": "images", "shape": ["batch", *images.shape[1:]], "dtype": "float32"},
        "text_input": {"name": "tokens", "shape": ["batch", tokens.shape[1]], "dtype": "int64"},
        "output": {"name": "embeddings", "shape": ["batch", int(model.embed_dim)], "normalized": True},
        "files": {name: path.name for name, path in paths.items()},
    }
    (out_dir / "export.json").write_text(json.dumps(description, indent=2), encoding="utf-8")
    return paths


def _export_onnx(tower: nn.Module, example: torch.Tensor, input_name: str, path: Path) -> Path:
    from florence.serving._optional import require

    require("onnx")
    # The TorchScript-based exporter (dynamo=False) needs no onnxscript, and its dynamic_axes
    # give the batch axis a symbolic size.
    with torch.no_grad():
        torch.onnx.export(
            tower,
            (example,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=["embeddings"],
            dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    return path


def _check_export(tower: nn.Module, path: Path, inputs: torch.Tensor, input_name: str) -> None:
    """Run the exported ``path`` on ``inputs`` and raise RuntimeError if it differs from ``tower``.

    ONNX files are checked only when onnxruntime is installed; otherwise a warning is logged.
    """
    with torch.no_grad():
        expected = tower(inputs).numpy()
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ModuleNotFoundError:
            _logger.warning("onnxruntime is not installed, so %s was not checked against PyTorch", path)
            return
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        actual = session.run(None, {input_name: inputs.numpy()})[0]
    else:
        with torch.no_grad():
            actual = torch.jit.load(str(path))(inputs).numpy()

    if actual.shape != expected.shape:
        raise RuntimeError(f"{path} returned embeddings of shape {actual.shape}, but the PyTorch model {expected.shape}")
    difference = float(abs(actual - expected).max())
    if difference > CHECK_ATOL:
        raise RuntimeError(
            f"{path} does not reproduce the PyTorch model: max difference {difference:.2e}, above the limit of {CHECK_ATOL:g}"
        )
    _logger.info("checked %s against PyTorch on a batch of %d: max difference %.2e", path.name, len(inputs), difference)


def _export_torchscript(tower: nn.Module, example: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        traced = torch.jit.trace(tower, (example,), check_trace=False)
    traced.save(str(path))
    return path
