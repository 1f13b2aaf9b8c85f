"""Kueue in the local cluster: its controller as a host process, installed from its own manifests.

``ClusterOptions(kueue=True)`` builds (once, cached: ``hack/localcluster/build-kueue.sh``) and
starts ``sigs.k8s.io/kueue/cmd/kueue`` beside the control plane. What Kueue's kustomize overlay
(``config/default``) would apply is applied from the module's own ``config/`` files, with the
overlay's ``namePrefix`` and ``namespace``: the CRDs with their conversion webhooks, the webhook
Service and Secret, and the mutating and validating webhook configurations with the overlay's
``namespaceSelector`` patches. Kueue's internal certificate management issues the webhook
certificate into that Secret and injects its CA into the webhook configurations and CRDs, as in
a real installation.

Only the Deployment is replaced: the controller runs on the host, so the webhook Service has no
selector but an EndpointSlice naming the bridge address and the port the controller listens
on (the apiserver reaches the Service's ClusterIP through the node agent's service proxy), and
the Secret's certificate is copied into the controller's certificate directory, as the
Deployment's secret volume would be (:func:`mount_certs`).
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]

NAMESPACE = "kueue-system"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Integrations the local cluster runs; the rest stay no-op webhooks, as Kueue does for disabled ones.
FRAMEWORKS = ("batch/job",)


def _documents(path: Path) -> Iterator[JSON]:
    for document in yaml.safe_load_all(path.read_text()):
        if document:
            yield document


class Overlay:
    """Kueue's ``config/default`` kustomization, reduced to what it does to the objects applied here."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        overlay = yaml.safe_load((config_dir / "kustomization.yaml").read_text())
        self.prefix: str = overlay.get("namePrefix", "")
        self.namespace: str = overlay.get("namespace", NAMESPACE)

    def name(self, name: str) -> str:
        return self.prefix + name

    def service_ref(self, ref: JSON) -> JSON:
        return {**ref, "name": self.name(ref["name"]), "namespace": self.namespace}

    def namespaced(self, obj: JSON) -> JSON:
        obj = copy.deepcopy(obj)
        obj["metadata"]["name"] = self.name(obj["metadata"]["name"])
        obj["metadata"]["namespace"] = self.namespace
        return obj

    def crds(self) -> list[JSON]:
        """The CRDs, with the conversion webhooks ``crd/kustomization.yaml`` patches in."""
        component = self.config_dir / "crd"
        kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
        conversions: dict[str, JSON] = {}
        for patch in kustomization.get("patches") or []:
            if "path" in patch:
                for doc in _documents(component / patch["path"]):
                    conversions[doc["metadata"]["name"]] = doc["spec"]["conversion"]
        crds = []
        for resource in kustomization["resources"]:
            for crd in _documents(component / resource):
                conversion = copy.deepcopy(conversions.get(crd["metadata"]["name"]))
                if conversion is not None:
                    client_config = conversion["webhook"]["clientConfig"]
                    client_config["service"] = self.service_ref(client_config["service"])
                    crd["spec"]["conversion"] = conversion
                crds.append(crd)
        return crds

    def webhook_configurations(self) -> list[JSON]:
        """The webhook configurations, with the component's patches (``namespaceSelector``) merged
        by webhook name, as a strategic merge patch does."""
        component = self.config_dir / "webhook"
        kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
        patches: dict[tuple[str, str], JSON] = {}
        for patch in kustomization.get("patches") or []:
            for doc in yaml.safe_load_all(patch.get("patch", "")):
                for hook in (doc or {}).get("webhooks") or []:
                    patches[(doc["kind"], hook["name"])] = hook
        configurations = []
        for resource in kustomization["resources"]:
            for obj in _documents(component / resource):
                if not obj["kind"].endswith("WebhookConfiguration"):
                    continue
                obj["metadata"]["name"] = self.name(obj["metadata"]["name"])
                for hook in obj["webhooks"]:
                    hook.update({k: v for k, v in patches.get((obj["kind"], hook["name"]), {}).items()})
                    hook["clientConfig"]["service"] = self.service_ref(hook["clientConfig"]["service"])
                configurations.append(obj)
        return configurations

    def webhook_service(self, endpoint_ip: str, port: int) -> tuple[JSON, JSON]:
        """The webhook Service, selector-less, and an EndpointSlice that points it at the host."""
        (service,) = (
            obj
            for obj in _documents(self.config_dir / "webhook" / "service.yaml")
            if obj["kind"] == "Service"
        )
        service = self.namespaced(service)
        service["spec"].pop("selector", None)
        (service_port,) = service["spec"]["ports"]
        service_port["targetPort"] = port
        name = service["metadata"]["name"]
        endpoint_slice = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-host",
                "namespace": self.namespace,
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "localcluster.kubetune.dev",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [endpoint_ip], "conditions": {"ready": True}}],
            "ports": [
                {
                    "port": port,
                    "protocol": "TCP",
                    **({"name": service_port["name"]} if "name" in service_port else {}),
                }
            ],
        }
        return service, endpoint_slice

    def secret(self) -> JSON:
        (secret,) = _documents(self.config_dir / "internalcert" / "secret.yaml")
        return self.namespaced(secret)

    def controller_config(
        self, *, webhook_host: str, webhook_port: int, health_port: int, cert_dir: Path
    ) -> JSON:
        """The overlay's Configuration for a host process: its own ports, no metrics server, no
        leader election (one replica), only :data:`FRAMEWORKS`."""
        (config,) = _documents(self.config_dir / "manager" / "controller_manager_config.yaml")
        config["namespace"] = self.namespace
        config["health"] = {"healthProbeBindAddress": f"127.0.0.1:{health_port}"}
        config["metrics"] = {"bindAddress": "0"}
        config["webhook"] = {"host": webhook_host, "port": webhook_port, "certDir": str(cert_dir)}
        config["leaderElection"] = {"leaderElect": False}
        config["integrations"] = {"frameworks": list(FRAMEWORKS)}
        config["internalCertManagement"] = {"enable": True}
        return config


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def install(
    config_dir: Path,
    request: Callable[[str, str, Any], Any],
    *,
    endpoint_ip: str,
    webhook_port: int,
) -> Overlay:
    """Create everything but the controller itself through ``request(method, path, body)``."""
    overlay = Overlay(config_dir)
    request("POST", "/api/v1/namespaces", {"metadata": {"name": overlay.namespace}})
    for crd in overlay.crds():
        request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    ns = overlay.namespace
    request("POST", f"/api/v1/namespaces/{ns}/secrets", overlay.secret())
    service, endpoint_slice = overlay.webhook_service(endpoint_ip, webhook_port)
    request("POST", f"/api/v1/namespaces/{ns}/services", service)
    request("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", endpoint_slice)
    for configuration in overlay.webhook_configurations():
        plural = configuration["kind"].lower() + "s"
        request("POST", f"/apis/admissionregistration.k8s.io/v1/{plural}", configuration)
    return overlay


