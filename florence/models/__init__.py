from florence.models._registry import (
    MODEL_CONFIGS,
    count_parameters,
    create_model,
    get_model_config,
    list_models,
)
from florence.models.coswin import CoSwin, create_coswin
from florence.models.florence import Florence
from florence.models.text import TextTransformer

__all__ = [
    "MODEL_CONFIGS",
    "CoSwin",
    "Florence",
    "TextTransformer",
    "count_parameters",
    "create_coswin",
    "create_model",
    "get_model_config",
    "list_models",
]
