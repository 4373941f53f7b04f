"""deploy/k8s: the server Deployment, its Service, autoscalers, disruption budget and weights
volume, checked against each other, the Dockerfile and the server's parser and routes."""

from __future__ import annotations

import re

import pytest

from tests.deploy.common import (
    K8S,
    app_routes,
    container_argv,
    image,
    k8s_docs,
    k8s_object,
    k8s_objects,
    load_yaml,
    metric_series,
    serve_settings,
    server_env_names,
)

DEPLOYMENT = K8S / "deployment.yaml"
CUSTOM_HPA = K8S / "autoscaling/hpa-queue-depth.yaml"
ADAPTER = K8S / "autoscaling/prometheus-adapter-values.yaml"


def deployment() -> dict:
    return k8s_object("Deployment", DEPLOYMENT)


def pod(obj: dict | None = None) -> dict:
    return (obj or deployment())["spec"]["template"]


def server(obj: dict | None = None) -> dict:
    containers = pod(obj)["spec"]["containers"]
    assert len(containers) == 1, "one container per server pod"
    return containers[0]


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def settings(container: dict | None = None):
    c = container or server()
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"env repeats a name: {names}"
    bad = [n for n in names if n.startswith("YAN_SERVE_") and n not in server_env_names()]
    assert not bad, f"yan-serve reads no variable {bad}"
    argv = container_argv(c.get("command"), c.get("args"))
    return serve_settings(argv, env_values(c), f"container {c['name']}")


