"""deploy/k8s/training/train-job.yaml: the multi-node `yan train` Job. Its torchrun flags are
checked with torchrun's own parser, the training flags with `yan`'s, and the rendezvous address
with the Job's pod hostnames and the headless Service."""

from __future__ import annotations

import argparse
from importlib import metadata

import pytest

from tests.deploy.common import K8S, image, k8s_object, k8s_objects

TRAIN = K8S / "training/train-job.yaml"


def job() -> dict:
    return k8s_object("Job", TRAIN)


def container() -> dict:
    (c,) = job()["spec"]["template"]["spec"]["containers"]
    return c


def exact_flags(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    known = {s for a in parser._actions for s in a.option_strings}
    unknown = [a for a in argv if a.startswith("-") and a.split("=")[0] not in known]
    assert not unknown, f"{where}: no such flag {unknown} (abbreviations do not count)"


def parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{where}: {argv} rejected (exit {e.code})") from None


def torchrun_args() -> argparse.Namespace:
    from torch.distributed.run import get_args_parser

    c = container()
    assert c["command"] == ["torchrun"]
    scripts = {e.name for e in metadata.distribution("torch").entry_points}
    assert "torchrun" in scripts, "torch installs no torchrun console script"
    args = parse(get_args_parser(), c["args"], "torchrun")
    launcher = c["args"][: len(c["args"]) - len(args.training_script_args) - 1]
    exact_flags(get_args_parser(), launcher, "torchrun")
    return args


def train_args() -> argparse.Namespace:
    from yan_serve.cli import build_parser

    t = torchrun_args()
    assert t.module and t.training_script == "yan_serve.cli", "run `-m yan_serve.cli`"
    argv = t.training_script_args
    assert argv[0] == "train"
    tp = build_parser()._subparsers._group_actions[0].choices["train"]
    exact_flags(tp, argv[1:], "yan train")
    return parse(build_parser(), argv, "yan train")


def test_torchrun_and_train_flags_are_real() -> None:
    a = train_args()
    assert a.stage in ("stage2", "finetune") and a.init, "stage 2 starts from --init"
    assert a.resume, "--resume: a restarted pod continues from the last save"
    assert a.device.startswith("cuda")


def test_one_pod_per_node() -> None:
    spec = job()["spec"]
    t = torchrun_args()
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(t.nnodes)
    gpus = container()["resources"]["limits"]["nvidia.com/gpu"]
    assert int(t.nproc_per_node) == int(gpus), "one process per GPU"
    assert job()["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_rendezvous_reaches_pod_zero() -> None:
    t = torchrun_args()
    assert t.rdzv_backend == "c10d" and t.rdzv_id
    host, port = t.rdzv_endpoint.rsplit(":", 1)
    tmpl = job()["spec"]["template"]
    sub = tmpl["spec"]["subdomain"]
    assert host == f"{job()['metadata']['name']}-0.{sub}", "Indexed Job pod 0's DNS name"
    (svc,) = [s for s in k8s_objects("Service") if s["metadata"]["name"] == sub]
    assert svc["spec"]["clusterIP"] == "None", "the subdomain Service must be headless"
    assert svc["spec"].get("publishNotReadyAddresses") is True
    labels = tmpl["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert int(port) in [p["containerPort"] for p in container()["ports"]]


@pytest.mark.parametrize("attr", ["data", "init", "out"])
def test_paths_are_on_volumes(attr: str) -> None:
    path = getattr(train_args(), attr)
    c = container()
    mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"--{attr} {path} is on no mounted volume"
    vols = {v["name"]: v for v in job()["spec"]["template"]["spec"]["volumes"]}
    claim = vols[mounts[0]["name"]]["persistentVolumeClaim"]["claimName"]
    pvcs = {p["metadata"]["name"]: p for p in k8s_objects("PersistentVolumeClaim", TRAIN)}
    assert claim in pvcs
    assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], "every node mounts it"
    if attr == "out":
        assert not mounts[0].get("readOnly")


def test_shared_memory_and_user() -> None:
    spec = job()["spec"]["template"]["spec"]
    shm = [m for m in container()["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm, "NCCL needs a larger /dev/shm than the container default"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    assert spec["securityContext"]["runAsUser"] == int(image().user.split(":")[0])
