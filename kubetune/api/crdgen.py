"""Generates the CustomResourceDefinitions from the API models (``kubetune crds``).

pydantic produces a JSON Schema (2020-12 flavoured); Kubernetes wants a *structural* OpenAPI v3
schema: no ``$ref``, no nullable unions, ``exclusiveMinimum`` as a boolean, free-form objects marked
``x-kubernetes-preserve-unknown-fields``, and cross-field rules as CEL ``x-kubernetes-validations``.
This module does that translation, then adds printer columns, subresources and transition
(immutability) rules.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api import v1alpha1
from kubetune.api.schema import ApiModel

# Keys pydantic emits that mean nothing to (or are rejected by) the apiserver.
_DROP_KEYS = {"title", "$defs", "discriminator"}


def _model_classes() -> dict[str, type[ApiModel]]:
    """Every ApiModel subclass by class name: pydantic names its $defs after the class."""
    found: dict[str, type[ApiModel]] = {}
    stack: list[type[ApiModel]] = [ApiModel]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            stack.append(sub)
    return found


class _Converter:
    def __init__(self, root_schema: dict[str, Any]) -> None:
        self.defs: dict[str, Any] = root_schema.get("$defs", {})
        self.classes = _model_classes()

    def convert(self, node: dict[str, Any], *, in_status: bool = False) -> dict[str, Any]:
        node = copy.deepcopy(node)
        model_cls: type[ApiModel] | None = None

        # A reference, possibly with sibling keywords (description, default) that take precedence.
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            model_cls = self.classes.get(name)
            node = {**self.defs[name], **node}
        if "allOf" in node and len(node["allOf"]) == 1:
            inner = node.pop("allOf")[0]
            return self.convert({**inner, **node}, in_status=in_status)

        # Optional[X] is anyOf [X, null]: a missing field means unset, so keep only X.
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            options = [o for o in node["anyOf"] if o.get("type") != "null"]
            if len(options) == 1:
                del node["anyOf"]
                merged = {**options[0], **{k: v for k, v in node.items() if k != "default" or v is not None}}
                if merged.get("default", "") is None:
                    del merged["default"]
                return self.convert(merged, in_status=in_status)

        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP_KEYS:
                continue
            if key == "default" and (value is None or in_status):
                continue
            if key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[bound] = value
                out[key] = True
            elif key == "properties":
                out["properties"] = {
                    prop: self.convert(sub, in_status=in_status) for prop, sub in value.items()
                }
            elif key == "items":
                out["items"] = self.convert(value, in_status=in_status)
            elif key == "additionalProperties":
                if value is True or value == {}:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif isinstance(value, dict):
                    out["additionalProperties"] = self.convert(value, in_status=in_status)
                # `False` (extra="forbid") is implied: structural schemas prune unknown fields.
            elif key == "anyOf":
                out["anyOf"] = [{k: v for k, v in o.items() if k != "title"} for o in value]
            else:
                out[key] = value

        if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True

        if model_cls is not None:
            self._add_rules(out, model_cls)
        return out

    @staticmethod
    def _add_rules(out: dict[str, Any], model_cls: type[ApiModel]) -> None:
        validations = [rule.to_crd() for rule in model_cls.rules]
        immutable = model_cls.immutable
        if immutable is not None:
            for prop in out.get("properties", {}):
                if prop in immutable.mutable:
                    continue
                validations.append(
                    {
                        # Written to also catch adding or removing an optional field.
                        "rule": f"has(self.{prop}) == has(oldSelf.{prop}) && "
                        f"(!has(self.{prop}) || self.{prop} == oldSelf.{prop})",
                        "message": f"{immutable.path}.{prop} is immutable",
                        "fieldPath": f".{prop}",
                        "reason": "FieldValueForbidden",
                    }
                )
        if validations:
            out["x-kubernetes-validations"] = validations


def _default_empty_objects(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Give sub-objects built by ``default_factory`` a ``default: {}`` (or ``[]``).

    The apiserver then materialises them and fills their own defaults, so ``kubectl get -o yaml``
    shows the effective settings (learning rate, batch size...) instead of nothing.
    """
    props = schema.get("properties", {})
    for name, info in model.model_fields.items():
        alias = info.alias or name
        if alias not in props or info.default_factory is None:
            continue
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            props[alias]["default"] = {}
            annotation = type(value)
            _default_empty_objects(props[alias], annotation)
        elif isinstance(value, list | dict):
            props[alias]["default"] = value


