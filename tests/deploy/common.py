"""Readers for the deployment files (Dockerfile, .dockerignore, compose, Kubernetes manifests) and
the server facts they are checked against: the flags of `yan-serve`'s real parser, its
`YAN_SERVE_*` variables, the app's routes and the metric names. Nothing here is a copy of the
server's flag list: everything comes from `yan_serve` itself."""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"


# --------------------------------------------------------------------------------- YAML
class Tagged:
    """A Compose merge tag (`!reset`, `!override`) and the value under it."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    pass


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(node.tag, value)


for _tag in ("!reset", "!override"):
    _Loader.add_constructor(_tag, _tagged)


def load_yaml(path: Path) -> Any:
    """One YAML document; Compose's `!reset`/`!override` tags load as `Tagged`."""
    return yaml.load(path.read_text(), Loader=_Loader)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/k8s (kustomization files and Helm values excluded)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name.endswith("-values.yaml"):
            continue
        out.extend((path, doc) for doc in load_all(path))
    return out


def k8s_objects(kind: str, path: Path | None = None) -> list[dict]:
    return [d for p, d in k8s_docs() if d["kind"] == kind and (path is None or p == path)]


def k8s_object(kind: str, path: Path) -> dict:
    objs = k8s_objects(kind, path)
    assert len(objs) == 1, f"{path.relative_to(ROOT)}: expected one {kind}, found {len(objs)}"
    return objs[0]


