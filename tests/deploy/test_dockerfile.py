"""The Dockerfile: pinned bases, non-root, exec-form start through `yan-serve`, the install path CI
uses, a health check on a real route, apt hygiene, and a build context that holds what the
build copies. Also runs hadolint when it is installed (CI installs it; see .ci/run)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.common import (
    DOCKERFILE,
    ROOT,
    app_routes,
    dockerfile_instructions,
    dockerignore_excludes,
    exec_form,
    image,
    serve_settings,
    url_port_path,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

VARIANTS = ("cuda", "cpu")


def final_stage_ops(op: str) -> list:
    img = image()
    chain = img.final_chain()
    return [i for i in img.instructions if i.op == op and i.stage in chain]


def test_base_images_are_pinned() -> None:
    img = image()
    aliases = {alias for _, alias in img.stages if alias}
    for base, _ in img.stages:
        resolved = img.resolve(base)
        if resolved in aliases or "$" in resolved:
            continue  # an earlier stage (checked on its own) or a stage picked by VARIANT
        name = resolved.split("@")[0]
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert "@sha256:" in resolved or tag, f"FROM {base} ({resolved}) has no tag"
        assert tag != "latest", f"FROM {base} ({resolved}) uses :latest"


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_builds_on_a_pinned_stage(variant: str) -> None:
    img = image(VARIANT=variant)
    chain = img.final_chain()
    assert len(chain) >= 2, f"VARIANT={variant}: the server stage must build on a base stage"
    base_stage = img.stages[chain[0]]
    assert base_stage[1] == f"base-{variant}", base_stage
    assert ":" in img.resolve(base_stage[0]), base_stage
    # each base says where torch comes from (scripts/install.sh reads TORCH_INDEX_URL)
    index = img.resolve(img.env.get("TORCH_INDEX_URL", ""))
    assert index.startswith("https://"), f"VARIANT={variant}: TORCH_INDEX_URL={index!r}"
    assert ("cpu" in index) == (variant == "cpu"), index


def test_runs_as_a_numeric_non_root_user() -> None:
    img = image()
    uid, _, gid = img.user.partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {img.user}: not a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) > 0), f"USER {img.user}: root group"
    # USER comes before the start command, and the uid is created in the image
    users = final_stage_ops("USER")
    starts = final_stage_ops("ENTRYPOINT") + final_stage_ops("CMD")
    assert users and starts and users[-1].line < min(s.line for s in starts)
    created = " ".join(i.value for i in final_stage_ops("RUN"))
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), f"no useradd --uid {uid}"


def test_starts_yan_serve_in_exec_form() -> None:
    for ins in final_stage_ops("ENTRYPOINT") + final_stage_ops("CMD"):
        assert exec_form(ins.value) is not None, f"line {ins.line}: {ins.op} in shell form"
    img = image()
    assert img.entrypoint == ["yan-serve"], img.entrypoint
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("yan-serve") == "yan_serve.server.main:main", scripts


def test_start_command_uses_real_flags_and_binds_all_interfaces() -> None:
    img = image()
    s = serve_settings(img.entrypoint + img.cmd, {}, "Dockerfile CMD")
    assert s.host == "0.0.0.0", "the server must bind all interfaces inside a container"
    assert img.expose == [s.port], f"EXPOSE {img.expose} but the server listens on {s.port}"
    # overriding CMD (e.g. `docker run IMAGE --model /m`) must not fall back to 127.0.0.1
    assert serve_settings(img.entrypoint, {}, "ENTRYPOINT alone").host == "0.0.0.0"


def test_healthcheck_probes_liveness_on_the_served_port() -> None:
    img = image()
    assert img.healthcheck, "HEALTHCHECK CMD [...] (exec form) missing"
    port, path = url_port_path(" ".join(img.healthcheck))
    assert path == "/health", "the image's health check is liveness (/health)"
    assert path in app_routes()
    assert port == serve_settings(img.entrypoint + img.cmd, {}, "CMD").port
    assert img.healthcheck[0] in ("python3", "python"), "the check needs a tool the image has"


def test_installs_through_scripts_install_sh() -> None:
    runs = final_stage_ops("RUN")
    installs = [r for r in runs if re.search(r"\bbash scripts/install\.sh\b", r.value)]
    assert len(installs) == 1, "one RUN must install through `bash scripts/install.sh`"
    for r in dockerfile_instructions():
        if r.op == "RUN":
            assert not re.search(r"\bpip3?\s+install\b|-m pip install", r.value), (
                f"line {r.line}: pip install outside scripts/install.sh"
            )
    # the same script CI runs
    assert re.search(r"^bash scripts/install\.sh", (ROOT / ".ci/run").read_text(), re.M)
    # what the script needs is copied in before it runs, from paths the context keeps
    copies = [c for c in final_stage_ops("COPY") if c.line < installs[0].line]
    sources = {src.rstrip("/") for c in copies for src in c.value.split()[:-1]}
    for needed in ("pyproject.toml", "README.md", "scripts/install.sh", "yan_serve"):
        assert needed in sources, f"{needed} is not copied before the install"
    # EXTRAS is empty (the package alone) or extras pyproject defines, by default
    m = re.search(r"\bEXTRAS=(\S*)", installs[0].value)
    assert m, "set EXTRAS for the image install (the script's default is the dev extra)"
    extras = m.group(1).strip("'\"")
    if extras in ("$EXTRAS", "${EXTRAS}"):
        (arg,) = [a for a in final_stage_ops("ARG") if a.value.startswith("EXTRAS=")]
        assert arg.line < installs[0].line
        extras = arg.value.partition("=")[2].strip("'\"")
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert all(e in defined for e in filter(None, extras.split(","))), extras


def _fake_python(tmp_path: Path) -> Path:
    """A `python` that records each call and succeeds (torch counts as installed); asked for
    the GPU image's Triton version, it answers 0.0.0-test."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n'
                    'case "$*" in *GPU_IMAGE_TRITON*) echo 0.0.0-test;; esac\n')  # fmt: skip
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return fake


