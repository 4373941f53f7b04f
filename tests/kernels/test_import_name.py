"""The kernels/ folder is reachable as plain `kernels` from the repository root, the name of an
unrelated Hugging Face package that transformers probes for (`find_spec("kernels")`, then its
version, then an import). Importing it under that name must work without `yan_kernels`
installed, and transformers must not take it for Hugging Face's package.

Run: python -m pytest -q tests/kernels/test_import_name.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run from the repository root (sys.path[0] is the root), with `yan_kernels` made unimportable,
# as on a checkout where the package is not installed.
PROBE = """
import importlib.abc, importlib.util, sys

class NoYanKernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "yan_kernels" or name.startswith("yan_kernels."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoYanKernels())
assert sys.path[0] in ("", ROOT), sys.path[0]
spec = importlib.util.find_spec("kernels")
assert spec is not None and spec.origin.startswith(ROOT), spec  # the folder shadows the name

from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import import_utils

config = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
model = GPT2LMHeadModel(config)
assert model(input_ids=__import__("torch").tensor([[1, 2, 3]])).logits.shape == (1, 3, 16)
assert not import_utils.is_kernels_available()  # not taken for Hugging Face's `kernels`
import kernels
assert kernels.__file__.startswith(ROOT) and not hasattr(kernels, "__version__")
print("ok")
"""


def test_transformers_imports_from_the_repository_root() -> None:
    pytest.importorskip("transformers")
    code = PROBE.replace("ROOT", repr(str(ROOT)))
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
