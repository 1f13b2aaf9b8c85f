"""Pure builders of the objects a FineTuneJob owns: the plan ConfigMap and the worker Job.

No I/O here: each function maps (FineTuneJob, settings) to a manifest, so the handlers stay thin and
every rendering decision has a fast unit test. Names are deterministic (``<name>-plan``,
``<name>-train``) so creation is idempotent across operator restarts.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import distributed, kube
from kubetune.operator.config import WorkerSettings
from kubetune.operator.pods import LABEL_COMPONENT, LABEL_MANAGED_BY, pod_spec_with
from kubetune.operator.render import EPHEMERAL_WORK_DIR, PROGRESS_PORT, PVC_MOUNT_ROOT, claims_of
from kubetune.worker import plan as wp
from kubetune.worker.errors import ERROR_TYPES, PeerLost, Preempted

LABEL_FINETUNEJOB = "kubetune.dev/finetunejob"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
#: Pod-template labels copied onto the worker Job too: Kueue reads them from the Job.
KUEUE_LABELS = (LABEL_KUEUE_QUEUE, "kueue.x-k8s.io/priority-class")
PLAN_MOUNT = "/etc/kubetune"
PLAN_KEY = "plan.json"
CONTAINER = "worker"
#: The worker turns SIGTERM into a checkpoint and exits with this code: a retry resumes, so it must
#: not count against backoffLimit.
PREEMPTED_EXIT_CODE = Preempted.exit_code


def plan_configmap_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-plan"


def worker_job_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-train"


def rendezvous_service_name(job: FineTuneJob) -> str:
    return worker_job_name(job)


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    """Makes the child garbage-collected with its FineTuneJob."""
    return kube.owner_reference("FineTuneJob", job.metadata)


def queue_labels(job: FineTuneJob) -> dict[str, str]:
    """The Kueue labels of the user's pod template, which Kueue reads on the Job itself."""
    labels = job.spec.pod_template.labels if job.spec.pod_template else None
    return {key: value for key, value in (labels or {}).items() if key in KUEUE_LABELS}


def queued(job: FineTuneJob) -> bool:
    """Whether Kueue admits the worker Job (and so owns its ``spec.suspend`` after creation)."""
    return LABEL_KUEUE_QUEUE in queue_labels(job)


def child_labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {
        LABEL_FINETUNEJOB: str(job.metadata.name),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: "kubetune",
    }


def work_claim_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-work"


def work_claim(job: FineTuneJob, settings: WorkerSettings) -> dict[str, Any] | None:
    """The claim behind the work directory (checkpoints, staging) of a job whose output is not on a
    claim (s3://, file://): it outlives the worker pod, so the Job's next pod resumes from the last
    checkpoint. Owned by the FineTuneJob, so it goes with it. None for pvc:// outputs, whose work
    directory is beside the output on the same claim."""
    if job.spec.output.uri.startswith("pvc://"):
        return None
    spec: dict[str, Any] = {
        # Every node of a group reads and writes the same checkpoints.
        "accessModes": ["ReadWriteMany" if distributed.is_distributed(job) else "ReadWriteOnce"],
        "resources": {"requests": {"storage": settings.work_claim_size}},
    }
    if settings.work_storage_class:
        spec["storageClassName"] = settings.work_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": work_claim_name(job),
            "namespace": job.metadata.namespace,
            "labels": child_labels(job, "work"),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": spec,
    }


def plan_configmap(job: FineTuneJob, plan: wp.TrainingPlan) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan_configmap_name(job),
            "namespace": job.metadata.namespace,
            "labels": child_labels(job, "plan"),
            "ownerReferences": [owner_reference(job)],
        },
        "data": {PLAN_KEY: plan.model_dump_json(indent=2)},
    }


def rendezvous_service(job: FineTuneJob) -> dict[str, Any] | None:
    """The headless Service that gives each pod of a multi-node group its DNS name
    (``<job>-<index>.<service>``); None for one node."""
    if not distributed.is_distributed(job):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(job),
            "namespace": job.metadata.namespace,
            "labels": child_labels(job, "rendezvous"),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            # Names must resolve before pods are Ready: the rendezvous happens while they start.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_FINETUNEJOB: str(job.metadata.name), LABEL_COMPONENT: "worker"},
            "ports": [{"name": "rendezvous", "port": distributed.RENDEZVOUS_PORT}],
        },
    }


