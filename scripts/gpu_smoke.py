#!/usr/bin/env python3
"""Served smoke test and small load test of yan-serve, YAN against the AR baseline.

For each checkpoint in --models, one after the other (so they never share the device):
start `python -m yan_serve` on a free loopback port, wait for /ready, call every endpoint once
and check its status and JSON shape, time sequential /v1/complete (128 tokens, ignore_eos) and
/v1/infill (a ~150-word passage with five spans), run a closed-loop burst of --concurrency
clients for --duration seconds per burst endpoint, then SIGTERM the server and check that it
drains and exits 0. Every result is one JSON line in --out (written as it happens, so a run cut
short still leaves what it measured); a comparison table ends the output.

Only the standard library is used (threads + http.client), so it runs on a bare GPU image where
the server's own dependencies come from carried wheels and no load-test tool is installed.

    python3 scripts/gpu_smoke.py --device cuda --out smoke.jsonl
    python3 scripts/gpu_smoke.py --device cpu --duration 1 --concurrency 4 --seq 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtests"))  # the closed-loop client shared with loadtests/run.py
try:
    from closed_loop import closed_loop, free_port
    from closed_loop import percentile as pct
finally:
    sys.path.remove(str(ROOT / "loadtests"))

DEFAULT_MODELS = "weights/yan-tiny-kjv,weights/ar-tiny-kjv"

PASSAGE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the [MASK:3]. And the Spirit of God moved upon "
    "the face of the waters. And God said, Let there be light: and there was [MASK:2]. And God "
    "saw the light, that it was good: and God divided the light from the darkness. And God "
    "called the light Day, and the darkness he called [MASK:2]. And the evening and the morning "
    "were the first day. And God said, Let there be a firmament in the midst of the waters, and "
    "let it divide the waters from the [MASK:3]. And God made the firmament, and divided the "
    "waters which were under the firmament from the waters which were above the firmament: and "
    "it was so. And God called the firmament [MASK:2]. And the evening and the morning were the "
    "second day."
)
PASSAGE_SPANS = 5
PROMPTS = [
    "And God said, Let there be light: and there was",
    "Blessed are the poor in spirit: for theirs is",
    "The LORD is my shepherd; I shall not",
    "And the word was made flesh, and dwelt among",
    "Vanity of vanities, saith the Preacher,",
    "And Ruth said, Intreat me not to leave thee,",
    "Now the word of the LORD came unto Jonah the son of",
    "My brethren, count it all joy when ye fall into",
]
CONTEXT = "Mary moved to the bathroom. John went to the hallway. Mary travelled to the office."
LABELS = ["law", "history", "wisdom", "prophets", "gospels", "epistles", "revelation"]


def _has(*keys: str):
    def check(body: Any) -> str | None:
        if not isinstance(body, dict):
            return f"expected a JSON object, got {type(body).__name__}"
        missing = [k for k in keys if k not in body]
        return f"missing {missing}" if missing else None

    return check


def _generation(*extra: str):
    base = _has("id", "model", "task", "text", "candidates", "usage", "timing", *extra)

    def check(body: Any) -> str | None:
        if problem := base(body):
            return problem
        if not body["candidates"]:
            return "no candidates"
        if not {"queue_ms", "compute_ms", "total_ms"} <= set(body["timing"]):
            return f"timing lacks queue_ms/compute_ms/total_ms: {body['timing']}"
        return None

    return check


def _check_infill(body: Any) -> str | None:
    if problem := _generation("fills")(body):
        return problem
    if len(body["fills"]) != 1:
        return f"expected 1 fill, got {len(body['fills'])}"
    return None


def _check_models(body: Any) -> str | None:
    if problem := _has("object", "data")(body):
        return problem
    return None if body["data"] and "id" in body["data"][0] else "no model card"


def _check_completions(body: Any) -> str | None:
    if problem := _has("id", "object", "choices", "usage")(body):
        return problem
    if body["object"] != "text_completion" or not body["choices"]:
        return f"object={body['object']!r}, {len(body['choices'])} choices"
    return None if "text" in body["choices"][0] else "choice without text"


def _check_scores(body: Any) -> str | None:
    if problem := _generation("label", "scores")(body):
        return problem
    if not body["scores"] or body["label"] not in LABELS:
        return f"label {body['label']!r}, scores {body['scores']}"
    return None


def _check_sse_result(events: list[tuple[str, str]]) -> str | None:
    kinds = [e for e, _ in events]
    if not kinds or kinds[-1] != "result":
        return f"last event is not 'result': {kinds[-5:]}"
    return _generation("finish_reason")(json.loads(events[-1][1]))


def _check_sse_openai(events: list[tuple[str, str]]) -> str | None:
    data = [d for _, d in events]
    if not data or data[-1] != "[DONE]":
        return "no closing [DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    if not chunks or any(c.get("object") != "text_completion" for c in chunks):
        return "chunks are not text_completion objects"
    return None


def _check_metrics(text: str) -> str | None:
    return None if "yan:" in text else "no yan: metric in the exposition"


def _check_openapi(body: Any) -> str | None:
    if problem := _has("openapi", "paths")(body):
        return problem
    missing = [p for p in ("/v1/infill", "/v1/complete") if p not in body["paths"]]
    return f"paths lack {missing}" if missing else None


@dataclass
class Endpoint:
    name: str  # the row's "endpoint": path plus a variant in parentheses
    method: str
    path: str
    body: dict | None
    check: Any
    kind: str = "json"  # json | text | sse


ENDPOINTS = [
    Endpoint("/health", "GET", "/health", None, _has("status")),
    Endpoint("/ready", "GET", "/ready", None, _has("status")),
    Endpoint("/metrics", "GET", "/metrics", None, _check_metrics, "text"),
    Endpoint("/openapi.json", "GET", "/openapi.json", None, _check_openapi),
    Endpoint("/v1/models", "GET", "/v1/models", None, _check_models),
    Endpoint(
        "/v1/infill",
        "POST",
        "/v1/infill",
        {"text": "In the beginning God created the [MASK] and the earth.", "seed": 0},
        _check_infill,
    ),
    Endpoint(
        "/v1/complete",
        "POST",
        "/v1/complete",
        {"prompt": PROMPTS[0], "max_tokens": 16, "seed": 0},
        _generation("finish_reason"),
    ),
    Endpoint(
        "/v1/complete (stream)",
        "POST",
        "/v1/complete",
        {"prompt": PROMPTS[1], "max_tokens": 16, "seed": 0, "stream": True},
        _check_sse_result,
        "sse",
    ),
    Endpoint(
        "/v1/qa",
        "POST",
        "/v1/qa",
        {"context": CONTEXT, "question": "Where is Mary?", "seed": 0},
        _generation("answer"),
    ),
    Endpoint(
        "/v1/classify",
        "POST",
        "/v1/classify",
        {"text": "Blessed are the poor in spirit: for theirs is the kingdom of heaven.", "seed": 0},
        _generation("label"),
    ),
    Endpoint(
        "/v1/classify (labels)",
        "POST",
        "/v1/classify",
        {
            "text": "Blessed are the poor in spirit: for theirs is the kingdom of heaven.",
            "labels": LABELS,
            "seed": 0,
        },
        _check_scores,
    ),
    Endpoint(
        "/v1/completions",
        "POST",
        "/v1/completions",
        {"prompt": PROMPTS[2], "max_tokens": 16, "seed": 0},
        _check_completions,
    ),
    Endpoint(
        "/v1/completions (stream)",
        "POST",
        "/v1/completions",
        {"prompt": PROMPTS[3], "max_tokens": 16, "seed": 0, "stream": True},
        _check_sse_openai,
        "sse",
    ),
]
ENDPOINT_NAMES = [e.name for e in ENDPOINTS]


# --------------------------------------------------------------------------------- http
class Client:
    """One keep-alive connection (http.client is not thread-safe: one per thread)."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                if resp.getheader("connection", "").lower() == "close":
                    self.close()
                return resp.status, payload
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def parse_sse(payload: bytes) -> list[tuple[str, str]]:
    """(event, data) per server-sent event; event defaults to 'message'."""
    events = []
    for block in payload.decode().split("\n\n"):
        if not block.strip():
            continue
        event, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((event, "\n".join(data)))
    return events


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ------------------------------------------------------------------------------- server
class Server:
    def __init__(self, model: str, device: str, log_path: Path, extra: list[str]) -> None:
        self.model, self.log_path = model, log_path
        self.port = free_port()
        self.cmd = [
            sys.executable, "-m", "yan_serve", "--model", model, "--device", device,
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info", *extra,
        ]  # fmt: skip
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        client = Client(self.port, timeout=5)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                status, _ = client.request("GET", "/ready")
                if status == 200:
                    client.close()
                    return time.perf_counter() - t0
            except OSError:
                client.close()
            time.sleep(0.25)
        raise TimeoutError(f"/ready not 200 after {timeout:.0f} s")

    def tail(self, n: int = 40) -> str:
        """The server log's last `n` lines (also after `stop` has closed the log)."""
        if not self.log.closed:
            self.log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def log_problems(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return text.count("Traceback") + text.count(" ERROR ") + text.count("ERROR:")

    def stop(self, timeout: float = 45.0) -> tuple[int | None, float]:
        """SIGTERM, then the exit code and the seconds the drain took (None: had to kill)."""
        t0 = time.perf_counter()
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = None
        self.log.close()
        return code, time.perf_counter() - t0


# -------------------------------------------------------------------------------- phases
@dataclass
class Run:
    args: argparse.Namespace
    out: Any
    t_end: float
    rows: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def emit(self, row: dict) -> None:
        row = {"device": self.args.device, **row}
        self.rows.append(row)
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()

    def left(self) -> float:
        return self.t_end - time.perf_counter()

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"FAIL {what}", flush=True)

    def record(self, row: dict, line: str, failure: str | None = None) -> dict:
        """Emit a result row, print its line, and count `failure` (what went wrong) if any."""
        self.emit(row)
        print(line, flush=True)
        if failure is not None:
            self.fail(failure)
        return row


