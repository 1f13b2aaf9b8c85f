"""The FineTuneJob planner check: spec -> ``status.plan`` and the Feasible condition, before any Job.

Pure except :func:`plan_for`, which reads the base model's ``config.json`` first
(:func:`kubetune.planner.job.read_model_config`: file:// paths on the operator's host, hf:// through
huggingface_hub's cache, config.json only). The reconciler calls
:func:`assess` on every pass; an infeasible job gets ``Feasible=False`` with what it needs, what is
available and what would fit, and no worker Job. The annotation ``kubetune.dev/skip-feasibility:
"true"`` runs it anyway: Feasible stays True with reason ``FeasibilityCheckSkipped`` (and so an
Event records the bypass). When the config cannot be read, the job runs unchecked and the condition
says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.planner.architecture import ConfigError
from kubetune.planner.job import (
    ModelConfigUnavailable,
    PlannerSettings,
    facts_for,
    gpu_type_of,
    quantity_bytes,
    read_model_config,
)
from kubetune.planner.plan import format_bytes, plan_job

__all__ = [
    "SKIP_ANNOTATION",
    "Assessment",
    "ModelConfigUnavailable",
    "PlannerSettings",
    "assess",
    "facts_for",
    "gpu_type_of",
    "plan_for",
    "quantity_bytes",
    "read_model_config",
]

#: Set to "true" to create the worker Job even when the planner says it does not fit.
SKIP_ANNOTATION = "kubetune.dev/skip-feasibility"


@dataclass(frozen=True)
class Assessment:
    """What the planner concluded: ``plan`` for status.plan (or None), the Feasible condition's parts,
    and whether the worker Job may be created."""

    plan: dict[str, Any] | None
    feasible: bool
    reason: str
    message: str

    @property
    def launch(self) -> bool:
        return self.feasible


def assess(
    job: FineTuneJob, config: dict[str, Any] | None, unavailable: str, settings: PlannerSettings
) -> Assessment:
    """Plan ``job`` given its model ``config`` (None: ``unavailable`` says why)."""
    if config is None:
        return Assessment(
            None,
            True,
            "ModelConfigUnavailable",
            f"not planned, the job runs unchecked: {unavailable}",
        )
    try:
        plan = plan_job(facts_for(job, config, settings))
    except (ConfigError, ValueError) as error:
        return Assessment(
            None, True, "ModelConfigUnavailable", f"not planned, the job runs unchecked: {error}"
        )
    status = plan.status()
    status["modelConfig"] = job.spec.model.uri
    chosen = plan.chosen
    needed = format_bytes(chosen.memory.total)
    if plan.facts.available_bytes is None:
        where = "CPU training" if not plan.facts.setup.on_gpu else "no resources.gpuMemory or known GPU type"
        return Assessment(status, True, "MemoryNotChecked", f"estimated peak {needed} per worker ({where})")
    available = format_bytes(plan.facts.available_bytes)
    if chosen.fits:
        return Assessment(status, True, "Fits", f"estimated peak {needed} of {available} per GPU")
    if (job.metadata.annotations or {}).get(SKIP_ANNOTATION, "").lower() == "true":
        return Assessment(
            status,
            True,
            "FeasibilityCheckSkipped",
            f"{SKIP_ANNOTATION}: running although the estimated peak {needed} exceeds {available} per GPU",
        )
    return Assessment(status, False, "InsufficientGpuMemory", plan.recommendation)


def plan_for(job: FineTuneJob, settings: PlannerSettings) -> Assessment:
    """Read the job's model config and assess the job (the reconciler's one call)."""
    try:
        config = read_model_config(job.spec.model.uri, job.spec.model.revision, settings)
    except ModelConfigUnavailable as error:
        return assess(job, None, str(error), settings)
    return assess(job, config, "", settings)
