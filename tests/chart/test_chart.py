"""The Helm chart (charts/kubetune): lint, rendering, schema, and install/uninstall on a cluster.

Aspects:
- ``helm lint --strict`` passes with the defaults and with every option on;
- the defaults render the operator Deployment (operator image, probes, resources, metrics port),
  its ServiceAccount, one ClusterRole and binding, and the metrics Service; nothing optional;
- the operator accepts every flag the chart renders, and the flags carry the worker and server
  images, pull policies, pull secrets and service accounts into the pods it builds;
- the ClusterRole grants exactly what the operator calls (least privilege), including
  ``*/finalizers`` update for blockOwnerDeletion;
- options: namespaced RBAC (a Role per watched namespace plus a read-only ClusterRole for kopf),
  a ServiceMonitor only when enabled, a PodDisruptionBudget and peering objects with replicas > 1
  (kopf's peering CRDs in crds/, each replica's record named after its pod),
  worker and server ServiceAccounts without a token in the watched namespaces;
- values.schema.json rejects bad values and unknown keys; combinations it cannot express fail
  rendering with a message;
- on a cluster: every rendering passes ``kubectl apply --dry-run=server``; the operator starts with
  the chart's arguments and serves /healthz and /metrics; ``helm install`` then ``helm uninstall``
  leaves no operator object behind while the CRDs stay.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.localcluster.testing import BuiltImages, ClusterHandle, wait_for
from kubetune.operator import main as operator_main
from kubetune.operator.builders import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
#: helm built from source reports an old default Kubernetes version to `template` and `lint`; render
#: for the embedded cluster's.
KUBE_VERSION = (ROOT / "hack" / "localcluster" / "k8s" / "VERSION").read_text().strip()
RELEASE = "kt"
NAMESPACE = "kubetune-system"

#: Every option on at once (lint and dry-run renderings).
ALL_OPTIONS = {
    "namespaced-rbac": ["--set", "rbac.namespaced=true", "--set", "operator.watchNamespaces={team-a,team-b}"],
    "service-monitor": ["--set", "metrics.serviceMonitor.enabled=true"],
    "replicas-2": ["--set", "replicaCount=2", "--set", "operator.peering=kubetune"],
    "private-registry": [
        "--set", "operator.image.repository=registry.example:5000/kt/operator",
        "--set", "worker.image.repository=registry.example:5000/kt/worker",
        "--set", "worker.image.tag=0.1.0-cuda",
        "--set", "server.image.repository=registry.example:5000/kt/server",
        "--set", "imagePullSecrets[0].name=regcred",
    ],
}  # fmt: skip

#: What the operator calls, verb by verb: kopf's watches, indexes and annotation patches; the
#: reconcilers' reads, status patches and server-side applies, which need create to create
#: (kubetune/operator/kube.py, reconcile.py, serving_reconcile.py).
OPERATOR_NEEDS: dict[tuple[str, str], set[str]] = {
    ("kubetune.dev", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.dev", "adapterdeployments"): {"get", "list", "watch", "patch"},
    ("kubetune.dev", "finetunejobs/status"): {"patch"},
    ("kubetune.dev", "adapterdeployments/status"): {"patch"},
    ("kubetune.dev", "finetunejobs/finalizers"): {"update"},
    ("kubetune.dev", "adapterdeployments/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "create", "patch"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "services"): {"get", "create", "patch"},
    ("", "secrets"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "events"): {"create"},
    ("kueue.x-k8s.io", "workloads"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


@pytest.fixture(scope="session")
def helm() -> Path:
    """The pinned helm from ``make cluster-build``, else helm on PATH (kind, CI)."""
    from kubetune.localcluster import binaries

    try:
        return binaries.find()["helm"]
    except binaries.BinariesMissing as missing:
        found = shutil.which("helm")
        if found:
            return Path(found)
        if os.environ.get("KUBETUNE_SKIP_CLUSTER"):
            pytest.skip(str(missing))
        pytest.fail(f"no helm: {missing}", pytrace=False)


def _helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False)


def render(
    helm: Path, *args: str, namespace: str = NAMESPACE, release: str = RELEASE
) -> list[dict[str, Any]]:
    proc = _helm(
        helm, "template", release, str(CHART), "--kube-version", KUBE_VERSION, "-n", namespace, *args
    )
    assert proc.returncode == 0, proc.stderr
    return [obj for obj in yaml.safe_load_all(proc.stdout) if obj]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def the(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = by_kind(objects, kind)
    return obj


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def parse_operator_args(objects: list[dict[str, Any]]) -> argparse.Namespace:
    """The chart's arguments as the operator's own command line parses them."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    operator_main.add_arguments(parser)
    return parser.parse_args(operator_container(objects)["args"])


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# --- lint and rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", [None, *ALL_OPTIONS])
def test_helm_lint_strict(helm: Path, option: str | None) -> None:
    proc = _helm(
        helm,
        "lint",
        "--strict",
        "--kube-version",
        KUBE_VERSION,
        str(CHART),
        *(ALL_OPTIONS[option] if option else []),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_defaults_render_the_operator_and_nothing_optional(helm: Path) -> None:
    objects = render(helm)
    assert sorted(obj["kind"] for obj in objects) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    deployment = the(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in pod
    container = operator_container(objects)
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 8081}
    service = the(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Without listed namespaces the worker and server accounts cannot exist: no flag names them.
    args = parse_operator_args(objects)
    assert args.namespace == [] and args.worker_service_account is None
    assert operator_main.worker_settings(args) == WorkerSettings(
        image="ghcr.io/kubetune/worker:0.1.0",
        image_pull_policy="IfNotPresent",
        server_image="ghcr.io/kubetune/worker:0.1.0",
        server_image_pull_policy="IfNotPresent",
    )
    assert args.metrics_port == 8081 and args.liveness == "http://0.0.0.0:8080/healthz"


def test_images_pull_secrets_and_accounts_reach_the_operator(helm: Path) -> None:
    objects = render(
        helm,
        *ALL_OPTIONS["private-registry"],
        "--set-string", "server.image.tag=2",
        "--set", "server.image.pullPolicy=Always",
        "--set", "operator.watchNamespaces={team-a}",
    )  # fmt: skip
    container = operator_container(objects)
    assert container["image"] == "registry.example:5000/kt/operator:0.1.0"
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    args = parse_operator_args(objects)
    assert args.namespace == ["team-a"]
    assert operator_main.worker_settings(args) == WorkerSettings(
        image="registry.example:5000/kt/worker:0.1.0-cuda",
        image_pull_policy="IfNotPresent",
        server_image="registry.example:5000/kt/server:2",
        server_image_pull_policy="Always",
        image_pull_secrets=("regcred",),
        service_account="kt-worker",
        server_service_account="kt-server",
    )
    accounts = {
        (sa["metadata"]["namespace"], sa["metadata"]["name"]): sa for sa in by_kind(objects, "ServiceAccount")
    }
    assert set(accounts) == {(NAMESPACE, "kt-operator"), ("team-a", "kt-worker"), ("team-a", "kt-server")}
    assert accounts[("team-a", "kt-worker")]["automountServiceAccountToken"] is False
    assert accounts[("team-a", "kt-server")]["automountServiceAccountToken"] is False
    # Each empty server field is the worker's: a CUDA server beside CPU workers is one tag.
    args = parse_operator_args(render(helm, "--set", "server.image.tag=0.1.0-cuda"))
    assert (args.worker_image, args.server_image) == (
        "ghcr.io/kubetune/worker:0.1.0",
        "ghcr.io/kubetune/worker:0.1.0-cuda",
    )
    # An account of the user's own: named, not created.
    objects = render(
        helm,
        "--set", "worker.serviceAccount.create=false",
        "--set", "worker.serviceAccount.name=trainer",
        "--set", "server.serviceAccount.create=false",
    )  # fmt: skip
    args = parse_operator_args(objects)
    assert (args.worker_service_account, args.server_service_account) == ("trainer", None)
    assert [sa["metadata"]["name"] for sa in by_kind(objects, "ServiceAccount")] == ["kt-operator"]


def test_cluster_role_grants_exactly_what_the_operator_calls(helm: Path) -> None:
    role = the(render(helm), "ClusterRole")
    assert grants(role["rules"]) == OPERATOR_NEEDS
    binding = the(render(helm), "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-operator", "namespace": NAMESPACE}]


def test_namespaced_rbac(helm: Path) -> None:
    objects = render(helm, *ALL_OPTIONS["namespaced-rbac"])
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
    cluster_wide = {key for key in OPERATOR_NEEDS if key[0] == "apiextensions.k8s.io"}
    for role in roles:
        assert grants(role["rules"]) == {k: v for k, v in OPERATOR_NEEDS.items() if k not in cluster_wide}
    # kopf still observes CRDs and (with listed namespaces) namespaces: read-only, cluster-wide.
    assert grants(the(objects, "ClusterRole")["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }
    assert parse_operator_args(objects).namespace == ["team-a", "team-b"]


def test_service_monitor_only_when_enabled(helm: Path) -> None:
    assert not by_kind(render(helm), "ServiceMonitor")
    monitor = the(
        render(helm, *ALL_OPTIONS["service-monitor"], "--set", "metrics.serviceMonitor.labels.release=prom"),
        "ServiceMonitor",
    )
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # No metrics endpoint: neither Service nor ServiceMonitor nor flag.
    objects = render(helm, *ALL_OPTIONS["service-monitor"], "--set", "metrics.enabled=false")
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceMonitor")
    assert parse_operator_args(objects).metrics_port == 0


def test_replicas_bring_a_disruption_budget_and_peering(helm: Path) -> None:
    assert not by_kind(render(helm), "PodDisruptionBudget")
    objects = render(helm, *ALL_OPTIONS["replicas-2"])
    budget = the(objects, "PodDisruptionBudget")
    deployment = the(objects, "Deployment")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert the(objects, "ClusterKopfPeering")["metadata"]["name"] == "kubetune"
    assert parse_operator_args(objects).peering == "kubetune"
    assert grants(the(objects, "ClusterRole")["rules"])[("kopf.dev", "clusterkopfpeerings")] == {
        "get",
        "list",
        "watch",
        "patch",
    }
    # Limited to namespaces, kopf peers through a KopfPeering in each.
    objects = render(helm, *ALL_OPTIONS["replicas-2"], *ALL_OPTIONS["namespaced-rbac"])
    assert sorted(p["metadata"]["namespace"] for p in by_kind(objects, "KopfPeering")) == ["team-a", "team-b"]
    assert all(("kopf.dev", "kopfpeerings") in grants(role["rules"]) for role in by_kind(objects, "Role"))
    # Each replica's record in the peering object is named after its pod.
    env = {e["name"]: e for e in operator_container(objects)["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "POD_ID" not in {e["name"] for e in operator_container(render(helm))["env"]}


def test_chart_installs_the_peering_crds(helm: Path) -> None:
    """kopf does not install its peering CRDs; the chart's crds/ carries both, with the status the
    replicas write their records into."""
    proc = _helm(helm, "show", "crds", str(CHART))
    assert proc.returncode == 0, proc.stderr
    crds = {obj["metadata"]["name"]: obj for obj in yaml.safe_load_all(proc.stdout) if obj}
    for name, scope in (("kopfpeerings.kopf.dev", "Namespaced"), ("clusterkopfpeerings.kopf.dev", "Cluster")):
        spec = crds[name]["spec"]
        assert spec["scope"] == scope
        (version,) = spec["versions"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=two"], "replicaCount"),
        (["--set", "operator.image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "operator.image.repository=ghcr.io/kubetune/operator:1.0"], "repository"),
        (["--set", "image.repository=ghcr.io/kubetune/kubetune"], "image"),  # the old single image
        (["--set", "operator.watchNamespaces={Team_A}"], "watchNamespaces"),
        (["--set", "metrics.port=8080"], "port"),
        (["--set", "operator.logLevel=trace"], "logLevel"),
        (["--set", "imagePullSecrets[0].secret=regcred"], "imagePullSecrets"),
    ],
)
def test_schema_rejects_bad_values(helm: Path, args: list[str], message: str) -> None:
    proc = _helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *args)
    assert proc.returncode != 0
    assert "schema" in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=2"], "replicaCount > 1 needs operator.peering"),
        (["--set", "rbac.namespaced=true"], "rbac.namespaced needs operator.watchNamespaces"),
    ],
)
def test_combinations_fail_with_a_message(helm: Path, args: list[str], message: str) -> None:
    proc = _helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# --- on a cluster ---------------------------------------------------------------------------------


def _served_groups(cluster: ClusterHandle) -> set[str]:
    versions = json.loads(cluster.kubectl("get", "--raw", "/apis").stdout)
    return {g["name"] for g in versions["groups"]} | {""}


@pytest.mark.cluster
@pytest.mark.parametrize("option", [None, *ALL_OPTIONS])
def test_rendering_passes_server_dry_run(
    cluster: ClusterHandle, helm: Path, namespace: str, option: str | None
) -> None:
    args = list(ALL_OPTIONS[option]) if option else []
    if option == "namespaced-rbac":  # Roles go into namespaces that exist
        args[-1] = f"operator.watchNamespaces={{{namespace},default}}"
    objects = render(helm, *args, namespace=namespace, release=f"kt-{secrets.token_hex(3)}")
    # Objects of APIs this cluster does not serve (prometheus-operator, kopf peering) cannot be
    # checked by it; they are checked by the rendering tests above.
    served = _served_groups(cluster)
    checked = [obj for obj in objects if obj["apiVersion"].rpartition("/")[0] in served]
    skipped = {obj["kind"] for obj in objects} - {obj["kind"] for obj in checked}
    assert skipped <= {"ServiceMonitor", "ClusterKopfPeering", "KopfPeering"}
    text = yaml.safe_dump_all(checked)
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=text)
    assert proc.stdout.count("(server dry run)") == len(checked), proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.cluster
def test_operator_starts_with_the_chart_args_and_serves_health_and_metrics(
    cluster: ClusterHandle, helm: Path, namespace: str, tmp_path: Path
) -> None:
    from kubetune.api import crdgen

    crdgen.apply(cluster.api_client())
    args = operator_container(render(helm, "--set", f"operator.watchNamespaces={{{namespace}}}"))["args"]
    health, metrics = _free_port(), _free_port()
    # The chart's arguments, on free local ports instead of the pod's 8080 and 8081.
    args = [
        f"--liveness=http://127.0.0.1:{health}/healthz" if a.startswith("--liveness=") else a for a in args
    ]
    args = [f"--metrics-port={metrics}" if a.startswith("--metrics-port=") else a for a in args]
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune", "operator", *args],
            env=cluster.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def get(url: str) -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.read().decode()
            except OSError:
                assert proc.poll() is None, log.read_text()
                return None

        wait_for(lambda: get(f"http://127.0.0.1:{health}/healthz"), 60, description="operator /healthz")
        text = wait_for(lambda: get(f"http://127.0.0.1:{metrics}/metrics"), 10, description="/metrics")
        assert text and "process_resident_memory_bytes" in text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def _built_images() -> list[str]:
    """--set arguments for the images `make images` built, when it has (a kind cluster runs them;
    the embedded cluster's process runtime ignores images)."""
    env_file = ROOT / "_out" / "images.env"
    return BuiltImages.read(env_file).helm_values() if env_file.is_file() else []


@pytest.mark.cluster
def test_install_then_uninstall_leaves_no_operator_objects(cluster: ClusterHandle, namespace: str) -> None:
    release = f"kt-{secrets.token_hex(3)}"
    selector = f"app.kubernetes.io/instance={release}"
    namespaced = "deployments,serviceaccounts,services,roles,rolebindings,poddisruptionbudgets"
    cluster_scoped = "clusterroles,clusterrolebindings"
    cluster.helm(
        "install", release, str(CHART), "--namespace", namespace, *_built_images(),
        "--set", f"operator.watchNamespaces={{{namespace}}}",
    )  # fmt: skip
    try:
        installed = cluster.kubectl("get", namespaced, "-n", namespace, "-l", selector, "-o", "name").stdout
        assert {line.split("/")[0] for line in installed.split()} == {
            "deployment.apps",
            "serviceaccount",
            "service",
        }
        assert len(installed.split()) == 5  # operator, worker and server accounts
        installed = cluster.kubectl("get", cluster_scoped, "-l", selector, "-o", "name").stdout
        assert len(installed.split()) == 2
    finally:
        cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "60s")
    assert not cluster.kubectl(
        "get", namespaced, "-n", namespace, "-l", selector, "-o", "name"
    ).stdout.strip()
    assert not cluster.kubectl("get", cluster_scoped, "-l", selector, "-o", "name").stdout.strip()
    # Helm never deletes CRDs: the users' FineTuneJobs and AdapterDeployments survive an uninstall.
    cluster.kubectl("get", "crd", "finetunejobs.kubetune.dev", "adapterdeployments.kubetune.dev")