def check_endpoints(run: Run, model: str, port: int) -> None:
    client = Client(port)
    for ep in ENDPOINTS:
        t0 = time.perf_counter()
        status, problem = None, None
        try:
            status, payload = client.request(ep.method, ep.path, ep.body)
            ms = 1000 * (time.perf_counter() - t0)
            if status != 200:
                problem = payload[:300].decode(errors="replace")
            elif ep.kind == "text":
                problem = ep.check(payload.decode())
            elif ep.kind == "sse":
                problem = ep.check(parse_sse(payload))
            else:
                problem = ep.check(json.loads(payload))
        except Exception as e:  # a broken endpoint is a finding, not a crash of the run
            ms = 1000 * (time.perf_counter() - t0)
            problem = f"{type(e).__name__}: {e}"
        ok = status == 200 and problem is None
        row = {
            "kind": "endpoint", "model": model, "endpoint": ep.name, "method": ep.method,
            "status": status, "ok": ok, "ms": r3(ms), "problem": problem,
        }  # fmt: skip
        line = f"  {'ok  ' if ok else 'FAIL'} {status} {ep.name:<28} {ms:8.1f} ms"
        line += f"  {problem}" if problem else ""
        run.record(row, line, None if ok else f"{model} {ep.name}: {status} {problem}")
    client.close()