def openapi_schema(resource: type[ApiModel]) -> dict[str, Any]:
    """The structural openAPIV3Schema of a top-level resource model."""
    raw = resource.model_json_schema(by_alias=True, mode="validation")
    converter = _Converter(raw)
    spec_field = resource.model_fields["spec"]
    status_field = resource.model_fields["status"]
    spec_schema = converter.convert(raw["properties"]["spec"])
    spec_model = spec_field.annotation
    assert isinstance(spec_model, type) and issubclass(spec_model, ApiModel)
    _default_empty_objects(spec_schema, spec_model)
    status_schema = converter.convert(raw["properties"]["status"], in_status=True)
    del status_field  # status gets no defaults: it is written by the operator only
    schema: dict[str, Any] = {
        "type": "object",
        "description": (resource.__doc__ or "").strip().replace("\n    ", " "),
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is a string value representing the REST resource.",
            },
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    if resource.rules:
        schema["x-kubernetes-validations"] = [rule.to_crd() for rule in resource.rules]
    return schema


def crd_for(resource: type[ApiModel]) -> dict[str, Any]:
    """The complete apiextensions.k8s.io/v1 CustomResourceDefinition of a resource model."""
    info: dict[str, Any] = resource.kind_info  # type: ignore[attr-defined]
    subresources: dict[str, Any] = {"status": {}}
    if "scale" in info:
        subresources["scale"] = info["scale"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info['plural']}.{v1alpha1.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": v1alpha1.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info["kind"],
                "listKind": f"{info['kind']}List",
                "plural": info["plural"],
                "singular": info["singular"],
                "shortNames": info["shortNames"],
                "categories": info["categories"],
            },
            "versions": [
                {
                    "name": v1alpha1.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": info["printerColumns"],
                    "schema": {"openAPIV3Schema": openapi_schema(resource)},
                }
            ],
        },
    }


HEADER = "# Generated by `kubetune crds` from kubetune/api/v1alpha1.py. Do not edit.\n"


def render_all() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    files: dict[str, str] = {}
    for resource in v1alpha1.RESOURCES:
        crd = crd_for(resource)
        name = f"{crd['spec']['group']}_{crd['spec']['names']['plural']}.yaml"
        files[name] = HEADER + yaml.safe_dump(crd, sort_keys=False, width=100, allow_unicode=True)
    return files


def write(output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = output / name
        path.write_text(text)
        written.append(path)
    return written


# Where the same files are written: the repository's crds/ and the Helm chart's copy.
DEFAULT_OUTPUTS = (Path("crds"), Path("charts/kubetune/crds"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        action="append",
        help="directory to write; repeatable (default: crds and charts/kubetune/crds)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the files in --output differ from the models"
    )


def stale_files(output: Path) -> list[Path]:
    """Files under ``output`` that differ from (or are missing against) the models."""
    rendered = render_all()
    stale = [
        output / name
        for name, text in rendered.items()
        if not (output / name).exists() or (output / name).read_text() != text
    ]
    stale += [p for p in sorted(output.glob("*.yaml")) if p.name not in rendered]
    return stale


def run(args: argparse.Namespace) -> int:
    outputs: list[Path] = args.output or list(DEFAULT_OUTPUTS)
    if args.check:
        stale = [path for output in outputs for path in stale_files(output)]
        for path in stale:
            print(f"{path} is out of date: run `make crds`")
        return 1 if stale else 0
    for output in outputs:
        for path in write(output):
            print(f"wrote {path}")
    return 0


def apply(api_client: Any, *, timeout: float = 60.0) -> None:
    """Create or replace the CRDs on a cluster and wait until they are Established and served.

    For tests and ``make demo``; production installs use the Helm chart or ``kubectl apply``.
    """
    import time

    from kubernetes import client
    from kubernetes.client.rest import ApiException

    extensions = client.ApiextensionsV1Api(api_client)
    objects = client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + timeout
    for text in render_all().values():
        body = yaml.safe_load(text)
        name = body["metadata"]["name"]
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as error:
            if error.status != 409:
                raise
            current = extensions.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version  # type: ignore[union-attr]
            extensions.replace_custom_resource_definition(name, body)
        plural = body["spec"]["names"]["plural"]
        while True:
            crd = extensions.read_custom_resource_definition(name)
            established = any(
                c.type == "Established" and c.status == "True"
                for c in (crd.status.conditions or [])  # type: ignore[union-attr]
            )
            if established:
                try:
                    # Established can precede the first served request by a moment.
                    objects.list_cluster_custom_object(v1alpha1.GROUP, v1alpha1.VERSION, plural, limit=1)
                    break
                except ApiException:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established within {timeout:g}s")
            time.sleep(0.2)