def _non_retryable_exit_codes() -> list[int]:
    return sorted({error.exit_code for error in ERROR_TYPES if not error.retryable})


def _resources(job: FineTuneJob) -> dict[str, Any]:
    spec = job.spec.resources
    amounts: dict[str, str] = {}
    if spec.cpu is not None:
        amounts["cpu"] = spec.cpu
    if spec.memory is not None:
        amounts["memory"] = spec.memory
    limits = dict(amounts)
    if spec.gpus_per_node:
        limits[spec.gpu_resource_name] = str(spec.gpus_per_node)
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def worker_job(job: FineTuneJob, settings: WorkerSettings) -> dict[str, Any]:
    """The batch/v1 Job that runs ``kubetune train`` on the rendered plan: one pod, or for
    ``resources.nodes > 1`` an Indexed Job whose pods join one torchrun group (:mod:`distributed`)."""
    spec = job.spec
    overrides = spec.pod_template
    labels = {**(overrides.labels if overrides and overrides.labels else {}), **child_labels(job, "worker")}

    volumes: list[dict[str, Any]] = [{"name": "plan", "configMap": {"name": plan_configmap_name(job)}}]
    mounts: list[dict[str, Any]] = [{"name": "plan", "mountPath": PLAN_MOUNT, "readOnly": True}]
    for index, claim in enumerate(claims_of(job)):
        volumes.append({"name": f"claim-{index}", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": f"claim-{index}", "mountPath": f"{PVC_MOUNT_ROOT}/{claim}"})
    if not spec.output.uri.startswith("pvc://"):
        volumes.append({"name": "work", "persistentVolumeClaim": {"claimName": work_claim_name(job)}})
        mounts.append({"name": "work", "mountPath": EPHEMERAL_WORK_DIR})

    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if overrides and overrides.env:
        env += overrides.env
    # Credentials reach the worker as environment variables from the user's Secrets; the values never
    # pass through the operator.
    env_from = [
        {"secretRef": {"name": secret}}
        for secret in dict.fromkeys(
            s
            for s in (
                spec.model.credentials_secret,
                spec.dataset.credentials_secret,
                spec.output.credentials_secret,
            )
            if s
        )
    ]

    command = ["python", "-m", "kubetune", "train", "--plan", f"{PLAN_MOUNT}/{PLAN_KEY}"]
    ports = [{"name": "progress", "containerPort": PROGRESS_PORT}]
    if distributed.is_distributed(job):
        command = distributed.launch_command(
            job, worker_job_name(job), rendezvous_service_name(job), command[1:]
        )
        ports.append({"name": "rendezvous", "containerPort": distributed.RENDEZVOUS_PORT})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "resources": _resources(job),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if env_from:
        container["envFrom"] = env_from

    pod_spec = pod_spec_with(
        [container],
        volumes,
        overrides,
        service_account=settings.service_account,
        image_pull_secrets=settings.image_pull_secrets,
        # Never, so that every retry is a new pod and the Job's podFailurePolicy can judge exit codes.
        restartPolicy="Never",
    )
    ignored_exit_codes = [PREEMPTED_EXIT_CODE]
    if distributed.is_distributed(job):
        # The Job controller names each pod <job>-<index>; the subdomain puts that name in DNS.
        pod_spec["subdomain"] = rendezvous_service_name(job)
        # A rank that lost its peer is not at fault: only the pod that failed first counts.
        ignored_exit_codes.append(PeerLost.exit_code)

    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        # The initial value only: after creation the reconciler toggles it under its own field
        # manager, and not at all for a queued Job, whose suspend belongs to Kueue (docs/operator.md).
        "suspend": spec.suspend,
        "podFailurePolicy": {
            "rules": [
                # Evictions and preemptions are not the job's fault: retry without counting.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": sorted(ignored_exit_codes),  # the apiserver wants them ascending
                    },
                },
                # A bad dataset or a missing model fails the same way every time: stop at once.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": _non_retryable_exit_codes(),
                    },
                },
            ]
        },
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": dict(overrides.annotations) if overrides and overrides.annotations else {},
            },
            "spec": pod_spec,
        },
    }
    if distributed.is_distributed(job):
        job_spec.update(distributed.indexed_job_fields(job))
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": worker_job_name(job),
            "namespace": job.metadata.namespace,
            "labels": {**queue_labels(job), **child_labels(job, "worker")},
            "ownerReferences": [owner_reference(job)],
        },
        "spec": job_spec,
    }
