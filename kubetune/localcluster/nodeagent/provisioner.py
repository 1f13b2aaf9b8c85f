"""A dynamic provisioner for the default StorageClass: one host directory per claim.

Claims of the cluster's default class (``standard``, as kind names it, so manifests written
for kind work unchanged) get a ``hostPath`` PersistentVolume pre-bound to them; the PV
controller in kube-controller-manager completes the binding. When a claim is deleted, its
Released volume and directory are deleted too (reclaim policy ``Delete``, which the PV
controller leaves to the provisioner named in ``pv.kubernetes.io/provisioned-by``).
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from kubetune.localcluster.kubeapi import ApiError, KubeAPI, resync_loop

JSON = dict[str, Any]
log = logging.getLogger("kubetune.nodeagent")

STORAGE_CLASS = "standard"
PROVISIONER = "kubetune.dev/local-dir"
# Watches wake the loop on every change; this is only the safety net.
_RESYNC_S = 10.0


def storage_class() -> JSON:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        # Immediate: every node shares the host's disk, so there is no topology to wait for.
        "volumeBindingMode": "Immediate",
    }


def volume_for(claim: JSON, root: Path) -> JSON:
    meta, spec = claim["metadata"], claim["spec"]
    name = f"pvc-{meta['uid']}"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
        "spec": {
            "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": STORAGE_CLASS,
            "volumeMode": spec.get("volumeMode", "Filesystem"),
            "hostPath": {"path": str(root / name), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


class Provisioner:
    def __init__(self, api: KubeAPI, root: Path, stopping: threading.Event) -> None:
        self.api = api
        self.root = root
        self.stopping = stopping

    def run(self) -> None:
        paths = ("/api/v1/persistentvolumeclaims", "/api/v1/persistentvolumes")
        resync_loop(self.api, paths, self.sync, self.stopping, name="provisioner", resync_s=_RESYNC_S)

    def sync(self) -> None:
        for claim in self.api.get("/api/v1/persistentvolumeclaims")["items"]:
            if (
                claim["spec"].get("storageClassName") == STORAGE_CLASS
                and not claim["spec"].get("volumeName")
                and not claim["metadata"].get("deletionTimestamp")
            ):
                self._provision(claim)
        for volume in self.api.get("/api/v1/persistentvolumes")["items"]:
            annotations = volume["metadata"].get("annotations") or {}
            if (
                annotations.get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                and volume.get("status", {}).get("phase") == "Released"
            ):
                self._delete(volume)

    def _provision(self, claim: JSON) -> None:
        volume = volume_for(claim, self.root)
        path = Path(volume["spec"]["hostPath"]["path"])
        path.mkdir(parents=True, exist_ok=True)
        # Writable by any container user, as kind's local-path provisioner makes its volumes:
        # hostPath volumes get no fsGroup ownership change from kubelet.
        path.chmod(0o777)
        try:
            self.api.create("/api/v1/persistentvolumes", volume)
            meta = claim["metadata"]
            log.info("provisioned %s for %s/%s", volume["metadata"]["name"], meta["namespace"], meta["name"])
        except ApiError as exc:
            if exc.status != 409:
                raise

    def _delete(self, volume: JSON) -> None:
        try:
            self.api.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")
        except ApiError as exc:
            if exc.status != 404:
                raise
        path = Path(volume["spec"]["hostPath"]["path"])
        if path.is_relative_to(self.root):
            shutil.rmtree(path, ignore_errors=True)
