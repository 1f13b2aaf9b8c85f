"""Admitted => runnable: every FineTuneJob the CRD admits renders into a plan the worker accepts.

Specs are generated from the CRD's own ``openAPIV3Schema`` (``crds/``, what the apiserver checks)
with hypothesis-jsonschema. The apiserver also runs the CEL rules; their Python twins
(``kubetune.api.schema.Rule.check``, held equal to the CEL by tests/api/test_admission.py) decide
which generated specs it would refuse, and only those are dropped. Everything else must:

- parse as the operator's :class:`~kubetune.api.v1alpha1.FineTuneJob` (a field the schema admits
  but the model refuses would fail the job after admission);
- render (:func:`kubetune.operator.render.training_plan`) into a plan that survives the JSON trip
  through the worker's :func:`~kubetune.worker.plan.load_plan`, and into the plan ConfigMap and
  worker Job (:mod:`kubetune.operator.builders`);
- render the same plan once the apiserver has filled in the schema's defaults: the CRD's defaults
  and the models' defaults are one set.

A bounded, derandomized run keeps it short and repeatable in ``make test``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from pydantic import ValidationError

from kubetune.api import v1alpha1
from kubetune.operator import builders
from kubetune.operator.render import training_plan
from kubetune.worker.plan import load_plan

CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"


def _openapi_spec_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural, as the apiserver reads it) to JSON Schema for generation.

    Unknown fields are pruned by the apiserver before anything sees them, so generated objects
    carry only declared properties; a free-form object (``x-kubernetes-preserve-unknown-fields``,
    core/v1 tolerations or env entries, passed through untouched) is generated empty.
    """
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: _to_json_schema(v)
        for k, v in node.items()
        if not k.startswith("x-kubernetes-") and k not in ("description", "default", "example")
    }
    if node.get("x-kubernetes-preserve-unknown-fields") and "properties" not in node:
        return {"type": "object", "maxProperties": 0}
    if node.get("nullable"):
        out.pop("nullable")
        out = {"anyOf": [out, {"type": "null"}]}
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


#: Specs drawn from the schema alone are mostly refused by CEL rules (an hf:// output, a settings
#: block of another method). These draw, as well, from the part of the schema those rules admit, so
#: that most examples reach rendering; every draw stays within the schema.
_URIS = st.from_regex(
    r"(s3://[a-z0-9]{3,12}|pvc://[a-z0-9]{1,12}|file:///[a-z0-9]{1,12})(/[a-z0-9_-]{1,8}){0,3}",
    fullmatch=True,
)


