"""The generated CRDs on a real apiserver.

Aspects:
- the CRDs install and become Established;
- every example manifest and the base manifests are admitted, and schema defaults materialise;
- every bad manifest of the shared table is rejected at admission with a message naming its field;
- spec immutability: FineTuneJob only allows suspend to change, AdapterDeployment only forbids model;
- the scale subresource drives spec.replicas;
- `kubectl explain` shows the field documentation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import crdgen, v1alpha1
from kubetune.api.v1alpha1 import AdapterDeployment, FineTuneJob
from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.api.cases import BAD_CASES, BadCase, adapterdeployment, finetunejob

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLURALS = {r.kind_info["kind"]: r.kind_info["plural"] for r in (FineTuneJob, AdapterDeployment)}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def crds(cluster: ClusterHandle) -> None:
    crdgen.apply(cluster.api_client())


def _create(
    cluster: ClusterHandle, namespace: str, body: dict[str, Any], dry_run: bool = False
) -> dict[str, Any]:
    from kubernetes import client

    objects = client.CustomObjectsApi(cluster.api_client())
    kwargs: dict[str, Any] = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    result: dict[str, Any] = objects.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, PLURALS[body["kind"]], body, **kwargs
    )
    return result


def _patch(
    cluster: ClusterHandle, namespace: str, kind: str, name: str, patch: dict[str, Any]
) -> dict[str, Any]:
    from kubernetes import client

    objects = client.CustomObjectsApi(cluster.api_client())
    result: dict[str, Any] = objects.patch_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, PLURALS[kind], name, patch
    )
    return result


def _rejection(cluster: ClusterHandle, namespace: str, body: dict[str, Any]) -> str:
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as info:
        _create(cluster, namespace, body)
    assert info.value.status in (400, 422), info.value.body
    message: str = json.loads(info.value.body)["message"]
    return message


def test_examples_and_base_manifests_are_admitted(crds: None, cluster: ClusterHandle, namespace: str) -> None:
    documents = [finetunejob(), adapterdeployment()]
    for path in sorted(EXAMPLES.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for document in documents:
        _create(cluster, namespace, document, dry_run=True)


def test_defaults_materialise(crds: None, cluster: ClusterHandle, namespace: str) -> None:
    manifest = finetunejob()
    manifest["spec"]["method"] = {"type": "qlora"}
    del manifest["spec"]["training"]
    created = _create(cluster, namespace, manifest)
    spec = created["spec"]
    assert spec["training"]["learningRate"] == 2.0e-4
    assert spec["training"]["checkpointEverySteps"] == 200
    assert spec["suspend"] is False and spec["backoffLimit"] == 3
    assert "lora" not in spec["method"]  # qlora alone is valid; the worker applies NF4 defaults
    # What the apiserver stored parses with the models, unchanged.
    assert FineTuneJob.model_validate(created).to_dict()["spec"] == spec


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_rejected_naming_the_field(
    crds: None, cluster: ClusterHandle, namespace: str, case: BadCase
) -> None:
    message = _rejection(cluster, namespace, case.manifest())
    assert case.field in message, message
    assert case.says in message, message


def test_finetunejob_spec_is_immutable_except_suspend(
    crds: None, cluster: ClusterHandle, namespace: str
) -> None:
    from kubernetes.client.rest import ApiException

    _create(cluster, namespace, finetunejob("immutable"))
    for patch, field in [
        ({"spec": {"method": {"lora": {"rank": 8}}}}, "spec.method"),
        ({"spec": {"training": {"learningRate": 1e-3}}}, "spec.training"),
        ({"spec": {"image": "example/other:1"}}, "spec.image"),
    ]:
        with pytest.raises(ApiException) as info:
            _patch(cluster, namespace, "FineTuneJob", "immutable", patch)
        assert info.value.status == 422
        assert f"{field} is immutable" in json.loads(info.value.body)["message"]
    updated = _patch(cluster, namespace, "FineTuneJob", "immutable", {"spec": {"suspend": True}})
    assert updated["spec"]["suspend"] is True


def test_adapterdeployment_only_model_is_immutable(
    crds: None, cluster: ClusterHandle, namespace: str
) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    _create(cluster, namespace, adapterdeployment("serve"))
    with pytest.raises(ApiException) as info:
        _patch(
            cluster, namespace, "AdapterDeployment", "serve", {"spec": {"model": {"uri": "hf://org/other"}}}
        )
    assert "spec.model is immutable" in json.loads(info.value.body)["message"]

    updated = _patch(
        cluster,
        namespace,
        "AdapterDeployment",
        "serve",
        {"spec": {"routes": [], "adapters": [{"name": "legal", "uri": "s3://adapters/legal-v3"}]}},
    )
    assert [a["name"] for a in updated["spec"]["adapters"]] == ["legal"]

    objects = client.CustomObjectsApi(cluster.api_client())
    objects.patch_namespaced_custom_object_scale(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", "serve", {"spec": {"replicas": 3}}
    )
    current = objects.get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments", "serve"
    )
    assert current["spec"]["replicas"] == 3


def test_kubectl_explain_documents_fields(crds: None, cluster: ClusterHandle) -> None:
    def explained() -> str:
        proc = cluster.kubectl("explain", "finetunejob.spec.method", check=False)
        return proc.stdout if proc.returncode == 0 and "qlora" in proc.stdout else ""

    text = wait_for(explained, 30, interval=0.5, description="kubectl explain finetunejob.spec.method")
    assert "bottleneck adapters" in text and "quantization" in text
