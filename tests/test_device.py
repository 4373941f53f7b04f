"""The one device resolver."""

from __future__ import annotations

import pytest
import torch

from yan_serve.device import resolve_device


def test_auto_and_explicit() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        resolve_device("cuda:1")


def test_nonsense_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="--device tpu9"):
        resolve_device("tpu9")