def complete_body(i: int, tokens: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "ignore_eos": True,
            "seed": i}  # fmt: skip


def infill_body(i: int, tokens: int = 0) -> dict:
    return {"text": PASSAGE, "ignore_eos": True, "seed": i}


BODIES = {"complete": ("/v1/complete", complete_body), "infill": ("/v1/infill", infill_body)}


def sequential(run: Run, model: str, port: int, task: str, n: int) -> dict | None:
    """n requests one at a time after 2 warm-ups: client latency and the server's timing."""
    path, make = BODIES[task]
    client = Client(port)
    lat, queue, compute, server, tokens, errors = [], [], [], [], [], 0
    for i in range(-2, n):
        if run.left() < 5:
            break
        t0 = time.perf_counter()
        try:
            status, payload = client.request("POST", path, make(i + 2, run.args.tokens))
        except OSError:
            status, payload = None, b""
        ms = 1000 * (time.perf_counter() - t0)
        if status != 200:
            errors += 1
            continue
        if i < 0:
            continue
        body = json.loads(payload)
        lat.append(ms)
        queue.append(body["timing"]["queue_ms"])
        compute.append(body["timing"]["compute_ms"])
        server.append(body["timing"]["total_ms"])
        tokens.append(body["usage"]["completion_tokens"])
    client.close()
    row = {
        "kind": "sequential", "model": model, "endpoint": path, "n": len(lat), "errors": errors,
        "p50_ms": r3(pct(lat, 50)), "p90_ms": r3(pct(lat, 90)),
        "mean_ms": r3(sum(lat) / len(lat)) if lat else None,
        "queue_ms_p50": r3(pct(queue, 50)), "compute_ms_p50": r3(pct(compute, 50)),
        "server_total_ms_p50": r3(pct(server, 50)),
        "completion_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
    }  # fmt: skip
    line = (f"  sequential {path:<14} n={row['n']:<3} p50 {row['p50_ms']} ms"
            f"  p90 {row['p90_ms']} ms  lone queue {row['queue_ms_p50']} ms"
            f"  compute {row['compute_ms_p50']} ms  tokens {row['completion_tokens']}"
            f"  errors {errors}")  # fmt: skip
    failure = f"{model} sequential {path}: {errors} errors, {len(lat)} answers"
    return run.record(row, line, failure if errors or not lat else None)


