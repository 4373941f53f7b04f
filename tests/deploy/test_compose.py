"""deploy/compose.yaml (+ the CPU override), the Prometheus config and the Grafana provisioning,
checked against the Dockerfile and the server's parser, routes and metric names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.deploy.common import (
    DEPLOY,
    ROOT,
    app_routes,
    compose_merge,
    container_argv,
    duration_seconds,
    image,
    load_yaml,
    metric_series,
    serve_settings,
    url_port_path,
)

COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yaml"
SERVERS = ("yan", "ar")  # the YAN server and the AR baseline (issue #6)
# labels Prometheus attaches to every scraped series (static_configs add `model`)
TARGET_LABELS = {"job", "instance", "model"}


def compose(cpu: bool = False) -> dict:
    doc = load_yaml(COMPOSE)
    return compose_merge(doc, load_yaml(COMPOSE_CPU)) if cpu else doc


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def settings_of(service: dict, name: str):
    argv = container_argv(service.get("entrypoint"), service.get("command"))
    variant = service.get("build", {}).get("args", {}).get("VARIANT", "cuda")
    return serve_settings(argv, {**image(VARIANT=variant).env, **env_of(service)}, name)


def container_ports(service: dict) -> list[int]:
    out = []
    for p in service.get("ports", []):
        target = p["target"] if isinstance(p, dict) else str(p).rsplit(":", 1)[-1]
        out.append(int(str(target).split("/")[0]))
    return out


def volume_map(service: dict) -> dict[str, str]:
    """Mount target -> host source, for the bind mounts (./...)."""
    out = {}
    for v in service.get("volumes", []):
        src, target = v.split(":")[:2]
        if src.startswith("."):
            out[target] = src
    return out


@pytest.mark.parametrize("cpu", [False, True])
@pytest.mark.parametrize("name", SERVERS)
def test_server_command_line_is_valid(name: str, cpu: bool) -> None:
    svc = compose(cpu)["services"][name]
    s = settings_of(svc, f"compose {name}")
    assert s.host == "0.0.0.0"
    assert container_ports(svc) == [s.port], f"{name}: ports {svc.get('ports')} vs --port"
    assert s.device == ("cpu" if cpu else "cuda")


@pytest.mark.parametrize("name", SERVERS)
def test_server_builds_this_repository(name: str) -> None:
    svc = compose()["services"][name]
    build = svc["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile"
    variant = build["args"]["VARIANT"]
    assert f"base-{variant}" in {alias for _, alias in image().stages}
    assert svc["image"].endswith(f":{variant}"), "tag the image by variant"


def test_cpu_override_drops_the_gpu() -> None:
    for name in SERVERS:
        gpu, cpu = compose()["services"][name], compose(cpu=True)["services"][name]
        assert "deploy" in gpu and "deploy" not in cpu
        assert cpu["build"]["args"]["VARIANT"] == "cpu"
        assert cpu["image"] != gpu["image"]


@pytest.mark.parametrize("name", SERVERS)
def test_servers_reserve_a_gpu(name: str) -> None:
    devices = compose()["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


@pytest.mark.parametrize("name", SERVERS)
def test_stop_grace_period_covers_the_drain(name: str) -> None:
    svc = compose()["services"][name]
    s = settings_of(svc, name)
    grace = duration_seconds(svc["stop_grace_period"])
    assert grace > s.shutdown_timeout, f"{name}: SIGKILL at {grace}s cuts the drain short"
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("name", SERVERS)
def test_healthcheck_gates_on_readiness(name: str) -> None:
    svc = compose()["services"][name]
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD", "exec-form health check (no shell in the way)"
    port, path = url_port_path(" ".join(test))
    assert path == "/ready" and path in app_routes()
    assert port == settings_of(svc, name).port


def test_models() -> None:
    """yan serves the baked-in default checkpoint; ar serves weights/ar-tiny-kjv, shipped in the
    repository (so baked into the image) and started by default, not behind a profile."""
    from yan_serve.server.settings import default_model_dir
    from yan_serve.weights import is_ar_checkpoint

    services = compose()["services"]
    assert settings_of(services["yan"], "yan").model == default_model_dir()
    ar_model = settings_of(services["ar"], "ar").model
    assert ar_model == f"{image().workdir}/weights/ar-tiny-kjv"
    assert is_ar_checkpoint(ROOT / "weights/ar-tiny-kjv")
    assert (ROOT / "weights/ar-tiny-kjv/model.safetensors").is_file()
    assert "profiles" not in services["ar"] and "profiles" not in services["yan"]


def test_published_ports_are_distinct() -> None:
    published = []
    for svc in compose()["services"].values():
        published += [str(p).rsplit(":", 1)[0] for p in svc.get("ports", [])]
    assert len(published) == len(set(published)), published


# ---------------------------------------------------------------------------- Prometheus
def prometheus_config() -> tuple[dict, dict]:
    svc = compose()["services"]["prometheus"]
    flags = dict(a.lstrip("-").split("=", 1) for a in svc["command"] if "=" in a)
    config_path = flags.get("config.file", "/etc/prometheus/prometheus.yml")
    src = volume_map(svc).get(config_path)
    assert src, f"prometheus reads {config_path}, which no bind mount provides"
    return svc, load_yaml(COMPOSE.parent / src)


@pytest.mark.parametrize("name", SERVERS)
def test_prometheus_scrapes_each_server(name: str) -> None:
    _, cfg = prometheus_config()
    port = settings_of(compose()["services"][name], name).port
    jobs = [
        j
        for j in cfg["scrape_configs"]
        if any(f"{name}:{port}" in sc["targets"] for sc in j.get("static_configs", []))
    ]
    assert len(jobs) == 1, f"no scrape job targets {name}:{port}"
    path = jobs[0].get("metrics_path", "/metrics")
    assert path == "/metrics" and path in app_routes()
    assert jobs[0].get("scheme", "http") == "http"


def test_prometheus_targets_are_services() -> None:
    services = compose()["services"]
    _, cfg = prometheus_config()
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in services or host == "localhost", f"{job['job_name']}: {target}"


# ------------------------------------------------------------------------------- Grafana
def grafana() -> tuple[dict, dict[str, Path]]:
    svc = compose()["services"]["grafana"]
    return svc, {t: (COMPOSE.parent / s).resolve() for t, s in volume_map(svc).items()}


def provisioned(kind: str) -> list[dict]:
    """Grafana's provisioned `datasources` or `providers` (dashboards) entries."""
    prov = grafana()[1]["/etc/grafana/provisioning"]
    folder = "datasources" if kind == "datasources" else "dashboards"
    return [x for f in sorted((prov / folder).glob("*.yaml")) for x in load_yaml(f)[kind]]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    svc, mounts = grafana()
    sources = provisioned("datasources")
    prom = compose()["services"]["prometheus"]
    prom_port = int(str(prom["ports"][0]).rsplit(":", 1)[-1])
    assert [d["url"] for d in sources] == [f"http://prometheus:{prom_port}"]
    providers = provisioned("providers")
    assert providers
    for p in providers:
        assert p["options"]["path"] in mounts, f"dashboards path {p['options']['path']} unmounted"
    home = svc["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        target, _, fname = home.rpartition("/")
        assert (mounts[target] / fname).is_file(), home


def dashboards() -> list[dict]:
    _, mounts = grafana()
    files = sorted(mounts["/var/lib/grafana/dashboards"].glob("*.json"))
    assert files, "no dashboard JSON"
    return [json.loads(f.read_text()) for f in files]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_use_real_series_and_labels() -> None:
    series = metric_series()
    for dash in dashboards():
        for e in exprs(dash):
            names = re.findall(r"yan:[a-z_:]+", e)
            assert names, f"query without a yan: series: {e}"
            allowed = set(TARGET_LABELS)
            for n in names:
                assert n in series, f"{n} is not exported by yan_serve.server.metrics"
                allowed |= series[n]
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", e))
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", e):
                used |= {x.strip() for x in group.split(",") if x.strip()}
            assert used <= allowed, f"{e}: labels {used - allowed} do not exist"


def test_dashboard_charts_what_the_issue_asks() -> None:
    text = "\n".join(e for d in dashboards() for e in exprs(d))
    for q in ("0.5", "0.99"):
        latency = f"histogram_quantile({q}, sum by (le, job, endpoint) (rate(yan:request_latency"
        assert latency in text, f"p{q} latency by endpoint"
    assert re.search(r"sum by \([^)]*status[^)]*\) \(rate\(yan:requests_total", text)
    for series in ("yan:batch_size_", "yan:queue_depth", "yan:generated_tokens_total"):
        assert series in text, series


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    uids = {d["uid"] for d in provisioned("datasources")}
    for dash in dashboards():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), "panel ids repeat"
        for p in dash["panels"]:
            for obj in [p, *p.get("targets", [])]:
                ds = obj.get("datasource")
                assert ds is None or ds["uid"] in uids or ds["uid"].startswith("$"), p["title"]
