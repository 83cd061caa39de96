"""Import optional packages on first use, with an error that names the pip extra."""

from __future__ import annotations

import importlib
from types import ModuleType

# pip package of each optional module, and the extra of florence-vision that installs it.
_PACKAGES = {
    "pyarrow": ("pyarrow", "serve"),
    "pyarrow.parquet": ("pyarrow", "serve"),
    "faiss": ("faiss-cpu", "serve"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "python_multipart": ("python-multipart", "serve"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
}


def require(module: str) -> ModuleType:
    """Import ``module``, raising ImportError with the install command when it is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        package, extra = _PACKAGES.get(module, (module, "serve"))
        raise ImportError(
            f"{module} is not installed; install it with: pip install 'florence-vision[{extra}]' "
            f"(or pip install {package})"
        ) from error