def burst(run: Run, model: str, port: int, task: str, concurrency: int, duration: float) -> dict:
    """A closed loop of `concurrency` clients (no think time) for `duration` seconds."""
    path, make = BODIES[task]
    lock = threading.Lock()
    lat: list[float] = []
    queue: list[float] = []
    statuses: dict[str, int] = {}
    tokens = [0]
    counter = [0]

    def worker(w: int, start: Callable[[], float]) -> None:
        client = Client(port)
        deadline = start()
        while time.perf_counter() < deadline:
            with lock:
                i = counter[0] = counter[0] + 1
            t0 = time.perf_counter()
            try:
                status, payload = client.request("POST", path, make(10_000 + i, run.args.tokens))
                key = str(status)
            except OSError as e:
                key, status, payload = type(e).__name__, None, b""
                client.close()
            ms = 1000 * (time.perf_counter() - t0)
            body = None
            if status == 200:
                try:
                    body = json.loads(payload)
                except ValueError:
                    key = "bad JSON"
            with lock:
                statuses[key] = statuses.get(key, 0) + 1
                if body is not None:
                    lat.append(ms)
                    queue.append(body["timing"]["queue_ms"])
                    tokens[0] += body["usage"]["completion_tokens"]
        client.close()

    elapsed = closed_loop(concurrency, duration, worker, join_timeout=duration + 120)
    ok = len(lat)
    errors = sum(v for k, v in statuses.items() if k != "200")
    row = {
        "kind": "burst", "model": model, "endpoint": path, "concurrency": concurrency,
        "duration_s": round(elapsed, 3), "requests": ok + errors, "errors": errors,
        "statuses": statuses, "req_s": round(ok / elapsed, 2),
        "tokens_s": round(tokens[0] / elapsed, 1), "p50_ms": r3(pct(lat, 50)),
        "p99_ms": r3(pct(lat, 99)), "queue_ms_p50": r3(pct(queue, 50)),
        "queue_ms_p99": r3(pct(queue, 99)),
    }  # fmt: skip
    line = (f"  burst {path:<14} x{concurrency} {elapsed:.1f} s: {row['req_s']} req/s "
            f"{row['tokens_s']} tok/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  "
            f"queue p50 {row['queue_ms_p50']} ms  statuses {statuses}")  # fmt: skip
    failure = f"{model} burst {path}: {errors} errors {statuses}"
    return run.record(row, line, failure if errors or not ok else None)


