"""The generated CRDs.

Aspects:
- crds/ matches what the models generate (drift fails the build: run `make crds`);
- the schemas are structural: no $ref, no nullable unions, booleans for exclusive bounds;
- kubectl-facing details: short names, categories, printer columns, status and scale subresources,
  descriptions on every spec field;
- immutability transition rules cover every spec field except the mutable ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.api import crdgen
from kubetune.api.v1alpha1 import AdapterDeployment, FineTuneJob

ROOT = Path(__file__).resolve().parents[2]


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_committed_crds_match_the_models() -> None:
    """Both copies: crds/ and the Helm chart's."""
    for output in crdgen.DEFAULT_OUTPUTS:
        assert crdgen.stale_files(ROOT / output) == [], "stale CRDs: run `make crds`"


def test_schemas_are_structural() -> None:
    for resource in (FineTuneJob, AdapterDeployment):
        schema = crdgen.openapi_schema(resource)
        for path, node in _walk(schema):
            assert "$ref" not in node and "$defs" not in node, path
            assert not ("properties" in node and "additionalProperties" in node), path
            for bound in ("exclusiveMinimum", "exclusiveMaximum"):
                assert isinstance(node.get(bound, True), bool), path
            if "anyOf" in node:
                assert node.get("x-kubernetes-int-or-string") is True, path
            if "properties" in node or "items" in node:
                assert node.get("type") in ("object", "array"), path


def test_every_spec_field_is_described() -> None:
    for resource in (FineTuneJob, AdapterDeployment):
        spec = crdgen.openapi_schema(resource)["properties"]["spec"]
        for path, node in _walk(spec):
            for name, prop in node.get("properties", {}).items():
                assert prop.get("description"), f"{resource.__name__}.spec{path}.{name} has no description"


def test_kubectl_facing_metadata() -> None:
    ftj = crdgen.crd_for(FineTuneJob)
    assert ftj["spec"]["names"]["shortNames"] == ["ftj", "ftjs"]
    assert ftj["spec"]["names"]["categories"] == ["kubetune"]
    version = ftj["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]][:4] == [
        "Method",
        "Phase",
        "Progress",
        "Loss",
    ]
    assert version["subresources"] == {"status": {}}

    adep = crdgen.crd_for(AdapterDeployment)
    version = adep["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert {"Runtime", "Ready", "Adapters", "Endpoint"} <= {
        c["name"] for c in version["additionalPrinterColumns"]
    }


def _immutable_fields(resource: type) -> set[str]:
    spec = crdgen.openapi_schema(resource)["properties"]["spec"]
    return {
        rule["fieldPath"].lstrip(".")
        for rule in spec.get("x-kubernetes-validations", [])
        if "oldSelf" in rule["rule"]
    }


def test_immutability_rules() -> None:
    ftj_fields = set(crdgen.openapi_schema(FineTuneJob)["properties"]["spec"]["properties"])
    assert _immutable_fields(FineTuneJob) == ftj_fields - {"suspend"}
    assert _immutable_fields(AdapterDeployment) == {"model"}


def test_defaults_materialise_nested_objects() -> None:
    spec = crdgen.openapi_schema(FineTuneJob)["properties"]["spec"]["properties"]
    assert spec["training"]["default"] == {}
    assert spec["training"]["properties"]["learningRate"]["default"] == 2.0e-4
    assert "default" not in spec["method"]  # the method must be chosen


def test_check_mode_reports_drift(tmp_path: Path) -> None:
    import argparse

    crdgen.write(tmp_path)
    assert crdgen.run(argparse.Namespace(output=[tmp_path], check=True)) == 0
    (tmp_path / next(iter(crdgen.render_all()))).write_text("stale")
    assert crdgen.run(argparse.Namespace(output=[tmp_path], check=True)) == 1
    (tmp_path / "leftover.yaml").write_text("kind: Old")
    assert [p.name for p in crdgen.stale_files(tmp_path)][-1] == "leftover.yaml"
    assert (
        yaml.safe_load(crdgen.render_all()[next(iter(crdgen.render_all()))])["kind"]
        == "CustomResourceDefinition"
    )
