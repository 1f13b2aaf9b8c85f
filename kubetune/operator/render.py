"""Pure builders from a FineTuneJob to what the worker runs.

``training_plan`` renders the worker contract (:class:`kubetune.worker.plan.TrainingPlan`) from the
API object. It is a pure function of the object, so the same FineTuneJob always yields the same
plan, and it has fast unit tests; the handlers that create Jobs call it.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from kubetune.api import methods
from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.worker import plan as wp

#: Where the worker pod mounts each referenced claim: ``pvc://claim/path`` -> ``<root>/claim/path``.
PVC_MOUNT_ROOT = "/mnt/pvc"
#: Work directory (checkpoints, staging, TensorBoard) when the output is not on a claim. The Job
#: mounts the FineTuneJob's own work claim here (builders.work_claim): it outlives the pod.
EPHEMERAL_WORK_DIR = "/var/lib/kubetune/work"
#: Port of the worker's /progress and /metrics server.
PROGRESS_PORT = 9400


def claims_of(job: FineTuneJob) -> list[str]:
    """PersistentVolumeClaims the job's URIs refer to, sorted, each once."""
    spec = job.spec
    uris = [spec.model.uri, spec.dataset.uri, spec.output.uri, spec.dataset.retention_uri]
    return sorted({u.removeprefix("pvc://").split("/", 1)[0] for u in uris if u and u.startswith("pvc://")})


def work_dir_for(job: FineTuneJob) -> str:
    """A directory that survives pod restarts when it can: beside a pvc:// output, on the same claim,
    so resume works after preemption or rescheduling."""
    output = job.spec.output.uri
    if output.startswith("pvc://"):
        claim, _, path = output.removeprefix("pvc://").partition("/")
        parent = PurePosixPath(PVC_MOUNT_ROOT, claim, path).parent
        return str(parent / f".kubetune-work-{job.metadata.name or 'job'}")
    return EPHEMERAL_WORK_DIR


def training_plan(job: FineTuneJob) -> wp.TrainingPlan:
    """The TrainingPlan a FineTuneJob's workers execute."""
    spec = job.spec
    method = spec.method
    # The settings blocks are the same models in the API and the plan: set blocks carry over as they
    # are, unset ones take the plan's defaults.
    method_fields: dict[str, object] = {"type": method.type}
    for block in methods.blocks():
        if getattr(method, block) is not None:
            method_fields[block] = getattr(method, block)

    training = spec.training
    labels = {
        key: value
        for key, value in {
            "kubetune.dev/namespace": job.metadata.namespace,
            "kubetune.dev/uid": job.metadata.uid,
            "kubetune.dev/generation": None
            if job.metadata.generation is None
            else str(job.metadata.generation),
        }.items()
        if value is not None
    }
    return wp.TrainingPlan(
        name=job.metadata.name or "finetune",
        labels=labels,
        model=wp.ModelSource(
            uri=spec.model.uri, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        ),
        dataset=wp.DatasetSource(
            uri=spec.dataset.uri,
            format=spec.dataset.format,
            eval_fraction=spec.dataset.eval_fraction,
            retention_uri=spec.dataset.retention_uri,
        ),
        method=wp.MethodSpec.model_validate(method_fields),
        training=wp.TrainingSettings(
            epochs=training.epochs,
            max_steps=training.max_steps,
            learning_rate=training.learning_rate,
            lr_scheduler=training.lr_scheduler,
            warmup_ratio=training.warmup_ratio,
            weight_decay=training.weight_decay,
            batch_size=training.batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            max_seq_length=training.max_seq_length,
            precision=training.precision,
            gradient_checkpointing=training.gradient_checkpointing,
            packing=training.packing,
            seed=training.seed,
            checkpoint_every_steps=training.checkpoint_every_steps,
        ),
        output=wp.OutputSpec(uri=spec.output.uri, work_dir=work_dir_for(job)),
        progress=wp.ProgressSpec(port=PROGRESS_PORT),
        storage=wp.StorageSpec(pvc_mount_root=PVC_MOUNT_ROOT),
    )
