"""What the pods of both controllers share: kubetune's labels and its locked-down pod spec."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import PodTemplateOverrides

LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
#: Non-root identity of worker and serving pods (the image's user); fsGroup makes mounted claims writable.
WORKER_UID = 1000
SCRATCH_VOLUME = "tmp"


def pod_spec_with(
    containers: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    overrides: PodTemplateOverrides | None,
    *,
    service_account: str = "",
    image_pull_secrets: tuple[str, ...] = (),
    **fields: Any,
) -> dict[str, Any]:
    """A pod spec for kubetune's pods: non-root, read-only root with /tmp as an emptyDir, seccomp,
    no service links, no API token (workers and servers never call the API), the operator's
    default service account and pull secrets, plus the user's scheduling overrides (node selector,
    tolerations, affinity, priority, service account, pull secrets)."""
    # The root filesystem is read-only (the images are built for it); /tmp is the one scratch
    # path every process expects, so each pod gets it as an emptyDir.
    containers = [
        {
            **c,
            "volumeMounts": [*c.get("volumeMounts", []), {"name": SCRATCH_VOLUME, "mountPath": "/tmp"}],
            "securityContext": {**c.get("securityContext", {}), "readOnlyRootFilesystem": True},
        }
        for c in containers
    ]
    volumes = [*volumes, {"name": SCRATCH_VOLUME, "emptyDir": {}}]
    spec: dict[str, Any] = {
        **fields,
        **({"serviceAccountName": service_account} if service_account else {}),
        **({"imagePullSecrets": [{"name": s} for s in image_pull_secrets]} if image_pull_secrets else {}),
        "automountServiceAccountToken": False,
        "containers": containers,
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "enableServiceLinks": False,
    }
    if overrides:
        for key, value in (
            ("nodeSelector", overrides.node_selector),
            ("tolerations", overrides.tolerations),
            ("affinity", overrides.affinity),
            ("priorityClassName", overrides.priority_class_name),
            ("serviceAccountName", overrides.service_account_name),
            ("imagePullSecrets", overrides.image_pull_secrets),
        ):
            if value:
                spec[key] = value
    return spec