@pytest.mark.parametrize(
    ("extras", "spec"), [(None, "-e .[dev]"), ("", "-e ."), ("test", "-e .[test]")]
)
def test_install_script_extras(tmp_path: Path, extras: str | None, spec: str) -> None:
    """Unset EXTRAS keeps CI's default (dev); an empty one, as the Dockerfile sets it, installs
    the package alone (pip rejects `.[]`). With test extras the GPU image's Triton goes into
    its own folder for the compile guard, without dependencies."""
    env = {k: v for k, v in os.environ.items() if k != "EXTRAS"}
    env["PYTHON"] = str(_fake_python(tmp_path))
    if extras is not None:
        env["EXTRAS"] = extras
    subprocess.run(["bash", str(ROOT / "scripts/install.sh")], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    pip = [c for c in (tmp_path / "calls").read_text().splitlines() if "pip install" in c]
    assert pip[0].endswith(f"pip install --disable-pip-version-check -q {spec}")
    triton = "--no-deps --target .cache/triton-0.0.0-test triton==0.0.0-test"
    assert [c.split(" -q ", 1)[1] for c in pip[1:]] == ([triton] if extras != "" else [])


def test_apt_get_hygiene() -> None:
    for r in dockerfile_instructions():
        if r.op != "RUN" or "apt-get install" not in r.value:
            continue
        where = f"Dockerfile line {r.line}"
        assert "--no-install-recommends" in r.value, f"{where}: apt-get without it"
        assert re.search(r"apt-get install\s+(-\S+\s+)*-y", r.value), f"{where}: no -y"
        assert r.value.index("apt-get update") < r.value.index("apt-get install"), where
        assert "rm -rf /var/lib/apt/lists/*" in r.value, f"{where}: apt lists left in the layer"


def test_checkpoint_baked_in_as_default_model() -> None:
    """The image copies weights/ and installs the package editable at WORKDIR, so the server's
    default --model (weights/yan-small-kjv next to the package) exists in the image."""
    from yan_serve.server.settings import default_model_dir

    img = image()
    rel = Path(default_model_dir()).relative_to(ROOT)
    assert (ROOT / rel / "config.json").is_file()
    copies = {c.value.split()[0].rstrip("/"): c.value.split()[-1] for c in final_stage_ops("COPY")}
    assert copies.get("weights") in ("weights/", "weights", f"{img.workdir}/weights/")
    assert copies.get("yan_serve") in ("yan_serve/", "yan_serve", f"{img.workdir}/yan_serve/")
    assert "pip_install -e" in (ROOT / "scripts/install.sh").read_text(), "editable install"


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "README.md",
        "scripts/install.sh",
        "yan_serve/server/main.py",
        "weights/yan-small-kjv/config.json",
        "weights/yan-small-kjv/model.safetensors",
        "weights/yan-small-kjv/tokenizer.json",
        "weights/yan-small-kjv/labels.json",
    ],
)
def test_build_context_keeps(path: str) -> None:
    assert (ROOT / path).exists(), path
    assert not dockerignore_excludes(path), f".dockerignore drops {path}, which the build needs"


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", "runs/x/model.safetensors", "data/kjv/train.jsonl", ".venv/bin/python",
     "yan_serve/__pycache__/app.cpython-311.pyc", "yan_serve.egg-info/PKG-INFO",
     ".pytest_cache/v", ".ruff_cache/x", ".hypothesis/examples/x", ".whl/x.whl"],
)  # fmt: skip
def test_build_context_drops(path: str) -> None:
    assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"


def test_every_copy_source_is_in_the_context() -> None:
    for c in dockerfile_instructions():
        if c.op != "COPY" or "--from=" in c.value:
            continue
        for src in c.value.split()[:-1]:
            assert (ROOT / src).exists(), f"line {c.line}: COPY {src}: no such path"
            assert not dockerignore_excludes(src), f"line {c.line}: {src} is in .dockerignore"


def test_hadolint_ignores_have_reasons() -> None:
    cfg_path = ROOT / ".hadolint.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    lines = cfg_path.read_text().splitlines()
    for rule in cfg.get("ignored", []):
        n = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert lines[n - 1].strip().startswith("#"), f"{rule} is ignored without a reason"
    inline = re.findall(r"#\s*hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert len(inline) <= 1, f"inline hadolint ignores: {inline}"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (.ci/run)")
def test_hadolint_passes() -> None:
    r = subprocess.run(["hadolint", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
