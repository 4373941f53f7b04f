"""The README's requests give the responses it shows: every `curl` example in README.md is sent
to a real server on the shipped default checkpoint and its answer compared with the README's
(texts, fills, labels exactly; confidences and scores to float tolerance; ids and timings not).

Run: python -m pytest tests/server/test_readme_examples.py -q
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ServerProcess
from yan_serve.server.settings import default_model_dir

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# `$ curl -s[N] localhost:8000/PATH ... -d '{...}'`, then the response up to the closing fence
EXAMPLE = re.compile(
    r"^\$ curl -sN? localhost:8000(?P<path>/\S+) .*?-d '(?P<body>\{.*?\})'\n(?P<out>.*?)^```",
    re.M | re.S,
)
EXAMPLES = [(m["path"], json.loads(m["body"]), m["out"]) for m in EXAMPLE.finditer(README)]


def test_the_readme_has_its_examples() -> None:
    paths = [p for p, _, _ in EXAMPLES]
    assert {"/v1/infill", "/v1/complete", "/v1/classify"} <= set(paths), paths
    assert any(body.get("stream") for _, body, _ in EXAMPLES)


def _same(got, shown, where: str) -> None:
    if isinstance(shown, dict):
        for k, v in shown.items():
            if k in ("id", "timing"):
                continue  # per request / per machine
            assert k in got, f"{where}: the response has no {k!r}"
            _same(got[k], v, f"{where}.{k}")
    elif isinstance(shown, list):
        assert len(got) == len(shown), f"{where}: {got!r} != {shown!r}"
        for i, (g, s) in enumerate(zip(got, shown, strict=True)):
            _same(g, s, f"{where}[{i}]")
    elif isinstance(shown, float):
        assert got == pytest.approx(shown, rel=1e-3, abs=1e-6), f"{where}: {got} != {shown}"
    else:
        assert got == shown, f"{where}: {got!r} != {shown!r}"


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """A server on the checkpoint `yan-serve` serves when no --model is given (the README's
    set-up command), not the small one the other HTTP tests share."""
    server = ServerProcess("--max-wait-ms", "20", model=default_model_dir()).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            yield c
    finally:
        server.stop()


def test_the_examples_run_on_the_default_checkpoint() -> None:
    shown = {json.loads(out)["model"] for _, body, out in EXAMPLES if not body.get("stream")}
    assert shown == {Path(default_model_dir()).name}


@pytest.mark.parametrize(("path", "body", "out"), EXAMPLES, ids=[p for p, _, _ in EXAMPLES])
def test_readme_example_gives_the_shown_response(client, path, body, out) -> None:
    if body.get("stream"):
        shown = [json.loads(d) for d in re.findall(r"^data: (\{.*\})$", out, re.M)]
        with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ")]
        previews = [e for e in events if "step" in e]
        assert shown and previews[: len(shown)] == shown
        return
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    _same(got, json.loads(out), path)  # every key the README shows, token counts exactly
