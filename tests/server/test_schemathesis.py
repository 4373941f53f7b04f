"""Schemathesis fuzzes every operation in /openapi.json against the real server: no 5xx, every
response (status, content type, headers, body, each SSE event) matches the schema, and requests
the schema forbids are refused. Every check runs but `positive_data_acceptance`: the schema
cannot know a text's length in tokens, so a few schema-valid requests are 400 by design
(docs/server.md, "Errors")."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.server.conftest import ServerProcess


def test_schemathesis_finds_no_5xx_and_no_schema_violation(server: ServerProcess) -> None:
    st = shutil.which("schemathesis") or shutil.which("st")
    if st is None:
        pytest.fail("schemathesis is not installed (pip install -e .[test])")
    p = subprocess.run(
        [
            st,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "40",
            "--seed",
            "7",
            "--no-color",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = p.stdout[-4000:] + p.stderr[-2000:]
    assert p.returncode == 0, tail
    assert "passed" in p.stdout and "failures" not in p.stdout.split("SUMMARY")[-1].lower(), tail