def mount_certs(request: Callable[[str, str, Any], Any], overlay: Overlay, cert_dir: Path) -> bool:
    """Do kubelet's part: the Deployment mounts the webhook Secret at the certificate directory,
    where Kueue's rotator waits for the certificate it wrote into the Secret. Written once the
    Secret holds it (tests never live long enough for a rotation)."""
    secret = request(
        "GET", f"/api/v1/namespaces/{overlay.namespace}/secrets/{overlay.name('webhook-server-cert')}", None
    )
    data = secret.get("data") or {}
    if not data.get("tls.crt") or not data.get("tls.key"):
        return False
    cert_dir.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        target = cert_dir / key
        if not target.exists():
            target.write_bytes(base64.b64decode(value))
    return True


def ready(
    health_port: int, request: Callable[[str, str, Any], Any], overlay: Overlay, cert_dir: Path
) -> bool:
    """The controller says ready and its CA is in every webhook configuration and converting CRD."""
    if not mount_certs(request, overlay, cert_dir):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as resp:
            if resp.status != 200:
                return False
    except (OSError, urllib.error.URLError):
        return False
    for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
        name = overlay.name(f"{kind[: -len('webhookconfigurations')]}-webhook-configuration")
        obj = request("GET", f"/apis/admissionregistration.k8s.io/v1/{kind}/{name}", None)
        if not all(hook["clientConfig"].get("caBundle") for hook in obj["webhooks"]):
            return False
    for crd in overlay.crds():
        if "conversion" in crd["spec"]:
            live = request(
                "GET",
                f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}",
                None,
            )
            if not live["spec"]["conversion"]["webhook"]["clientConfig"].get("caBundle"):
                return False
    return True


def write_config(path: Path, config: JSON) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # JSON is YAML; Kueue reads either.
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