def compose_merge(base: Any, over: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge, sequences append, `command`,
    `entrypoint` and `healthcheck.test` are replaced, `!reset` removes, `!override` replaces."""
    if isinstance(over, Tagged):
        return None if over.tag == "!reset" else over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            merged = compose_merge(base.get(k), v, k) if k in base else compose_merge(None, v, k)
            if merged is None and isinstance(v, Tagged):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    replaced = key in ("command", "entrypoint", "test")
    if isinstance(base, list) and isinstance(over, list) and not replaced:
        return base + over
    return over


# ---------------------------------------------------------------------------- Dockerfile
@dataclass
class Instruction:
    op: str  # upper case
    value: str
    line: int
    stage: int  # index of the FROM it belongs to (-1: before the first FROM)


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start, stage = "", 0, -1
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, value = buf.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        out.append(Instruction(op, value.strip(), start, stage))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT, or None for shell form."""
    if not value.startswith("["):
        return None
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def _key_values(value: str) -> dict[str, str]:
    out = {}
    for tok in shlex.split(value):
        k, sep, v = tok.partition("=")
        assert sep, f"ENV/ARG item without '=': {tok!r} (use the KEY=VALUE form)"
        out[k] = v
    return out


@dataclass
class Image:
    """The final stage of the Dockerfile, as a container runtime sees it."""

    global_args: dict[str, str]
    stages: list[tuple[str, str]]  # (base image as written, alias)
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str
    workdir: str
    expose: list[int]
    healthcheck: list[str] | None
    instructions: list[Instruction] = field(repr=False)

    def resolve(self, text: str) -> str:
        return re.sub(
            r"\$\{(\w+)\}|\$(\w+)",
            lambda m: self.global_args.get(m.group(1) or m.group(2), m.group(0)),
            text,
        )

    def final_chain(self) -> list[int]:
        """Stage indices the final stage is built on, base first."""
        aliases = {alias: i for i, (_, alias) in enumerate(self.stages) if alias}
        chain, i = [], len(self.stages) - 1
        while True:
            chain.append(i)
            base = self.resolve(self.stages[i][0])
            if base not in aliases:
                return chain[::-1]
            i = aliases[base]


@cache
def image(**build_args: str) -> Image:
    """The final stage, for the Dockerfile's default build arguments updated by `build_args`."""
    ins = dockerfile_instructions()
    global_args = {}
    stages: list[tuple[str, str]] = []
    for i in ins:
        if i.op == "ARG" and i.stage == -1:
            global_args.update(_key_values(i.value))
        if i.op == "FROM":
            parts = i.value.split()
            parts = [p for p in parts if not p.startswith("--")]
            alias = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append((parts[0], alias))
    unknown = set(build_args) - set(global_args)
    assert not unknown, f"the Dockerfile declares no build argument {unknown} before FROM"
    global_args.update(build_args)
    img = Image(global_args, stages, [], [], {}, "root", "/", [], None, ins)
    chain = img.final_chain()
    for i in ins:
        if i.stage not in chain:
            continue
        if i.op == "ENV":
            img.env.update(_key_values(i.value))
        elif i.op == "USER":
            img.user = i.value
        elif i.op == "WORKDIR":
            img.workdir = i.value if i.value.startswith("/") else f"{img.workdir}/{i.value}"
        elif i.op == "EXPOSE":
            img.expose += [int(p.split("/")[0]) for p in i.value.split()]
        elif i.op == "ENTRYPOINT":
            img.entrypoint = exec_form(i.value) or ["/bin/sh", "-c", i.value]
            img.cmd = []  # an ENTRYPOINT resets an inherited CMD
        elif i.op == "CMD":
            img.cmd = exec_form(i.value) or ["/bin/sh", "-c", i.value]
        elif i.op == "HEALTHCHECK":
            _, _, rest = i.value.partition("CMD ")
            img.healthcheck = exec_form(rest.strip()) if rest else None
    return img


# -------------------------------------------------------------------------- .dockerignore
def _glob_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore globs: `*` and `?` stay within a path segment, `**` spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(rel: str, path: Path = ROOT / ".dockerignore") -> bool:
    """Whether Docker leaves `rel` (a path relative to the context root) out of the context: the
    last matching pattern wins, a pattern matching a directory covers what is under it."""
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in path.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = _glob_regex(os.path.normpath(pat))
        if any(rx.match(p) for p in prefixes):
            excluded = not negate
    return excluded


# ------------------------------------------------------------------------ server facts
@cache
def server_option_strings() -> frozenset[str]:
    from yan_serve.server.settings import build_parser

    return frozenset(s for a in build_parser()._actions for s in a.option_strings)


@cache
def server_env_names() -> frozenset[str]:
    from yan_serve.server.settings import ENV_PREFIX, Settings

    return frozenset(ENV_PREFIX + f.name.upper() for f in fields(Settings))


def flags_in(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


@contextmanager
def server_environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ with the runner's own YAN_SERVE_* variables replaced by `env`."""
    saved = dict(os.environ)
    try:
        for k in [k for k in os.environ if k.startswith("YAN_SERVE_")]:
            del os.environ[k]
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def server_settings(argv: list[str], env: dict[str, str], where: str):
    """The Settings `yan-serve ARGV` would run with under ENV, through the server's own parser
    and validation. Fails on a flag or variable the server does not define (argparse would
    accept an abbreviation; a manifest should not rely on that)."""
    from yan_serve.server.settings import parse_settings

    unknown = [f for f in flags_in(argv) if f not in server_option_strings()]
    assert not unknown, f"{where}: yan-serve has no flag {unknown}"
    bad_env = sorted(k for k in env if k.startswith("YAN_SERVE_") and k not in server_env_names())
    assert not bad_env, f"{where}: yan-serve reads no variable {bad_env}"
    with server_environment({k: v for k, v in env.items() if k.startswith("YAN_SERVE_")}):
        try:
            return parse_settings(argv)
        except SystemExit as e:  # argparse error
            raise AssertionError(f"{where}: yan-serve rejects {argv}: exit {e.code}") from None
        except ValueError as e:
            raise AssertionError(f"{where}: yan-serve rejects {argv} / {env}: {e}") from None


def container_argv(command: list[str] | None, args: list[str] | None) -> list[str]:
    """The process a container runs: Kubernetes `command`/`args` (Compose `entrypoint`/
    `command`) over the image's ENTRYPOINT/CMD."""
    img = image()
    entry = list(command) if command is not None else img.entrypoint
    rest = list(args) if args is not None else ([] if command is not None else img.cmd)
    return [str(x) for x in entry + rest]


def serve_settings(argv: list[str], env: dict[str, str], where: str):
    assert argv[:1] == ["yan-serve"], f"{where}: starts {argv[:1]}, not the yan-serve entry point"
    return server_settings(argv[1:], {**image().env, **env}, where)


@cache
def app_routes() -> frozenset[str]:
    """Paths of the FastAPI app (built without loading weights)."""
    from yan_serve.server.app import create_app
    from yan_serve.server.settings import Settings

    app = create_app(Settings(), load_in_background=True)
    return frozenset(getattr(r, "path", "") for r in app.routes)


@cache
def metric_series() -> dict[str, frozenset[str]]:
    """Every sample name the server exports under `yan:` and its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from yan_serve.server.metrics import Metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    out: dict[str, frozenset[str]] = {}
    for m in vars(Metrics()).values():
        if not isinstance(m, MetricWrapperBase):
            continue
        labels = frozenset(m._labelnames)
        for suffix in suffixes[m._type]:
            extra = {"le"} if suffix == "_bucket" else set()
            out[m._name + suffix] = labels | extra
    assert out, "no metrics found on yan_serve.server.metrics.Metrics"
    return out


def url_port_path(text: str) -> tuple[int, str]:
    m = re.search(r"https?://[\w.\-]+:(\d+)(/[\w/\-.]*)", text)
    assert m, f"no http://host:port/path in {text!r}"
    return int(m.group(1)), m.group(2)


def duration_seconds(text: str | int | float) -> float:
    """Compose durations: '40s', '1m30s', '1h', or a number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(a) * unit[b] for a, b in parts)