def container_port(container: dict, port: int | str) -> int:
    """A probe's/Service's port, by name or number, as the container's port number."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"no container port named {port!r}"
    return named[port]


def matches(selector: dict, labels: dict) -> bool:
    assert selector, "empty selector (selects everything)"
    return all(labels.get(k) == v for k, v in selector.items())


# -------------------------------------------------------------------------------- files
def test_every_manifest_parses_and_is_named() -> None:
    docs = k8s_docs()
    assert len(docs) >= 8
    seen = set()
    for path, doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        key = (doc["kind"], doc["metadata"]["name"], path.parent)
        assert key not in seen, f"{path}: {key} defined twice"
        seen.add(key)


def test_kustomization_lists_every_base_manifest() -> None:
    kust = load_yaml(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == on_disk, f"unlisted: {on_disk - listed}, missing: {listed - on_disk}"
    namespaces = k8s_objects("Namespace", K8S / "namespace.yaml")
    assert [n["metadata"]["name"] for n in namespaces] == [kust["namespace"]]
    images = {i["name"] for i in kust.get("images", [])}
    used = {c["image"].split(":")[0] for _, d in k8s_docs() for c in _containers(d)}
    assert images <= used, f"kustomize rewrites images nobody uses: {images - used}"


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    tmpl = spec.get("template", {}).get("spec", {})
    return tmpl.get("containers", []) + tmpl.get("initContainers", [])


# --------------------------------------------------------------------------- Deployment
def test_server_command_line_is_valid() -> None:
    s = settings()
    assert s.host == "0.0.0.0", "kubelet probes and the Service reach the pod IP, not loopback"
    assert s.device.startswith("cuda"), "a GPU pod should fail fast without a GPU, not go CPU"
    c = server()
    assert c["image"].split(":")[0] == "yan-serve"


def test_container_port_matches_the_server_port() -> None:
    c = server()
    ports = [p["containerPort"] for p in c["ports"]]
    assert ports == [settings().port]
    assert image().expose == ports
    ann = pod()["metadata"].get("annotations", {})
    if "prometheus.io/port" in ann:
        assert int(ann["prometheus.io/port"]) == settings().port
        assert ann.get("prometheus.io/path", "/metrics") in app_routes()


@pytest.mark.parametrize(
    ("probe", "path"),
    [("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")],
)
def test_probes(probe: str, path: str) -> None:
    c = server()
    get = c[probe]["httpGet"]
    assert get["path"] == path and path in app_routes()
    assert container_port(c, get["port"]) == settings().port
    assert get.get("scheme", "HTTP") == "HTTP"


def test_startup_budget_before_liveness() -> None:
    p = server()["startupProbe"]
    budget = p.get("periodSeconds", 10) * p.get("failureThreshold", 3)
    assert budget >= 120, f"startupProbe gives the model only {budget}s to load"


def prestop_seconds(container: dict) -> float:
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    cmd = pre["exec"]["command"]
    m = re.fullmatch(r"(?:/bin/)?sleep (\d+(?:\.\d+)?)", " ".join(cmd))
    assert m, f"preStop {cmd} is not a plain sleep"
    return float(m.group(1))


def test_termination_grace_covers_prestop_and_drain() -> None:
    grace = pod()["spec"]["terminationGracePeriodSeconds"]
    pre = prestop_seconds(server())
    assert pre > 0, "preStop sleep lets the endpoints controller drop the pod first"
    drain = settings().shutdown_timeout
    assert grace > pre + drain, f"{grace}s <= preStop {pre}s + --shutdown-timeout {drain}s"


def test_resources() -> None:
    res = server()["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    if "nvidia.com/gpu" in res.get("requests", {}):
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(res["requests"])


def test_runs_as_the_image_user() -> None:
    uid = int(image().user.split(":")[0])
    for doc in [deployment(), k8s_object("Job", K8S / "weights-seed-job.yaml")]:
        sc = pod(doc)["spec"]["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid
        for c in _containers(doc):
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_selector_matches_pod_labels() -> None:
    d = deployment()
    assert matches(d["spec"]["selector"]["matchLabels"], pod(d)["metadata"]["labels"])


# ----------------------------------------------------------------------------- weights
def claims() -> set[str]:
    return {p["metadata"]["name"] for p in k8s_objects("PersistentVolumeClaim")}


def mounts_of(doc: dict) -> dict[str, dict]:
    """Volume name -> volume, checking every mount names a volume whose claim exists."""
    vols = {v["name"]: v for v in pod(doc)["spec"].get("volumes", [])}
    for c in _containers(doc):
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols, f"{c['name']}: mount of undefined volume {m['name']}"
    for v in vols.values():
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert claim in claims(), f"no PersistentVolumeClaim {claim}"
    return vols


def mount_of(container: dict, path: str) -> dict:
    hits = [m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")]
    assert hits, f"{container['name']}: {path} is on no mounted volume"
    return max(hits, key=lambda m: len(m["mountPath"]))


def test_model_is_read_from_the_weights_volume() -> None:
    d = deployment()
    vols = mounts_of(d)
    model = settings().model
    m = mount_of(server(), model)
    assert m.get("readOnly") is True
    assert "persistentVolumeClaim" in vols[m["name"]]
    # the init container waits for the very checkpoint the server loads, on the same volume
    for init in pod(d)["spec"].get("initContainers", []):
        assert env_values(init)["YAN_SERVE_MODEL"] == model
        im = mount_of(init, model)
        assert (im["name"], im["mountPath"]) == (m["name"], m["mountPath"])
        assert init["image"] == server()["image"]


def test_seed_job_fills_the_served_volume() -> None:
    job = k8s_object("Job", K8S / "weights-seed-job.yaml")
    mounts_of(job)
    (seed,) = pod(job)["spec"]["containers"]
    script = " ".join(seed["command"] + seed.get("args", []))
    assert f'"{image().workdir}/weights"' in script, "copy from the image's baked weights/"
    served = mount_of(server(), settings().model)
    served_vol = {v["name"]: v for v in pod()["spec"]["volumes"]}[served["name"]]
    (seed_vol,) = pod(job)["spec"]["volumes"]
    claim = served_vol["persistentVolumeClaim"]["claimName"]
    assert seed_vol["persistentVolumeClaim"]["claimName"] == claim
    (sm,) = seed["volumeMounts"]
    assert sm["mountPath"] == served["mountPath"] and not sm.get("readOnly")
    # the seed pod must not receive traffic or count for the PDB
    labels = pod(job)["metadata"]["labels"]
    service = k8s_object("Service", K8S / "service.yaml")
    pdb = k8s_object("PodDisruptionBudget", K8S / "pdb.yaml")
    assert not matches(service["spec"]["selector"], labels)
    assert not matches(pdb["spec"]["selector"]["matchLabels"], labels)


# ------------------------------------------------------------------- Service, HPA, PDB
def test_service_routes_to_the_server_port() -> None:
    svc = k8s_object("Service", K8S / "service.yaml")
    assert matches(svc["spec"]["selector"], pod()["metadata"]["labels"])
    (port,) = svc["spec"]["ports"]
    assert container_port(server(), port["targetPort"]) == settings().port


@pytest.mark.parametrize("path", [K8S / "hpa.yaml", CUSTOM_HPA])
def test_hpa_targets_the_deployment(path) -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", path)
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    d = deployment()
    target = (ref["apiVersion"], ref["kind"], ref["name"])
    assert target == ("apps/v1", "Deployment", d["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] <= d["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def test_cpu_hpa_has_cpu_requests_to_measure_against() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", K8S / "hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in server()["resources"]["requests"], "utilization is relative to requests"


def test_pdb_selects_the_pods_and_allows_evictions() -> None:
    pdb = k8s_object("PodDisruptionBudget", K8S / "pdb.yaml")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod()["metadata"]["labels"])
    floor = min(
        deployment()["spec"]["replicas"],
        *[h["spec"]["minReplicas"] for h in k8s_objects("HorizontalPodAutoscaler")],
    )
    assert pdb["spec"]["minAvailable"] < floor, "a drain could never evict a server pod"


# ------------------------------------------------------------ custom-metric autoscaling
def test_queue_depth_hpa_reads_the_adapter_metric() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", CUSTOM_HPA)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = load_yaml(ADAPTER)["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    series = re.match(r"[a-zA-Z_:][\w:]*", rule["seriesQuery"]).group(0)
    assert series == "yan:queue_depth" and series in metric_series()
    assert re.search(rule["name"]["matches"], series)
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    assert "<<.GroupBy>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_podmonitor_scrapes_the_server_pods() -> None:
    pm = k8s_object("PodMonitor", K8S / "autoscaling/podmonitor.yaml")
    assert matches(pm["spec"]["selector"]["matchLabels"], pod()["metadata"]["labels"])
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert container_port(server(), ep["port"]) == settings().port
    assert ep.get("path", "/metrics") == "/metrics" and "/metrics" in app_routes()
