import logging

import pytest
import torch

from florence.config import PRECISIONS, TrainConfig
from florence.precision import has_fast_bf16, resolve_precision


def test_auto_follows_the_cpu_bf16_support():
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"

    assert resolve_precision("auto", "cpu") == expected
    assert has_fast_bf16("cpu") == (expected == "bf16")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_explicit_precisions_are_kept(precision):
    assert resolve_precision(precision, "cpu") == precision


def test_emulated_bf16_warns(caplog):
    if has_fast_bf16("cpu"):
        pytest.skip("this CPU has bfloat16 instructions, so no warning is due")

    with caplog.at_level(logging.WARNING, logger="florence.precision"):
        resolve_precision("bf16", "cpu")

    assert "precision=auto or fp32" in caplog.text


def test_config_accepts_auto_and_rejects_unknown_precisions():
    assert "auto" in PRECISIONS

    with pytest.raises(ValueError, match="'bf32'.*auto"):
        TrainConfig(precision="bf32").validate()
