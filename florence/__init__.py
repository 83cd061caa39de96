"""florence: the Florence vision foundation model (CoSwin + Transformer, UniCL) in PyTorch."""

from florence.version import __version__
from florence.models import create_model, list_models
from florence.checkpoint import load_model, load_weights, save_weights
from florence.tokenizer import get_tokenizer

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
    "get_tokenizer",
]
