"""Locust users for yan-serve: one class per endpoint, payloads from held-out KJV test books.

Payloads come from the JSON file in $LOADTEST_PAYLOADS (written by loadtests/run.py from the
KJV test split: Ruth, Ecclesiastes, Jonah, Philippians, James), so every run and both servers
see the same requests; each user walks them in its own seeded order and every request carries a
seed. Users are closed-loop (no think time): concurrency = users. Completion tokens returned by
the server are summed into $LOADTEST_TOKENS (JSON) when the run stops.

    LOADTEST_PAYLOADS=payloads.json locust -f loadtests/locustfile.py --headless -u 4 -t 10s \
        --host http://127.0.0.1:8000 CompleteUser
"""

from __future__ import annotations

import itertools
import json
import os
import random

from locust import FastHttpUser, constant, events, task

_PAYLOADS: dict[str, list[dict]] = {}
_TOKENS = {"completion_tokens": 0, "responses": 0}
_USER_IDS = itertools.count()


def payloads(kind: str) -> list[dict]:
    if not _PAYLOADS:
        path = os.environ.get("LOADTEST_PAYLOADS")
        if not path:
            raise RuntimeError(
                "set LOADTEST_PAYLOADS to a payload file (loadtests/run.py writes one)"
            )
        with open(path) as f:
            _PAYLOADS.update(json.load(f))
    return _PAYLOADS[kind]


@events.test_stop.add_listener
def _write_tokens(environment, **_kw) -> None:
    out = os.environ.get("LOADTEST_TOKENS")
    if out:
        with open(out, "w") as f:
            json.dump(_TOKENS, f)


class _YanUser(FastHttpUser):
    abstract = True
    wait_time = constant(0)
    kind = ""
    path = ""

    def on_start(self) -> None:
        uid = next(_USER_IDS)
        items = list(payloads(self.kind))
        random.Random(uid).shuffle(items)
        self._items = itertools.cycle(items)
        self._seed = itertools.count(1000 * uid)

    @task
    def send(self) -> None:
        body = {**next(self._items), "seed": next(self._seed)}
        with self.client.post(self.path, json=body, name=self.path, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                usage = r.json()["usage"]
            except (ValueError, KeyError):
                r.failure("response without usage")
                return
            _TOKENS["completion_tokens"] += int(usage["completion_tokens"])
            _TOKENS["responses"] += 1
            r.success()


class InfillUser(_YanUser):
    kind, path = "infill", "/v1/infill"


class InfillFullUser(_YanUser):
    """Infill with `protocol: full`: the AR server regenerates the passage (paper protocol)."""

    kind, path = "infill-full", "/v1/infill"


class CompleteUser(_YanUser):
    kind, path = "complete", "/v1/complete"


class QAUser(_YanUser):
    kind, path = "qa", "/v1/qa"


class ClassifyUser(_YanUser):
    kind, path = "classify", "/v1/classify"
