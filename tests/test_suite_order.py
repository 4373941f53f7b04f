"""How the suite is run: two workers taking whole files in collection order (the README's test
command and CI's), with the compile guard's file collected first so that its long compiles
overlap the rest of the suite (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARD = "tests/kernels/test_compile_guard.py"
COMMAND = "-m pytest -q -n 2 --dist loadfile --no-loadscope-reorder"


def _collected_files(*paths: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [ln.split("::")[0] for ln in proc.stdout.splitlines() if "::" in ln]


def test_the_compile_guard_is_collected_before_every_other_file() -> None:
    files = _collected_files("tests/test_config.py", GUARD)  # the guard named last
    assert GUARD in files and "tests/test_config.py" in files, files
    k = files.index("tests/test_config.py")
    assert files[:k] and set(files[:k]) == {GUARD} and GUARD not in files[k:], files


def test_readme_and_ci_run_the_suite_on_two_workers_in_collection_order() -> None:
    """Without `--no-loadscope-reorder` xdist deals the files largest first, and the guard's few
    tests would again be dealt last."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert f"bash scripts/install.sh && python {COMMAND}" in readme
    assert f"\npython3 {COMMAND}\n" in ci
    assert '"pytest-xdist' in (ROOT / "pyproject.toml").read_text()
