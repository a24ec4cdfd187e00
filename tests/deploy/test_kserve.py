"""deploy/kserve/: the InferenceServices of the CPU and the CUDA image, checked without a cluster.

The `kserve` SDK is not installed to check them: it pins protobuf below 7 and pulls the Kubernetes
client, pandas and grpcio-tools into the environment. Instead the manifests are checked against
the fields of the InferenceService CRD (serving.kserve.io/v1beta1) and of the Kubernetes
container they embed, written out below (unknown fields, wrong types, missing required fields),
then against the service itself: the image and its settings, the port, and probe paths that the
real app answers as probes expect."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import yaml
from conftest import wait_ready
from fastapi.testclient import TestClient
from test_deploy_files import compose, container_path_to_repo, effective_settings, image_env, setting_for

from app.main import create_app, default_factory
from app.settings import Settings
from models.demo.paths import CHECKPOINTS, VIT_CLASSIFY

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = {
    "cpu": ROOT / "deploy" / "kserve" / "inferenceservice-cpu.yaml",
    "gpu": ROOT / "deploy" / "kserve" / "inferenceservice-gpu.yaml",
}
COMPOSE_FILES = {"cpu": ROOT / "docker-compose.yml", "gpu": ROOT / "docker" / "compose.gpu.yml"}
PROBES = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}

# ---------------------------------------------------------------- the CRD's fields

ANY = object  # a field the manifests may use but this check does not look into
QUANTITIES = {str: "Quantity"}
SCHEMA: dict[str, dict] = {
    "InferenceService": {
        "apiVersion": str,
        "kind": str,
        "metadata": "ObjectMeta",
        "spec": "InferenceServiceSpec",
    },
    "ObjectMeta": {"name": str, "namespace": str, "labels": {str: str}, "annotations": {str: str}},
    "InferenceServiceSpec": {"predictor": "PredictorSpec", "transformer": ANY, "explainer": ANY},
    # V1beta1PredictorSpec: the component's fields, the pod's, and the built-in model servers'
    "PredictorSpec": {
        "containers": ["Container"],
        "minReplicas": int,
        "maxReplicas": int,
        "scaleMetric": ("cpu", "memory", "concurrency", "rps"),
        "scaleTarget": int,
        "containerConcurrency": int,
        "timeout": int,
        "canaryTrafficPercent": int,
        "annotations": {str: str},
        "labels": {str: str},
        "nodeSelector": {str: str},
        "serviceAccountName": str,
        "terminationGracePeriodSeconds": int,
        **dict.fromkeys(
            "activeDeadlineSeconds affinity autoScaling automountServiceAccountToken batcher "
            "deploymentStrategy dnsConfig dnsPolicy enableServiceLinks ephemeralContainers hostAliases "
            "hostIPC hostNetwork hostPID hostUsers hostname imagePullSecrets initContainers logger "
            "name nodeName os overhead preemptionPolicy priority priorityClassName readinessGates "
            "resourceClaims resources restartPolicy runtimeClassName scaleMetricType schedulerName "
            "schedulingGates securityContext serviceAccount setHostnameAsFQDN shareProcessNamespace "
            "storageUris subdomain tolerations topologySpreadConstraints volumes workerSpec model "
            "huggingface lightgbm onnx paddle pmml pytorch sklearn tensorflow triton xgboost".split(),
            ANY,
        ),
    },
    # Kubernetes' core/v1 Container and what it holds
    "Container": {
        "name": str,
        "image": str,
        "command": [str],
        "args": [str],
        "env": ["EnvVar"],
        "ports": ["ContainerPort"],
        "readinessProbe": "Probe",
        "livenessProbe": "Probe",
        "startupProbe": "Probe",
        "resources": "ResourceRequirements",
        "imagePullPolicy": ("Always", "IfNotPresent", "Never"),
        **dict.fromkeys(
            "envFrom lifecycle resizePolicy restartPolicy securityContext stdin stdinOnce tty "
            "terminationMessagePath terminationMessagePolicy volumeDevices volumeMounts workingDir".split(),
            ANY,
        ),
    },
    "ContainerPort": {"containerPort": int, "name": str, "protocol": ("TCP", "UDP", "SCTP"), "hostPort": int},
    "EnvVar": {"name": str, "value": str, "valueFrom": "EnvVarSource"},
    "EnvVarSource": {"secretKeyRef": "KeySelector", "configMapKeyRef": "KeySelector", "fieldRef": ANY},
    "KeySelector": {"name": str, "key": str, "optional": bool},
    "Probe": {
        "httpGet": "HTTPGetAction",
        "initialDelaySeconds": int,
        "periodSeconds": int,
        "timeoutSeconds": int,
        "failureThreshold": int,
        "successThreshold": int,
    },
    "HTTPGetAction": {"path": str, "port": (int, str), "scheme": ("HTTP", "HTTPS"), "httpHeaders": ANY},
    "ResourceRequirements": {"requests": QUANTITIES, "limits": QUANTITIES},
}
REQUIRED = {
    "InferenceService": {"apiVersion", "kind", "metadata", "spec"},
    "ObjectMeta": {"name"},
    "InferenceServiceSpec": {"predictor"},
    "Container": {"name", "image"},
    "ContainerPort": {"containerPort"},
    "EnvVar": {"name"},
    "KeySelector": {"key"},
    "HTTPGetAction": {"port"},
}
QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
SCALE = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str) -> float:
    number, unit = QUANTITY.fullmatch(value).groups()
    return float(number) * SCALE[unit]


def problems(value, kind, where: str = "") -> list[str]:
    """What in `value` does not fit `kind`: a type name of SCHEMA, a Python type, a tuple of
    allowed values (or of types), [kind] for lists, {str: kind} for maps, ANY or "Quantity"."""
    if kind is ANY:
        return []
    if kind == "Quantity":
        ok = isinstance(value, str) and QUANTITY.fullmatch(value)
        return [] if ok else [f'{where}: {value!r} is not a quantity (a string such as "2", "500m", "4Gi")']
    if isinstance(kind, tuple):
        types = [k for k in kind if isinstance(k, type)]
        ok = any(type(value) is t for t in types) if types else value in kind
        return [] if ok else [f"{where}: {value!r} is not one of {kind}"]
    if isinstance(kind, type):
        return [] if type(value) is kind else [f"{where}: {value!r} is not a {kind.__name__}"]
    if isinstance(kind, list):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for i, v in enumerate(value) for p in problems(v, kind[0], f"{where}[{i}]")]
    if isinstance(kind, dict) and str in kind:
        if not isinstance(value, dict):
            return [f"{where}: not a map"]
        return [
            p
            for k, v in value.items()
            for p in problems(k, str, f"{where} key") + problems(v, kind[str], f"{where}.{k}")
        ]
    fields = SCHEMA[kind]
    if not isinstance(value, dict):
        return [f"{where}: not an object ({kind})"]
    found = [f"{where}.{name}: required by {kind}" for name in sorted(REQUIRED.get(kind, set()) - set(value))]
    for name, v in value.items():
        if name not in fields:
            found.append(f"{where}.{name}: not a field of {kind}")
        else:
            found += problems(v, fields[name], f"{where}.{name}")
    return found


def manifest(kind: str) -> dict:
    return yaml.safe_load(MANIFESTS[kind].read_text())


def container(doc: dict) -> dict:
    [only] = doc["spec"]["predictor"]["containers"]
    return only


def env_of(doc: dict) -> dict[str, dict]:
    entries = container(doc)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    return {e["name"]: e for e in entries}


# ---------------------------------------------------------------- the schema


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_manifest_is_an_inferenceservice_of_the_crds_fields(kind):
    doc = manifest(kind)
    assert problems(doc, "InferenceService") == []
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    # a DNS-1035 label: the name becomes Kubernetes service and host names
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"])
    predictor = doc["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_the_schema_check_catches_mistakes():
    doc = manifest("cpu")
    c = container(doc)
    doc["spec"]["predictor"]["protocolVersion"] = "v2"  # a model spec's field, not a custom container's
    c["readinessProbe"]["httpGet"]["paht"] = c["readinessProbe"]["httpGet"].pop("path")
    c["env"][0]["value"] = 2  # YAML's unquoted number: Kubernetes wants strings
    del c["ports"][0]["containerPort"]
    c["resources"]["limits"]["memory"] = "4 GB"
    doc["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] = True
    found = "\n".join(problems(doc, "InferenceService"))
    for words in (
        ".spec.predictor.protocolVersion: not a field of PredictorSpec",
        "httpGet.paht: not a field of HTTPGetAction",
        ".env[0].value: 2 is not a str",
        ".ports[0].containerPort: required by ContainerPort",
        "limits.memory: '4 GB' is not a quantity",
        "enable-prometheus-scraping: True is not a str",
    ):
        assert words in found, found


# ---------------------------------------------------------------- against the service


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_container_runs_the_image_with_real_settings(kind, monkeypatch):
    doc = manifest(kind)
    c = container(doc)
    assert c["name"] == "kserve-container"  # the name KServe gives the predictor's container
    assert c["image"] == compose(COMPOSE_FILES[kind])["services"]["tokenlean"]["image"]
    env = env_of(doc)
    # KServe reads a custom container's protocol from PROTOCOL (v1 unless said)
    assert env.pop("PROTOCOL") == {"name": "PROTOCOL", "value": "v2"}
    for name in env:
        setting_for(name)  # fails for a variable no setting reads
    secret = env.pop("TOKENLEAN_API_KEY")["valueFrom"]["secretKeyRef"]
    assert secret["optional"] is True  # the manifest applies without the secret; with it, /v1 and /v2 need it
    plain = {name: e["value"] for name, e in env.items()}
    settings = effective_settings(plain, monkeypatch)
    [port] = c["ports"]
    assert settings.port == port["containerPort"] and settings.host == "0.0.0.0"
    assert port["name"] == "http1" and port.get("protocol", "TCP") == "TCP"  # Knative: HTTP/1 on the one port
    image = image_env(kind)
    assert settings.device == image["TOKENLEAN_DEVICE"] == ("cuda" if kind == "gpu" else "cpu")
    for name, value in plain.items():
        if name.endswith("__CHECKPOINT"):
            assert value == image[name], name
            assert (container_path_to_repo(value, kind) / "config.json").is_file(), value


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_probes_and_metrics_point_at_the_services_routes(kind):
    doc = manifest(kind)
    c = container(doc)
    port = c["ports"][0]["containerPort"]
    for probe, path in PROBES.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] in (port, c["ports"][0]["name"]), probe
        assert all(v >= 1 for k, v in c[probe].items() if k != "httpGet"), probe
    annotations = doc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == str(port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


@pytest.mark.parametrize("kind", sorted(MANIFESTS))
def test_resources_request_no_more_than_their_limits(kind):
    resources = container(manifest(kind))["resources"]
    requests, limits = resources["requests"], resources["limits"]
    assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits)
    for name, value in requests.items():
        assert quantity(value) <= quantity(limits[name]), name
    if kind == "gpu":
        assert re.fullmatch(
            r"[1-9][0-9]*", limits["nvidia.com/gpu"]
        )  # whole GPUs, a limit (requests follow it)
    else:
        assert not any("gpu" in name for name in (*requests, *limits))


def test_probe_paths_answer_as_kubernetes_expects():
    """The real app: liveness answers while the models load, readiness only once they are ready;
    the metrics path KServe scrapes answers too."""
    paths = {
        path
        for kind in MANIFESTS
        for path in (container(manifest(kind))[p]["httpGet"]["path"] for p in PROBES)
    }
    metrics = {manifest(kind)["metadata"]["annotations"]["prometheus.kserve.io/path"] for kind in MANIFESTS}
    assert paths == set(PROBES.values()) and metrics == {"/metrics"}
    gate = threading.Event()

    def gated(task, settings, metrics):
        gate.wait(30)
        return default_factory(task, settings, metrics)

    models = {"vqa": {"enabled": False}, "retrieval": {"enabled": False}}
    models["classify"] = {"checkpoint": str(CHECKPOINTS / VIT_CLASSIFY)}
    with TestClient(create_app(Settings(models=models), gated)) as client:
        assert client.get(PROBES["livenessProbe"]).status_code == 200
        assert client.get(PROBES["readinessProbe"]).status_code == 503
        gate.set()
        wait_ready(client)
        for path in (*paths, *metrics):
            assert client.get(path).status_code == 200, path


def test_the_deploying_guide_says_how_and_that_no_cluster_checks_them():
    text = (ROOT / "docs" / "deploying.md").read_text()
    section = text.split("## KServe", 1)[1].split("\n## ", 1)[0]
    for path in MANIFESTS.values():
        assert str(path.relative_to(ROOT)) in section
    assert "statically" in section and "no cluster" in section.lower()
