"""The controllers' shared kube helpers, without a cluster.

Aspects:
- a child is ours only when its controller ownerReference carries our uid: another uid, no
  controller, or a mere (non-controller) reference is a conflict with a message naming both;
- the applied-manifest hash ignores key order and its own annotation, so a stamped child is current
  for the manifest it came from and stale for any other;
- a failed request is transient (a delay, the apiserver's Retry-After when it gives one) only when
  another attempt may succeed: unreachable, throttled, conflicting, or a 5xx.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from kubetune.operator import kube


def _child(*references: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "Job", "metadata": {"name": "x-train", "ownerReferences": list(references)}}


def test_only_our_uid_is_ours() -> None:
    ours = kube.owner_reference("FineTuneJob", SimpleNamespace(name="x", uid="uid-1"))
    assert ours["controller"] is True and ours["uid"] == "uid-1"
    assert kube.ownership_problem(None, "FineTuneJob", "uid-1") is None
    assert kube.ownership_problem(_child(ours), "FineTuneJob", "uid-1") is None

    stale = kube.ownership_problem(_child({**ours, "uid": "uid-0"}), "FineTuneJob", "uid-1")
    assert stale is not None and "uid uid-0" in stale and "uid-1" in stale and "x-train" in stale
    orphan = kube.ownership_problem(_child(), "FineTuneJob", "uid-1")
    assert orphan is not None and "has no controller" in orphan
    assert kube.ownership_problem(_child({**ours, "controller": False}), "FineTuneJob", "uid-1")


def test_applied_hash_marks_what_was_applied() -> None:
    desired = {"kind": "ConfigMap", "metadata": {"name": "p", "labels": {"a": "1"}}, "data": {"k": "v"}}
    reordered = {"data": {"k": "v"}, "metadata": {"labels": {"a": "1"}, "name": "p"}, "kind": "ConfigMap"}
    assert kube.applied_hash(desired) == kube.applied_hash(reordered)

    existing = kube.stamped(desired)
    assert existing["metadata"]["annotations"][kube.ANNOTATION_APPLIED] == kube.applied_hash(desired)
    assert kube.applied_hash(existing) == kube.applied_hash(desired)
    assert kube.is_current(existing, desired)
    assert not kube.is_current(existing, {**desired, "data": {"k": "w"}})
    assert not kube.is_current(None, desired)
    assert "annotations" not in desired["metadata"]  # stamping copies


def test_transient_failures_get_a_delay_others_none() -> None:
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import MaxRetryError

    throttled = ApiException(status=429)
    throttled.headers = {"Retry-After": "7"}
    assert kube.transient_delay(throttled) == 7.0
    assert kube.transient_delay(ApiException(status=503)) == kube.TRANSIENT_RETRY_S
    assert kube.transient_delay(ApiException(status=409)) == kube.TRANSIENT_RETRY_S
    assert kube.transient_delay(MaxRetryError(None, "/", "connection refused")) == kube.TRANSIENT_RETRY_S
    assert kube.transient_delay(ConnectionRefusedError()) == kube.TRANSIENT_RETRY_S
    # Retrying the same request cannot fix these.
    assert kube.transient_delay(ApiException(status=403)) is None
    assert kube.transient_delay(ApiException(status=422)) is None
    assert kube.transient_delay(ValueError("a bug")) is None