def _hinted(
    path: tuple[str, ...], schema: dict[str, Any], drawn: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    if path[-1:] == ("uri",) and schema.get("type") == "string":
        return st.one_of(_URIS, drawn)
    if path == ("method",):
        # Which blocks each method reads, from the CRD's own rules on method (``!has(self.lora) ||
        # self.type in ['lora', 'qlora']``).
        users = {
            match["block"]: set(re.findall(r"'(\w+)'", match["types"]))
            for rule in SPEC_SCHEMA["properties"]["method"].get("x-kubernetes-validations") or []
            if (
                match := re.fullmatch(
                    r"!has\(self\.(?P<block>\w+)\) \|\| self\.type in \[(?P<types>.*)\]", rule["rule"]
                )
            )
        }
        blocks = {k: _strategy(v, (*path, k)) for k, v in schema["properties"].items() if k in users}

        def of_type(name: str) -> st.SearchStrategy[Any]:
            used = {b: blocks[b] for b in blocks if name in users[b]}
            return st.fixed_dictionaries({"type": st.just(name)}, optional=used)

        return st.one_of(st.sampled_from(schema["properties"]["type"]["enum"]).flatmap(of_type), drawn)
    return drawn


def _strategy(schema: dict[str, Any], path: tuple[str, ...] = ()) -> st.SearchStrategy[Any]:
    """Objects and arrays composed here, leaves (strings with patterns and formats, bounded numbers,
    enums) by hypothesis-jsonschema: its own object strategy uses a Hypothesis internal that the
    pinned Hypothesis no longer has (``many.more``)."""
    return _hinted(path, schema, _drawn(schema, path))


def _drawn(schema: dict[str, Any], path: tuple[str, ...]) -> st.SearchStrategy[Any]:
    if "anyOf" in schema and any(b.get("type") in ("object", "array") for b in schema["anyOf"]):
        return st.one_of([_strategy(b, path) for b in schema["anyOf"]])
    if schema.get("type") == "object":
        properties = schema.get("properties") or {}
        if not properties:
            values = schema.get("additionalProperties")
            if not isinstance(values, dict):
                return st.just({})
            keys = from_schema(schema.get("propertyNames") or {"type": "string", "maxLength": 16})
            return st.dictionaries(
                keys, _strategy(values, (*path, "*")), max_size=min(schema.get("maxProperties", 3), 3)
            )
        required = set(schema.get("required") or [])
        return st.fixed_dictionaries(
            {k: _strategy(v, (*path, k)) for k, v in properties.items() if k in required},
            optional={k: _strategy(v, (*path, k)) for k, v in properties.items() if k not in required},
        )
    if schema.get("type") == "array":
        return st.lists(
            _strategy(schema.get("items") or {}, (*path, "[]")),
            min_size=schema.get("minItems", 0),
            max_size=min(schema.get("maxItems", 3), max(schema.get("minItems", 0), 3)),
            unique=bool(schema.get("uniqueItems")),
        )
    return from_schema(schema)


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The apiserver's defaulting: absent properties that have a default get it, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_defaults(sub, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_apply_defaults(schema["items"], item) for item in value]
    return value


def _cel_messages(node: Any) -> set[str]:
    """Messages of the CRD's CEL rules, transition rules (``oldSelf``: updates only) aside."""
    found: set[str] = set()
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations") or []:
            if "oldSelf" not in rule["rule"]:
                found.add(rule["message"])
        for value in node.values():
            found |= _cel_messages(value)
    elif isinstance(node, list):
        for value in node:
            found |= _cel_messages(value)
    return found


def _refused_by_cel(error: ValidationError) -> bool:
    """Whether every error is a CEL rule's (the apiserver would have refused the object too)."""
    messages = CEL_MESSAGES
    return all(any(m in problem["msg"] for m in messages) for problem in error.errors())


def _names() -> st.SearchStrategy[str]:
    # metadata is not in the CRD's schema: the apiserver checks a DNS-1123 subdomain; the CEL rules
    # then bound it (length, as a child name prefix) and are applied below.
    return st.from_regex(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", fullmatch=True)


SPEC_SCHEMA = _openapi_spec_schema()
INT32_MAX = 2**31 - 1
#: batch/v1 JobSpec fields that are int32: the apiserver refuses a Job with a larger value.
INT32_JOB_FIELDS = ("backoffLimit", "ttlSecondsAfterFinished", "completions", "parallelism")
CEL_MESSAGES = tuple(sorted(_cel_messages(yaml.safe_load(CRD.read_text()))))


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(spec=_strategy(_to_json_schema(SPEC_SCHEMA)), name=_names())
def test_every_admitted_finetunejob_renders_into_a_plan_the_worker_accepts(
    spec: dict[str, Any], name: str
) -> None:
    obj = {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "uid": "0000-uid", "generation": 1},
        "spec": spec,
    }
    try:
        job = v1alpha1.FineTuneJob.model_validate(obj)
    except ValidationError as error:
        if _refused_by_cel(error):
            return  # the apiserver refuses it at admission: never reaches the operator
        raise AssertionError(
            f"the CRD admits a spec the operator cannot parse: {error}\n{json.dumps(spec)}"
        ) from None

    plan = training_plan(job)
    assert load_plan(plan.model_dump_json()) == plan
    configmap = builders.plan_configmap(job, plan)
    assert load_plan(configmap["data"][builders.PLAN_KEY]) == plan
    worker = builders.worker_job(job, builders.WorkerSettings())
    for field in INT32_JOB_FIELDS:  # what the apiserver checks of the Job the operator creates
        value = worker["spec"].get(field)
        assert value is None or 0 <= value <= INT32_MAX, f"Job spec.{field} {value} is not an int32"

    defaulted = v1alpha1.FineTuneJob.model_validate(
        {**obj, "spec": _apply_defaults(SPEC_SCHEMA, copy.deepcopy(spec))}
    )
    assert training_plan(defaulted) == plan, "the CRD's defaults and the models' differ"
