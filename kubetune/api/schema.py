"""Building blocks for the API models: the base model, shared field types and validation rules.

Every cross-field rule is written once, as a :class:`Rule` holding both its CEL expression (emitted
into the CRD so the apiserver rejects bad objects at admission) and the equivalent Python predicate
(run by pydantic, so the operator, ``kubetune validate``-style tooling and unit tests agree with the
apiserver). The same table of bad manifests is checked against both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule with a CEL and a Python implementation.

    ``cel`` is evaluated by the apiserver with ``self`` bound to the model's object; ``check`` gets
    the validated pydantic model and returns True when the object is valid. ``field_path`` (relative
    JSONPath such as ``.lora``) makes the apiserver report the error against that field.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    reason: str | None = None

    def to_crd(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Immutable:
    """Marks a model whose fields (except ``mutable``) may not change once the object exists.

    Emitted as CEL transition rules (``oldSelf``); the apiserver enforces them on update. There is
    no Python twin: a single object carries no history.
    """

    mutable: frozenset[str] = field(default_factory=frozenset)
    path: str = "spec"


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected, rules enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        protected_namespaces=(),
        validate_default=False,
    )

    # Cross-field rules of this object, emitted as x-kubernetes-validations.
    rules: ClassVar[tuple[Rule, ...]] = ()
    # Set on spec models whose fields are immutable after creation.
    immutable: ClassVar[Immutable | None] = None

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        # Prefixed with the rule's field, as the apiserver does, so the error names the field.
        failed = [
            f"{rule.field_path.lstrip('.')}: {rule.message}" if rule.field_path else rule.message
            for rule in type(self).rules
            if not rule.check(self)
        ]
        if failed:
            raise ValueError("; ".join(failed))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The object as it appears on the wire (camelCase, unset optionals omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# A Kubernetes resource quantity ("500m", "2", "16Gi"), integer or string on the wire as in core/v1.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _coerce_quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a quantity must be a number or a string such as 500m or 16Gi")
    if isinstance(value, int | float):
        value = str(value)
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 16Gi)")
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_coerce_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

# Storage URIs the operator and worker understand. No `..` segment may appear (checked by a rule),
# so a pvc:// or file:// URI cannot escape its claim or directory.
URI_PATTERN = (
    r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^\s]*)?"
    r"|file:///[^\s]*)$"
)
_URI_RE = re.compile(URI_PATTERN)
_DOTDOT_RE = re.compile(r"(^|/)\.\.(/|$)")
URI_SCHEMES = ("hf", "s3", "pvc", "file")


def _check_uri(value: Any) -> Any:
    if isinstance(value, str):
        if not _URI_RE.match(value):
            raise ValueError(
                f"{value!r} is not a supported URI: use hf://org/name, s3://bucket/key, "
                "pvc://claim/path or file:///abs/path"
            )
        if _DOTDOT_RE.search(value):
            raise ValueError(f"{value!r} must not contain '..' path segments")
    return value


# CEL twin of the `..` check above; RE2 (the apiserver's regex engine) has no lookahead, so the
# pattern alone cannot express it.
NO_DOTDOT_CEL = "!self.matches('(^|/)[.][.](/|$)')"

Uri = Annotated[
    str,
    BeforeValidator(_check_uri),
    Field(max_length=1024),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 1024,
            "pattern": URI_PATTERN,
            "x-kubernetes-validations": [
                {"rule": NO_DOTDOT_CEL, "message": "must not contain '..' path segments"}
            ],
        }
    ),
]

# A DNS-1123 label: names of Kubernetes objects we refer to (Secrets, FineTuneJobs, claims).
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS1123_SUBDOMAIN)]
