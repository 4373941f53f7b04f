"""Latency/throughput sweep: YAN vs the AR baseline, same server, same requests, Locust headless.

    python loadtests/run.py                                  # full sweep (1, 4, 16, 64 users)
    python loadtests/run.py --duration 3 --users 1,4 --endpoints complete   # quick look

For each server (YAN, then AR: one at a time, so they never share the CPU/GPU) it starts
`yan-serve` on loopback, waits for /ready, runs the load for every endpoint and concurrency level,
and stops the server with SIGTERM. Writes `loadtests/results/<date>-<device>/`: the raw
per-point files (raw/), results.json, results.md (the table) and results.png (latency and
throughput vs concurrency, both servers; skipped with a note when matplotlib is missing).

The load comes from Locust (headless) or from the built-in client (`--client builtin`: closed
loop, one thread and one keep-alive connection per user, standard library only, so a GPU image
without Locust can run it). `--client auto` (the default) takes Locust when its command is on
PATH. Both send the same payloads in the same per-user order with the same seeds, and report the
same figures; the built-in client's raw files are one latency per request (`*_latencies.csv`).

    python loadtests/run.py --device cuda --client builtin --users 1,4,16,64
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import closed_loop  # loadtests/closed_loop.py: this script's folder is on sys.path
from closed_loop import free_port

from yan_serve.argtypes import count_int, positive_int, positive_int_list

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PATHS = {"infill": "/v1/infill", "infill-full": "/v1/infill", "complete": "/v1/complete",
         "qa": "/v1/qa", "classify": "/v1/classify"}  # fmt: skip
USER_CLASS = {"infill": "InfillUser", "infill-full": "InfillFullUser", "complete": "CompleteUser",
              "qa": "QAUser", "classify": "ClassifyUser"}  # fmt: skip


def log(msg: str) -> None:
    print(f"[loadtest] {msg}", file=sys.stderr, flush=True)


def device_name(device: str) -> str:
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace("NVIDIA ", "").replace(" ", "-").lower()
    return "cpu"


def build_payloads(data: Path, n: int, max_tokens: int, steps: int, seed: int = 0,
                   infill_words: int = 0) -> dict:  # fmt: skip
    """Seeded requests from the KJV test books (text tasks) and bAbI-style test stories (qa).

    Infill passages are single verses of 8-40 words with 2 masked words, or, with
    `infill_words` > 0, runs of consecutive verses of at least that many words with one word in
    ten masked (the paper's long-passage protocol). `infill-full` sends the same passages with
    `protocol: full`, which makes the AR server regenerate the whole passage (the paper's AR
    protocol, with `ignore_eos` so that it regenerates all of it) instead of only the spans; YAN
    answers both the same way."""
    from yan_serve.tasks.corpus import load_corpus

    if not (data / "test.jsonl").exists():
        from yan_serve.tasks.kjv import build_corpus

        log(f"building the KJV corpus in {data}")
        build_corpus(data)
    corpus = load_corpus(data, splits=("test",))
    rng = random.Random(seed)
    records = corpus.text["test"]
    texts = [r.text for r in records if 8 <= len(r.text.split()) <= 40]
    rng.shuffle(texts)
    texts = texts[:n]
    if infill_words > 0:
        passages = []
        for start in rng.sample(range(len(records)), k=min(n, len(records))):
            words: list[str] = []
            for r in records[start:]:
                words += r.text.split()
                if len(words) >= infill_words:
                    break
            if len(words) >= infill_words:
                passages.append(" ".join(words[:infill_words]))
        if not passages:
            raise ValueError(f"no run of test verses reaches {infill_words} words")
    else:
        passages = texts
    infill = []
    for t in passages:
        words = t.split()
        k = max(2, len(words) // 10) if infill_words > 0 else min(2, len(words) - 2)
        for i in sorted(rng.sample(range(1, len(words) - 1), k=k)):
            words[i] = "[MASK]"
        infill.append({"text": " ".join(words), "steps": steps})
    complete = [{"prompt": " ".join(t.split()[: max(4, len(t.split()) // 2)]),
                 "max_tokens": max_tokens, "ignore_eos": True, "steps": steps}
                for t in texts]  # fmt: skip
    qa = [{"context": r.context, "question": r.question, "max_tokens": 4, "steps": steps}
          for r in corpus.records("qa", "test")[:n]]  # fmt: skip
    classify = [{"text": t, "steps": steps} for t in texts]
    # the paper's AR protocol regenerates the whole passage: a fixed amount of work, measured
    # with ignore_eos as complete's 128 tokens are (an early EOS would shorten only AR's side)
    full = [{**p, "protocol": "full", "ignore_eos": True} for p in infill]
    return {"infill": infill, "infill-full": full,
            "complete": complete, "qa": qa, "classify": classify}  # fmt: skip


def start_server(model: Path, device: str, threads: int, extra: list[str]) -> tuple:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "yan_serve", "--model", str(model), "--port", str(port),
           "--device", device, "--log-level", "warning", "--max-queue", "4096", *extra]  # fmt: skip
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {model} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"server for {model} not ready in 300 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def run_locust(url: str, endpoint: str, users: int, duration: float, prefix: Path,
               payload_file: Path) -> dict:  # fmt: skip
    tokens_file = prefix.with_suffix(".tokens.json")
    env = {**os.environ, "LOADTEST_PAYLOADS": str(payload_file),
           "LOADTEST_TOKENS": str(tokens_file)}  # fmt: skip
    cmd = ["locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{int(duration)}s", "--host", url, "--csv", str(prefix), "--only-summary",
           "--stop-timeout", "30", "--loglevel", "WARNING", USER_CLASS[endpoint]]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 180)
    stats = prefix.parent / f"{prefix.name}_stats.csv"
    if not stats.exists():
        raise RuntimeError(f"locust wrote no stats ({p.returncode}): {p.stderr[-2000:]}")
    with open(stats) as f:
        agg = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    tokens = json.loads(tokens_file.read_text()) if tokens_file.exists() else {}
    n = int(agg["Request Count"])
    return {
        "requests": n,
        "failures": int(agg["Failure Count"]),
        "rps": float(agg["Requests/s"]),
        "p50_ms": float(agg["50%"]),
        "p90_ms": float(agg["90%"]),
        "p99_ms": float(agg["99%"]),
        "output_tok_s": tokens.get("completion_tokens", 0) / duration,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    p = closed_loop.percentile(values, q)
    return 0.0 if p is None else p


def run_builtin(url: str, endpoint: str, users: int, duration: float, prefix: Path,
                payload_file: Path) -> dict:  # fmt: skip
    """A closed-loop load of `users` threads for `duration` seconds, as the Locust users send
    it (each user walks the payloads in its own seeded order, seeds from 1000 * user), with
    `http.client` only. Requests still in flight at the deadline finish and count."""
    items = json.loads(payload_file.read_text())[endpoint]
    host, port = url.removeprefix("http://").split(":")
    path = PATHS[endpoint]
    lat: list[float] = []
    fails: list[str] = []
    tokens = [0]
    lock = threading.Lock()

    def user(uid: int, start: Callable[[], float]) -> None:
        order = list(items)
        random.Random(uid).shuffle(order)
        cyc, seeds = itertools.cycle(order), itertools.count(1000 * uid)
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        deadline = start()
        while time.perf_counter() < deadline:
            body = json.dumps({**next(cyc), "seed": next(seeds)})
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"content-type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                ms = 1e3 * (time.perf_counter() - t0)
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
                n = int(json.loads(data)["usage"]["completion_tokens"])
            except Exception as exc:  # a failed request is counted, the user goes on
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=600)
                with lock:
                    fails.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            with lock:
                lat.append(ms)
                tokens[0] += n
        conn.close()

    wall = closed_loop.closed_loop(users, duration, user)
    with open(prefix.parent / f"{prefix.name}_latencies.csv", "w") as f:
        f.write("latency_ms\n" + "".join(f"{x:.3f}\n" for x in lat))
    if fails:
        (prefix.parent / f"{prefix.name}_failures.txt").write_text("\n".join(fails) + "\n")
    n = len(lat) + len(fails)
    return {
        "requests": n,
        "failures": len(fails),
        "rps": n / wall,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "mean_ms": statistics.fmean(lat) if lat else 0.0,
        "output_tok_s": tokens[0] / wall,
    }


def write_report(rows: list[dict], out: Path, meta: dict) -> None:
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Load test {meta['date']} on {meta['device']}", "",
             f"commit {meta['commit']}; client {meta.get('client', 'locust')}; "
             f"{meta['duration_s']} s per point; YAN steps "
             f"{meta['steps']}; complete max_tokens {meta['max_tokens']} (ignore_eos); "
             f"command: `{meta['command']}`", "",
             "| server | endpoint | users | requests | failures | req/s | p50 ms | p90 ms | "
             "p99 ms | output tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['server']} | {r['endpoint']} | {r['users']} | {r['requests']} | "
                     f"{r['failures']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {r['output_tok_s']:.0f} |")  # fmt: skip
    speed = []
    for ep in sorted({r["endpoint"] for r in rows}):
        for u in sorted({r["users"] for r in rows}):
            y = [r for r in rows if (r["server"], r["endpoint"], r["users"]) == ("yan", ep, u)]
            a = [r for r in rows if (r["server"], r["endpoint"], r["users"]) == ("ar", ep, u)]
            if y and a and y[0]["p50_ms"] > 0:
                speed.append(f"| {ep} | {u} | {a[0]['p50_ms'] / y[0]['p50_ms']:.1f}x |")
    if speed:
        lines += ["", "AR p50 / YAN p50 (how many times lower YAN's median latency is):", "",
                  "| endpoint | users | speed-up |", "|---|---|---|", *speed]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "results.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no plot (results.md and results.json hold the data)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = sorted({r["endpoint"] for r in rows})
    fig, axes = plt.subplots(len(eps), 2, figsize=(10, 3.2 * len(eps)), squeeze=False)
    for i, ep in enumerate(eps):
        for server, style in (("yan", "o-"), ("ar", "s--")):
            pts = sorted((r["users"], r) for r in rows if r["endpoint"] == ep
                         and r["server"] == server)  # fmt: skip
            if not pts:
                continue
            us = [u for u, _ in pts]
            axes[i][0].plot(us, [r["p50_ms"] for _, r in pts], style, label=f"{server} p50")
            axes[i][0].plot(us, [r["p99_ms"] for _, r in pts], style, alpha=0.4,
                            label=f"{server} p99")  # fmt: skip
            axes[i][1].plot(us, [r["rps"] for _, r in pts], style, label=server)
        axes[i][0].set(title=f"{ep}: latency", xlabel="concurrent users", ylabel="ms",
                       xscale="log", yscale="log")  # fmt: skip
        axes[i][1].set(title=f"{ep}: throughput", xlabel="concurrent users", ylabel="req/s",
                       xscale="log")  # fmt: skip
        users = sorted({r["users"] for r in rows})
        for ax in axes[i]:
            ax.set_xticks(users, [str(u) for u in users])
            ax.minorticks_off()
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_payload_file(path: Path, endpoints: list[str]) -> str:
    """The text of a payload file holding a non-empty list of requests for each of
    `endpoints`; ValueError (one line) for a file that does not."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"--payload-file: cannot read {path}: {e.strerror or e}") from None
    try:
        payloads = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--payload-file: {path} is not JSON ({e.msg})") from None
    if not isinstance(payloads, dict):
        raise ValueError(f"--payload-file: {path} is not a JSON object of endpoint lists")
    missing = [e for e in endpoints if not isinstance(payloads.get(e), list) or not payloads[e]]
    if missing:
        raise ValueError(f"--payload-file: {path} has no requests for {', '.join(missing)}")
    return text


def _error(msg: str) -> int:
    print(f"loadtest: error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--yan", default=str(ROOT / "weights" / "yan-tiny-kjv"))
    p.add_argument("--ar", default=str(ROOT / "weights" / "ar-tiny-kjv"))
    p.add_argument("--servers", default="yan,ar", help="which of yan,ar to run")
    p.add_argument(
        "--endpoints",
        default="complete,infill,infill-full,qa,classify",
        help=f"from {','.join(USER_CLASS)}; infill-full: AR regenerates the passage",
    )
    p.add_argument("--users", type=positive_int_list, default=[1, 4, 16, 64],
                   help="concurrency levels, comma-separated (default 1,4,16,64)")  # fmt: skip
    p.add_argument("--duration", type=positive_int, default=20, help="seconds per point")
    p.add_argument("--max-tokens", type=positive_int, default=128,
                   help="complete: tokens per request")  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=3, help="YAN Euler time points")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=count_int, default=0, help="server torch threads (0: default)")
    p.add_argument("--data", default=str(ROOT / "data" / "kjv"))
    p.add_argument("--payloads", type=positive_int, default=200,
                   help="distinct requests per endpoint")  # fmt: skip
    p.add_argument(
        "--infill-words",
        type=count_int,
        default=0,
        help="infill passages of this many words (consecutive verses; 0: one verse)",
    )
    p.add_argument("--out", help="results directory (default loadtests/results/<date>-<device>)")
    p.add_argument(
        "--client",
        choices=("auto", "locust", "builtin"),
        default="auto",
        help="load generator: Locust, or the standard-library client (auto: Locust if on PATH)",
    )
    p.add_argument(
        "--payload-file",
        help="requests from this JSON file (a run's payloads.json; loadtests/payloads-kjv-test.json"
        " is the default run's) instead of building them from --data: --payloads, --max-tokens,"
        " --steps and --infill-words then do not apply",
    )
    args = p.parse_args(argv)
    client = args.client
    if client == "auto":
        client = "locust" if shutil.which("locust") else "builtin"
    servers = {"yan": Path(args.yan), "ar": Path(args.ar)}
    chosen = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in chosen:
        if s not in servers:
            p.error(f"unknown server {s!r}")
        if not (servers[s] / "config.json").exists():
            return _error(f"{servers[s]} is not a checkpoint ({s}); see README")
    if not chosen:
        p.error("--servers: name yan, ar or both")
    endpoints = [e.strip() for e in args.endpoints.split(",")]
    bad = [e for e in endpoints if e not in USER_CLASS]
    if bad:
        p.error(f"unknown endpoint {bad[0]!r}; choose from {', '.join(USER_CLASS)}")
    users = args.users
    # Everything a run can be refused for is checked before anything is written or started.
    from yan_serve.device import resolve_device

    try:
        resolve_device(args.device)  # the servers would each exit with this
    except ValueError as e:
        return _error(str(e))
    try:
        if args.payload_file:
            payloads = read_payload_file(Path(args.payload_file), endpoints)
        else:
            payloads = json.dumps(build_payloads(Path(args.data), args.payloads,
                                                 args.max_tokens, args.steps, 0,
                                                 args.infill_words))  # fmt: skip
    except (ValueError, OSError) as e:
        return _error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    dev = device_name(args.device)
    out = Path(args.out or ROOT / "loadtests" / "results" / f"{dt.date.today()}-{dev}")
    if out.exists() and not out.is_dir():
        return _error(f"--out: {out} is not a directory")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    payload_file = out / "payloads.json"
    payload_file.write_text(payloads)
    rows = []
    total = len(chosen) * len(endpoints) * len(users)
    k = 0
    t0 = time.time()
    for server in chosen:
        try:
            proc, url = start_server(servers[server], args.device, args.threads, [])
        except (RuntimeError, TimeoutError) as e:  # the server's own last line says why
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            print(f"loadtest: error: {lines[0] if len(lines) == 1 else lines[-1]}",
                  file=sys.stderr)  # fmt: skip
            return 1
        log(f"{server} server ready at {url} ({servers[server]})")
        try:
            for ep in endpoints:
                for u in users:
                    k += 1
                    load = run_locust if client == "locust" else run_builtin
                    r = load(url, ep, u, args.duration, out / "raw" / f"{server}_{ep}_u{u}",
                             payload_file)  # fmt: skip
                    rows.append({"server": server, "endpoint": ep, "users": u, **r})
                    log(f"[{k}/{total}] {server} {ep} users={u}: p50 {r['p50_ms']:.0f} ms, "
                        f"p99 {r['p99_ms']:.0f} ms, {r['rps']:.1f} req/s, "
                        f"{r['failures']} failures ({time.time() - t0:.0f} s elapsed)")  # fmt: skip
        finally:
            code = stop_server(proc)
            log(f"{server} server stopped (exit {code})")
    import subprocess as sp

    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                    cwd=ROOT).stdout.strip() or "unknown"  # fmt: skip
    meta = {"date": str(dt.date.today()), "device": dev, "commit": commit, "client": client,
            "duration_s": args.duration, "steps": args.steps, "max_tokens": args.max_tokens,
            "command": "python loadtests/run.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    write_report(rows, out, meta)
    print((out / "results.md").read_text())
    fails = sum(r["failures"] for r in rows)
    log(f"wrote {out}/results.md, results.png and raw/ ({fails} failed requests in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
