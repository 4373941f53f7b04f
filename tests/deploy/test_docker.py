"""The CPU image, for real: build it with Docker, run it as its non-root user, wait for its
HEALTHCHECK, ask /v1/infill, and `docker stop` it in the middle of work (it must drain and exit 0).

Marked `docker` and left out of the default run (pyproject's addopts: `-m "not docker"`); it takes
minutes. Run it before a change to the Dockerfile, scripts/install.sh or the dependencies:

    python -m pytest -m docker -s tests/deploy/test_docker.py

It skips when no Docker engine answers. Where no image registry is reachable (docs/deploy.md,
"Building without a registry") the base is made by scripts/docker_base.sh and build and container
use `--network host`. Settings, all optional:
  YAN_DOCKER              the docker CLI (default: the first one here that builds with BuildKit)
  YAN_DOCKER_BASE         a base image for CPU_IMAGE instead of scripts/docker_base.sh's
  YAN_DOCKER_TORCH_INDEX  the CPU torch index; by default a local torch CPU wheel for the base's
                          Python (in YAN_DOCKER_WHEELS or pip's find-links) is served on
                          127.0.0.1, else the Dockerfile's CPU_TORCH_INDEX is used
  YAN_DOCKER_NO_CACHE=1   build with --no-cache (a cold build time)
  YAN_DOCKER_PORT         the server's port. By default a free one: --network host shares this
                          machine's ports, so the test runs the image's CMD and HEALTHCHECK with
                          only their port 8000 changed; YAN_DOCKER_PORT=8000 runs them unchanged
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.common import ROOT, dockerfile_instructions, image
from yan_serve.server.settings import default_model_dir

pytestmark = pytest.mark.docker

IMAGE = "yan-serve:cpu-test"
CONTAINER = "yan-serve-docker-test"
PORT = 8000  # the image's CMD and HEALTHCHECK port
INFILL = {"text": "And God said, Let there be [MASK]: and there was light.", "seed": 0}
QA = {
    "context": " ".join(f"Person{i} went to the kitchen." for i in range(9)),
    "question": "Where is Person3?",
    "max_tokens": 8,
    "n": 4,
}


def run(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_BUILDKIT": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


# ------------------------------------------------------------------------------ the engine
def cli_candidates() -> list[str]:
    if os.environ.get("YAN_DOCKER"):
        return [os.environ["YAN_DOCKER"]]
    out: list[str] = []
    for c in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if c and os.access(c, os.X_OK) and all(not os.path.samefile(c, o) for o in out):
            out.append(c)
    return out


def engine_answers(cli: str) -> bool:
    try:
        r = run([cli, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def builds_with_buildkit(cli: str) -> bool:
    """The Dockerfile needs BuildKit (RUN --mount): a CLI with the buildx plugin, or one older
    than 23.0, which talks to the engine's BuildKit itself when DOCKER_BUILDKIT=1."""
    if run([cli, "buildx", "version"]).returncode == 0:
        return True
    version = run([cli, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
    m = re.match(r"(\d+)\.", version)
    return bool(m) and int(m.group(1)) < 23


@pytest.fixture(scope="module")
def docker() -> str:
    answering = [c for c in cli_candidates() if engine_answers(c)]
    if not answering:
        pytest.skip(
            "no Docker engine answers `docker info` (start one: docs/deploy.md, "
            "'Building without a registry')"
        )
    for cli in answering:
        if builds_with_buildkit(cli):
            return cli
    pytest.fail(
        f"no docker CLI here builds with BuildKit ({answering}): install the buildx plugin, "
        "or set YAN_DOCKER to a CLI older than 23.0"
    )


# ------------------------------------------------------------------------ build inputs
@pytest.fixture(scope="module")
def base(docker: str) -> str:
    if os.environ.get("YAN_DOCKER_BASE"):
        return os.environ["YAN_DOCKER_BASE"]
    script = ROOT / "scripts/docker_base.sh"
    r = run(["bash", str(script)], timeout=1800, env={"DOCKER": docker})
    assert r.returncode == 0, f"{script.name} failed:\n{tail(r.stderr)}"
    return r.stdout.split()[-1]


def server_arg(name: str) -> str:
    """The default of an ARG of the Dockerfile's server stage."""
    for i in dockerfile_instructions():
        if i.op == "ARG" and i.value.startswith(f"{name}="):
            return i.value.partition("=")[2].strip("'\"")
    raise AssertionError(f"the Dockerfile has no ARG {name}=...")


def wheel_dirs() -> list[Path]:
    raw = [os.environ.get("YAN_DOCKER_WHEELS", ""), os.environ.get("PIP_FIND_LINKS", "")]
    r = run([sys.executable, "-m", "pip", "config", "list"])
    raw += re.findall(r"find-links='([^']*)'", r.stdout)
    dirs: list[Path] = []
    for path in " ".join(raw).split():
        p = Path(path.removeprefix("file://"))
        if p.is_dir() and p not in dirs:
            dirs.append(p)
    return dirs


def local_torch_wheel(docker: str, base: str) -> Path | None:
    """A torch CPU wheel of the Dockerfile's TORCH_VERSION for the base image's Python."""
    r = run([docker, "run", "--rm", "--network", "host", "--entrypoint", "python3", base, "-c",
             "import sys; print('cp%d%d' % sys.version_info[:2])"])  # fmt: skip
    assert r.returncode == 0, f"{base} has no python3:\n{r.stderr}"
    cp, version, arch = r.stdout.strip(), server_arg("TORCH_VERSION"), platform.machine()
    for d in wheel_dirs():
        hits = sorted(d.glob(f"torch-{version}+cpu-{cp}-{cp}-*linux*_{arch}.whl"))
        if hits:
            return hits[-1]
    return None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture(scope="module")
def torch_index(docker: str, base: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CPU torch index the build installs from. A local wheel is served as a one-package
    index on 127.0.0.1, which the build reaches through --network host."""
    if os.environ.get("YAN_DOCKER_TORCH_INDEX"):
        yield os.environ["YAN_DOCKER_TORCH_INDEX"]
        return
    wheel = local_torch_wheel(docker, base)
    if wheel is None:
        yield image().global_args["CPU_TORCH_INDEX"]
        return
    root = tmp_path_factory.mktemp("torch-index")
    (root / "torch").mkdir()
    (root / "torch" / wheel.name).symlink_to(wheel)
    handler = functools.partial(QuietHandler, directory=str(root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"\ndocker test: serving {wheel} as the CPU torch index")
        yield f"http://127.0.0.1:{server.server_address[1]}/"
        server.shutdown()


@pytest.fixture(scope="module")
def built(docker: str, base: str, torch_index: str, tmp_path_factory) -> dict:
    log = tmp_path_factory.mktemp("docker-build") / "build.log"
    cmd = [docker, "build", "--network", "host", "--progress", "plain",
           "--build-arg", "VARIANT=cpu", "--build-arg", f"CPU_IMAGE={base}",
           "--build-arg", f"CPU_TORCH_INDEX={torch_index}", "-t", IMAGE, str(ROOT)]  # fmt: skip
    if os.environ.get("YAN_DOCKER_NO_CACHE") == "1":
        cmd.insert(2, "--no-cache")
    old = run([docker, "image", "inspect", "-f", "{{.Id}}", IMAGE]).stdout.strip()
    start = time.monotonic()
    r = run(cmd, timeout=2400)
    seconds = time.monotonic() - start
    log.write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"{' '.join(cmd)} failed (log: {log}):\n{tail(r.stdout + r.stderr)}"
    new, size = run([docker, "image", "inspect", "-f", "{{.Id}} {{.Size}}", IMAGE]).stdout.split()
    if old and old != new:  # the previous build, now untagged (GBs each with the vfs driver)
        run([docker, "image", "rm", old])
    size = int(size)
    print(
        f"\ndocker test: built {IMAGE} on {base} in {seconds:.0f} s, {size / 1e6:.0f} MB, log {log}"
    )
    return {"build_s": seconds, "size": size}


# ------------------------------------------------------------------------- the container
def inspect(docker: str, what: str, fmt: str = "{{json .State}}"):
    r = run([docker, "inspect", "-f", fmt, what])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logs(docker: str) -> str:
    r = run([docker, "logs", CONTAINER])
    return r.stdout + r.stderr


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_port(docker: str, port: int) -> list[str]:
    """`docker run` arguments that start the image on `port`: its own CMD and HEALTHCHECK
    command with 8000 replaced, nothing else changed (interval, retries: the image's)."""
    if port == PORT:
        return [IMAGE]
    cfg = inspect(docker, IMAGE, "{{json .Config}}")
    cmd = cfg["Cmd"]
    i = cmd.index("--port")
    assert cmd[i + 1] == str(PORT), cmd
    test = cfg["Healthcheck"]["Test"]
    assert test[0] == "CMD", test
    probe = shlex.join(test[1:])
    moved = probe.replace(f"127.0.0.1:{PORT}/", f"127.0.0.1:{port}/")
    assert moved != probe, f"the HEALTHCHECK does not probe 127.0.0.1:{PORT}: {probe}"
    return ["--health-cmd", moved, IMAGE, *cmd[: i + 1], str(port), *cmd[i + 2 :]]


@pytest.fixture(scope="module")
def container(docker: str, built: dict) -> Iterator[dict]:
    """The image started as it ships (its ENTRYPOINT, CMD and user), with Kubernetes' container
    restrictions (no capabilities, no privilege escalation) and one job per batch, so the drain
    test can keep the server busy."""
    run([docker, "rm", "-f", CONTAINER])
    port = int(os.environ.get("YAN_DOCKER_PORT") or free_port())
    assert port_free(port), f"port {port} is in use here (the container uses --network host)"
    r = run([docker, "run", "-d", "--name", CONTAINER, "--network", "host",
             "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
             "-e", "YAN_SERVE_MAX_BATCH_SIZE=1", *on_port(docker, port)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    try:
        start = time.monotonic()
        while True:
            state = inspect(docker, CONTAINER)
            health = (state.get("Health") or {}).get("Status")
            if not state["Running"] or health == "unhealthy":
                pytest.fail(f"container {state['Status']}, health {health}:\n{tail(logs(docker))}")
            if health == "healthy":
                break
            assert time.monotonic() - start < 240, f"not healthy in 240 s:\n{tail(logs(docker))}"
            time.sleep(1)
        healthy_s = time.monotonic() - start
        print(f"\ndocker test: HEALTHCHECK healthy {healthy_s:.0f} s after start, port {port}")
        yield {"healthy_s": healthy_s, "url": f"http://127.0.0.1:{port}"}
    finally:
        run([docker, "rm", "-f", CONTAINER])


def wait_ready(url: str, timeout: float = 60) -> None:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"/ready not 200 within {timeout} s")


def test_runs_as_the_images_non_root_user(docker: str, container: dict) -> None:
    user = inspect(docker, IMAGE, "{{json .Config.User}}")
    assert user == "10001:10001", user
    status = run([docker, "exec", CONTAINER, "cat", "/proc/1/status"]).stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
    assert set(uids) == {"10001"} and set(gids) == {"10001"}, (uids, gids)
    cmdline = run([docker, "exec", CONTAINER, "cat", "/proc/1/cmdline"]).stdout.split("\0")
    assert any(a.endswith("/yan-serve") for a in cmdline[:2]), f"PID 1 is {cmdline}, not yan-serve"


def test_answers_infill(container: dict) -> None:
    import httpx

    wait_ready(container["url"])
    r = httpx.post(container["url"] + "/v1/infill", json=INFILL, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["task"]) == (Path(default_model_dir()).name, "infill")
    # the known text comes back around the one filled gap (the space before it is the fill's)
    before, after = INFILL["text"].split("[MASK]")
    text = body["text"]
    assert text.startswith(before.rstrip()) and text.endswith(after), text
    (fill,) = body["fills"]
    assert fill.strip() and fill.strip() in text[len(before.rstrip()) : len(text) - len(after)]
    assert body["usage"]["prompt_tokens"] > 0 and body["steps"] >= 1
    print(f"\ndocker test: /v1/infill -> {body['text']!r}")


def test_docker_stop_drains_in_flight_work_and_exits_0(docker: str, container: dict) -> None:
    import httpx

    wait_ready(container["url"])

    async def scenario() -> tuple[list[int], list[int], float]:
        async with httpx.AsyncClient(base_url=container["url"], timeout=120) as c:
            tasks = [asyncio.create_task(c.post("/v1/qa", json={**QA, "seed": i}))
                     for i in range(24)]  # fmt: skip
            while True:  # 96 single-job batches: wait until the server has queued work
                m = (await c.get("/metrics")).text
                if float(m.split("\nyan:queue_depth ")[1].split()[0]) >= 5:
                    break
                await asyncio.sleep(0.01)
            start = time.monotonic()
            stop = await asyncio.create_subprocess_exec(docker, "stop", "-t", "40", CONTAINER)
            while (await c.get("/ready")).status_code != 503:  # the drain has begun
                assert time.monotonic() - start < 20, "/ready never turned 503 after docker stop"
                await asyncio.sleep(0.02)
            late = [(await c.post("/v1/qa", json=QA)).status_code]
            done = [r.status_code for r in await asyncio.gather(*tasks)]
            assert await stop.wait() == 0
            return done, late, time.monotonic() - start

    done, late, stop_s = asyncio.run(scenario())
    state = inspect(docker, CONTAINER)
    out = logs(docker)
    print(f"\ndocker test: docker stop took {stop_s:.1f} s, exit code {state['ExitCode']}")
    assert done == [200] * 24, done
    assert late == [503], late
    assert not state["Running"] and not state["OOMKilled"]
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']}:\n{tail(out)}"
    assert stop_s < 40, "docker stop waited its whole timeout (SIGKILL)"
    assert "signal SIGTERM: draining" in out, tail(out)
    assert "Finished server process" in out, tail(out)
    assert "shutdown timeout" not in out, tail(out)
