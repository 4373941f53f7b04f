"""`python -m yan_serve.bench kernels` without CUDA: one readable line and a non-zero status.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_bench.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_kernels_bench_needs_cuda() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "yan_serve.bench", "kernels"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "yan-serve bench kernels: needs a CUDA device (none found)"
    ]
    assert r.stdout == ""


def test_bench_lists_its_commands() -> None:
    from yan_serve.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