def model_kind(model: str) -> str:
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return "?"
    return "ar" if cfg.get("model_type") == "gpt2" else "yan"


def serve_and_measure(run: Run, model: str) -> None:
    a = run.args
    name = Path(model).name
    log_path = Path(a.log_dir) / f"server-{name}.log"
    print(f"== {name} ({model_kind(model)}) on {a.device}", flush=True)
    server = Server(model, a.device, log_path, a.server_arg)
    row: dict[str, Any] = {"kind": "server", "model": name, "kind_of_model": model_kind(model),
                           "port": server.port}  # fmt: skip
    tail_shown = False
    try:
        try:
            row["ready_s"] = round(server.wait_ready(max(5.0, min(a.ready_timeout, run.left()))), 2)
            print(f"  ready in {row['ready_s']} s on port {server.port}", flush=True)
        except (RuntimeError, TimeoutError) as e:
            row["error"] = str(e)
            run.fail(f"{name} start: {e}")
            print(f"--- server log tail ({log_path}):\n{server.tail()}\n---", flush=True)
            tail_shown = True
            return
        check_endpoints(run, name, server.port)
        for task in ("complete", "infill"):
            if run.left() > 10:
                sequential(run, name, server.port, task, a.seq)
            else:
                run.fail(f"{name} sequential {task}: skipped, out of budget")
        for task in a.burst:
            room = run.left() - 15  # keep time to drain and stop the server
            if room < 1:
                run.fail(f"{name} burst {task}: skipped, out of budget")
                continue
            burst(run, name, server.port, task, a.concurrency, min(a.duration, room))
    finally:
        code, secs = server.stop()
        row.update(exit_code=code, stop_s=round(secs, 2), clean=code == 0,
                   log_problems=server.log_problems())  # fmt: skip
        run.emit(row)
        print(
            f"  SIGTERM: exit code {code} after {secs:.1f} s; "
            f"{row['log_problems']} tracebacks/ERROR lines in the server log",
            flush=True,
        )
        if code != 0:
            run.fail(f"{name} shutdown: exit code {code}")
            if not tail_shown:
                print(f"--- server log tail ({log_path}):\n{server.tail()}\n---", flush=True)


def report(rows: list[dict]) -> str:
    """The YAN vs AR table: one column per model, and YAN's speedup where both ran."""
    models: list[str] = []
    kinds: dict[str, str] = {}
    for r in rows:
        if r["kind"] == "server":
            models.append(r["model"])
            kinds[r["model"]] = r.get("kind_of_model", "?")

    def get(model: str, kind: str, path: str, key: str) -> float | None:
        for r in rows:
            if r["model"] == model and r["kind"] == kind and r.get("endpoint") == path:
                return r.get(key)
        return None

    metrics = [  # label, row kind, endpoint, key, lower is better
        ("complete p50 ms", "sequential", "/v1/complete", "p50_ms", True),
        ("complete p90 ms", "sequential", "/v1/complete", "p90_ms", True),
        ("complete lone queue ms", "sequential", "/v1/complete", "queue_ms_p50", True),
        ("infill p50 ms", "sequential", "/v1/infill", "p50_ms", True),
        ("infill p90 ms", "sequential", "/v1/infill", "p90_ms", True),
        ("infill lone queue ms", "sequential", "/v1/infill", "queue_ms_p50", True),
    ]
    for path in ("/v1/complete", "/v1/infill"):
        if any(r["kind"] == "burst" and r["endpoint"] == path for r in rows):
            task = path.rsplit("/", 1)[1]
            metrics += [
                (f"{task} burst req/s", "burst", path, "req_s", False),
                (f"{task} burst tok/s", "burst", path, "tokens_s", False),
                (f"{task} burst p50 ms", "burst", path, "p50_ms", True),
                (f"{task} burst p99 ms", "burst", path, "p99_ms", True),
                (f"{task} burst errors", "burst", path, "errors", True),
            ]
    yan = next((m for m in models if kinds[m] == "yan"), None)
    ar = next((m for m in models if kinds[m] == "ar"), None)
    width = max([14, *(len(m) + 2 for m in models)])
    head = f"{'metric':<26}" + "".join(f"{m:>{width}}" for m in models)
    if yan and ar:
        head += f"{'YAN speedup':>13}"
    lines = [head, "-" * len(head)]
    for label, kind, path, key, lower in metrics:
        vals = [get(m, kind, path, key) for m in models]
        line = f"{label:<26}" + "".join(
            f"{'-' if v is None else format(v, 'g'):>{width}}" for v in vals
        )
        if yan and ar and "errors" not in label and "queue" not in label:
            y, x = get(yan, kind, path, key), get(ar, kind, path, key)
            if y and x:
                line += f"{(x / y if lower else y / x):12.2f}x"
        lines.append(line)
    ok = {m: sum(1 for r in rows if r["model"] == m and r["kind"] == "endpoint" and r["ok"])
          for m in models}  # fmt: skip
    lines.append(
        f"{'endpoints ok':<26}" + "".join(f"{f'{ok[m]}/{len(ENDPOINTS)}':>{width}}" for m in models)
    )
    clean = {r["model"]: r.get("exit_code") for r in rows if r["kind"] == "server"}
    lines.append(
        f"{'exit code on SIGTERM':<26}" + "".join(f"{clean[m]!s:>{width}}" for m in models)
    )
    return "\n".join(lines)


