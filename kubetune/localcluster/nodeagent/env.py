"""A container's environment, resolved the way kubelet resolves it.

Order: ``envFrom`` sources, then ``env`` entries (later entries win, and ``$(NAME)``
references expand against what was defined before them), then the service variables for the
apiserver so in-cluster configuration works. ``$(NAME)`` in ``command``/``args`` expands
against the final environment; ``$$`` escapes a literal ``$``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from decimal import ROUND_CEILING, Decimal
from typing import Any

JSON = dict[str, Any]
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class EnvError(Exception):
    """A required reference (ConfigMap, Secret, key) is missing: kubelet reports
    ``CreateContainerConfigError`` and retries."""


def expand(value: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _REF.sub(sub, value)


def field_ref(pod: JSON, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs", [])),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs", [])),
    }
    if path in simple:
        return simple[path] or ""
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise EnvError(f"unsupported fieldRef {path!r}")


_SUFFIXES: dict[str, int | Decimal] = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def parse_quantity(quantity: str) -> Decimal:
    for suffix, factor in _SUFFIXES.items():
        if quantity.endswith(suffix):
            return Decimal(quantity[: -len(suffix)]) * Decimal(factor)
    return Decimal(quantity)


def resource_field_ref(container: JSON, ref: JSON) -> str:
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(resource) or resources.get("limits", {}).get(resource)
    if value is None:
        return "0"
    divisor = parse_quantity(str(ref.get("divisor", "1")))
    # kubelet rounds up so a container never sees less than it asked for.
    return str((parse_quantity(str(value)) / divisor).to_integral_value(rounding=ROUND_CEILING))


def container_env(
    pod: JSON,
    container: JSON,
    *,
    get_object: Callable[[str, str], JSON | None],
    base_env: Mapping[str, str],
    service_env: Mapping[str, str],
) -> dict[str, str]:
    """The environment for ``container``. ``get_object(kind, name)`` reads a ConfigMap or
    Secret in the pod's namespace (None when absent)."""

    def data_of(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        obj = get_object(kind, name)
        if obj is None:
            if optional:
                return None
            raise EnvError(f'{kind} "{name}" not found')
        if kind == "secret":
            return {
                k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()
            }
        return dict(obj.get("data") or {})

    env: dict[str, str] = dict(base_env)
    env.update(service_env)
    for source in container.get("envFrom", []):
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key in source:
                ref = source[key]
                data = data_of(kind, ref["name"], ref.get("optional", False)) or {}
                prefix = source.get("prefix", "")
                env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_ref(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_field_ref(container, source["resourceFieldRef"])
        else:
            for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
                if key in source:
                    ref = source[key]
                    key_data = data_of(kind, ref["name"], ref.get("optional", False))
                    if key_data is None:
                        break
                    if ref["key"] not in key_data:
                        if ref.get("optional", False):
                            break
                        where = f"{pod['metadata']['namespace']}/{ref['name']}"
                        raise EnvError(f"couldn't find key {ref['key']} in {kind} {where}")
                    env[name] = key_data[ref["key"]]
    return env


def container_command(container: JSON, env: Mapping[str, str]) -> tuple[list[str] | None, list[str] | None]:
    """``command`` and ``args`` with ``$(NAME)`` expanded; None where the image's ENTRYPOINT or CMD
    applies."""
    command, args = container.get("command"), container.get("args")
    return (
        [expand(a, env) for a in command] if command else None,
        [expand(a, env) for a in args] if args else None,
    )
