"""Operator-wide settings, fixed at start-up from the command line; both controllers read them."""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune.planner.job import PlannerSettings


@dataclass(frozen=True)
class WorkerSettings:
    """Operator-wide defaults for worker and serving pods (set from the operator's command line)."""

    image: str = "ghcr.io/kubetune/worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    #: Serving pods' image and pull policy; empty: the worker's (one image holds train and serve).
    server_image: str = ""
    server_image_pull_policy: str = ""
    #: Secret names for imagePullSecrets, used when the object's podTemplate names none.
    image_pull_secrets: tuple[str, ...] = ()
    #: ServiceAccounts for pods whose podTemplate names none; empty: the namespace's default.
    service_account: str = ""
    server_service_account: str = ""
    #: Size and StorageClass (empty: the cluster's default) of the claim a FineTuneJob whose output
    #: is not on a claim gets for its work directory (checkpoints), so a retry resumes.
    work_claim_size: str = "20Gi"
    work_storage_class: str = ""


@dataclass
class OperatorConfig:
    """Operator-wide settings, fixed at start-up."""

    worker: WorkerSettings = field(default_factory=WorkerSettings)
    #: Seconds to wait for a worker's /progress answer; a slow worker must not stall reconciles.
    progress_timeout_s: float = 1.0
    #: The planner's GPU table, utilisation and prices (docs/planner.md).
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    #: How replicas share the work (kopf peering); ``None``: standalone, one replica only.
    peering: PeeringConfig | None = None


@dataclass(frozen=True)
class PeeringConfig:
    """kopf peering between operator replicas: the one with the highest priority works, the others
    pause while its keep-alive record in the peering object is fresh (docs/operator.md, "Replicas")."""

    #: The KopfPeering (namespaced operator) or ClusterKopfPeering (cluster-wide) object's name.
    name: str
    #: Unique per replica: equal priorities pause every replica (kopf's guard against a tie).
    priority: int
    #: Seconds a replica's record counts as alive. A replica killed without a goodbye (SIGKILL, a
    #: lost node) is taken over only once its record expires, so this bounds the hand-over time;
    #: each replica renews its record 5-10 s before that (one PATCH per renewal).
    lifetime_s: int = 20