# The valued options, flag -> (default, help): each parses as the type of its default.
OPTIONS = {
    "--device": ("cuda", "the servers' --device (cuda, cpu, auto)"),
    "--models": (DEFAULT_MODELS, "comma-separated checkpoint dirs"),
    "--duration": (5.0, "seconds per burst"),
    "--concurrency": (64, "burst clients"),
    "--seq": (20, "sequential requests per endpoint"),
    "--tokens": (128, "max_tokens of timed /v1/complete"),
    "--burst": (
        "complete,infill",
        "comma-separated burst endpoints: complete, infill (empty: none)",
    ),
    "--ready-timeout": (120.0, "seconds to wait for /ready"),
    "--budget": (0.0, "total seconds (0: no limit)"),
    "--out": ("smoke.jsonl", "JSON lines, one per result"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, (default, help_text) in OPTIONS.items():
        p.add_argument(flag, type=type(default), default=default, help=help_text)
    p.add_argument("--log-dir", help="server logs (default: beside --out)")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra yan-serve flag, repeatable (e.g. --server-arg=--max-batch-size=64)",
    )
    a = p.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    a.burst = [b for b in a.burst.split(",") if b]
    bad = [b for b in a.burst if b not in BODIES]
    if bad:
        p.error(f"--burst: unknown {bad}; choose from {sorted(BODIES)}")
    for flag in ("concurrency", "seq", "tokens"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag}: expected a positive integer, got {getattr(a, flag)}")
    for flag in ("duration", "ready_timeout"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')}: expected a positive number of seconds")
    if not a.models:
        p.error("--models: name at least one checkpoint directory")
    # relative to the repository, as main() serves them (ROOT / an absolute path is that path)
    missing = [m for m in a.models if not (ROOT / m).is_dir()]
    if missing:
        p.error(f"--models: no checkpoint directory {', '.join(missing)}")
    a.log_dir = a.log_dir or str(Path(a.out).resolve().parent)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):  # `timeout` sends SIGTERM: stop the servers on the way out
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    t_end = time.perf_counter() + (a.budget if a.budget > 0 else 1e9)
    with open(a.out, "w") as out:
        run = Run(a, out, t_end)
        for model in a.models:
            if run.left() < 20:
                run.fail(f"{model}: skipped, out of budget")
                continue
            path = model if Path(model).is_absolute() else str(ROOT / model)
            serve_and_measure(run, path)
        print()
        print(report(run.rows))
    print()
    if run.failures:
        print(f"{len(run.failures)} failure(s):")
        for f in run.failures:
            print(f"  {f}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
