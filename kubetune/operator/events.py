"""Kubernetes Events for condition transitions, shared by both controllers.

Conditions are the authority; an Event is their history in ``kubectl describe`` and ``kubectl get
events``. A pass that writes a status posts one Event per condition whose status or reason changed
(:func:`transitions`, pure). Events go through kopf's poster, which sends them from its event loop
in the background: a pass never waits for them, and a failed post is retried by kopf, not by the
pass.

An Event is a ``Warning`` when the condition now says something is wrong (:func:`is_warning`),
``Normal`` otherwise; its reason is the condition's CamelCase reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

logger = logging.getLogger("kubetune.operator")

NORMAL = "Normal"
WARNING = "Warning"

#: Condition types whose True status is the abnormal one.
ABNORMAL_WHEN_TRUE = frozenset({"Failed", "Degraded"})
#: Condition types whose False status is the abnormal one, whatever the reason.
ABNORMAL_WHEN_FALSE = frozenset({"Feasible"})
#: Reasons that are a problem on any condition: a child someone else owns.
WARNING_REASONS = frozenset({"ChildConflict", "PlanInvalid", "Unsupported"})


@dataclass(frozen=True)
class Transition:
    """One Event to post: ``type`` is Normal or Warning, ``reason`` CamelCase."""

    type: str
    reason: str
    message: str


def is_warning(condition: Mapping[str, Any]) -> bool:
    """Whether a condition in this state reports a problem."""
    kind, true = condition.get("type"), condition.get("status") == "True"
    return (
        (kind in ABNORMAL_WHEN_TRUE and true)
        or (kind in ABNORMAL_WHEN_FALSE and not true)
        or condition.get("reason") in WARNING_REASONS
    )


def transitions(
    previous: Iterable[Mapping[str, Any]], current: Iterable[Mapping[str, Any]]
) -> list[Transition]:
    """The Events for going from ``previous`` to ``current`` conditions (wire form).

    A condition changes when its status or its reason does. A condition seen for the first time
    counts when it is True or a warning: the False conditions every object starts with (Succeeded
    False, InProgress) say nothing yet.
    """
    before = {c.get("type"): c for c in previous}
    events = []
    for condition in current:
        old = before.get(condition.get("type"))
        if old is None:
            if condition.get("status") != "True" and not is_warning(condition):
                continue
        elif (old.get("status"), old.get("reason")) == (condition.get("status"), condition.get("reason")):
            continue
        message = f"{condition.get('type')} is {condition.get('status')}"
        if condition.get("message"):
            message += f": {condition['message']}"
        events.append(
            Transition(
                type=WARNING if is_warning(condition) else NORMAL,
                reason=str(condition.get("reason") or condition.get("type")),
                message=message[:1024],
            )
        )
    return events


def post(obj: Mapping[str, Any], events: Iterable[Transition]) -> None:
    """Queue ``events`` about ``obj`` (wire form, with apiVersion, kind and metadata) on kopf's poster.

    Outside a running kopf operator (a pass called from a test or a script) there is no poster:
    the events are logged instead.
    """
    import kopf

    body = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: (obj.get("metadata") or {}).get(k) for k in ("name", "namespace", "uid")},
    }
    for event in events:
        try:
            kopf.event(cast(kopf.Body, body), type=event.type, reason=event.reason, message=event.message)
        except LookupError:  # kopf's context variables: no operator is running
            logger.info("event %s %s: %s", event.type, event.reason, event.message)
