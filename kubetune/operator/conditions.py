"""metav1.Condition bookkeeping both controllers share: conditions are the authority of their status."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: list[dict[str, Any]], desired: list[dict[str, Any]], generation: int | None, now: datetime
) -> list[dict[str, Any]]:
    """Stamp observedGeneration and keep lastTransitionTime while a condition's status is unchanged."""
    before = {c.get("type"): c for c in previous}
    merged = []
    for condition in desired:
        old = before.get(condition["type"])
        since = old.get("lastTransitionTime") if old and old.get("status") == condition["status"] else None
        merged.append(
            {
                **condition,
                "lastTransitionTime": since or rfc3339(now),
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return merged
