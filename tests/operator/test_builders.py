"""Pure builders of a FineTuneJob's children, without a cluster.

Aspects:
- deterministic names and owner references (garbage collection, idempotent creation);
- the plan ConfigMap holds the rendered plan the worker reads;
- the worker Job: command, mounts per claim, resources incl. GPUs, non-root security context,
  credentials only by Secret reference, podTemplate overrides, suspend/backoff/deadline passthrough,
  and a podFailurePolicy that fails fast on non-retryable worker exit codes and ignores preemption;
- the Job itself carries the Kueue labels of the pod template (queue name, priority class).
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator import builders
from kubetune.operator.render import training_plan
from kubetune.worker.errors import ERROR_TYPES
from kubetune.worker.plan import TrainingPlan
from tests.api.cases import finetunejob


def _job(**spec_updates: Any) -> FineTuneJob:
    manifest = finetunejob()
    manifest["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    manifest["spec"].update(spec_updates)
    return FineTuneJob.model_validate(manifest)


def test_plan_configmap_holds_the_rendered_plan() -> None:
    job = _job()
    configmap = builders.plan_configmap(job, training_plan(job))
    assert configmap["metadata"]["name"] == "support-lora-plan"
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    plan = TrainingPlan.model_validate(json.loads(configmap["data"]["plan.json"]))
    assert plan == training_plan(job)


def test_worker_job_shape() -> None:
    job = _job(backoffLimit=2, activeDeadlineSeconds=3600, suspend=True)
    manifest = builders.worker_job(job, builders.WorkerSettings(image="example/kubetune:1"))
    assert manifest["metadata"]["name"] == "support-lora-train"
    assert manifest["metadata"]["ownerReferences"][0] == {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "support-lora",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    spec = manifest["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["suspend"]) == (2, 3600, True)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "example/kubetune:1"
    assert container["command"][-2:] == ["--plan", "/etc/kubetune/plan.json"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/kubetune", "/mnt/pvc/adapters", "/mnt/pvc/datasets", "/tmp"}
    # The root filesystem is read-only; /tmp is the pod's scratch emptyDir.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"adapters", "datasets"}
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "2", "memory": "8Gi"},
    }


def test_gpus_credentials_and_overrides() -> None:
    job = _job(
        resources={"gpusPerNode": 2, "memory": "32Gi"},
        model={"uri": "hf://org/model", "credentialsSecret": "hf-token"},
        output={"uri": "s3://bucket/out", "credentialsSecret": "s3-creds"},
        image="example/custom:2",
        podTemplate={
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "priorityClassName": "batch-low",
            "labels": {"team": "a"},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
        },
    )
    manifest = builders.worker_job(job, builders.WorkerSettings())
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "example/custom:2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}, {"secretRef": {"name": "s3-creds"}}]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]
    assert not any("value" in e and "token" in e["value"].lower() for e in container["env"])
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["priorityClassName"] == "batch-low"
    assert manifest["spec"]["template"]["metadata"]["labels"]["team"] == "a"
    # The output is not on a claim: checkpoints go to an emptyDir work volume.
    assert any(v.get("emptyDir") == {} for v in pod["volumes"])


def test_pod_failure_policy_fails_fast_and_ignores_preemption() -> None:
    rules = builders.worker_job(_job(), builders.WorkerSettings())["spec"]["podFailurePolicy"]["rules"]
    fail_job = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]["values"]
    assert set(fail_job) == {e.exit_code for e in ERROR_TYPES if not e.retryable}
    assert 19 not in fail_job and 1 not in fail_job  # SourceUnavailable and unknown errors are retried
    ignored = [r for r in rules if r["action"] == "Ignore"]
    assert any(r.get("onExitCodes", {}).get("values") == [143] for r in ignored)
    assert any(r.get("onPodConditions") == [{"type": "DisruptionTarget"}] for r in ignored)


def test_queue_labels_reach_the_job() -> None:
    labels = {
        "kueue.x-k8s.io/queue-name": "team-a-gpus",
        "kueue.x-k8s.io/priority-class": "low",
        "team": "nlp",
    }
    job = _job(podTemplate={"labels": labels}, suspend=True)
    manifest = builders.worker_job(job, builders.WorkerSettings())
    meta_labels = manifest["metadata"]["labels"]
    assert meta_labels["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert meta_labels["kueue.x-k8s.io/priority-class"] == "low"
    assert "team" not in meta_labels  # only what Kueue reads from the Job
    assert manifest["spec"]["template"]["metadata"]["labels"]["team"] == "nlp"
    assert manifest["spec"]["suspend"] is True and builders.queued(job)
    assert not builders.queued(_job())


def test_outputs_off_claims_get_a_work_claim_that_outlives_the_pod() -> None:
    for uri in ("s3://bucket/adapters/x", "file:///srv/adapters/x"):
        job = _job(output={"uri": uri})
        claim = builders.work_claim(job, builders.WorkerSettings(work_claim_size="5Gi"))
        assert claim is not None
        assert claim["metadata"]["name"] == "support-lora-work"
        assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
        assert "storageClassName" not in claim["spec"]
        pod = builders.worker_job(job, builders.WorkerSettings())["spec"]["template"]["spec"]
        (work,) = [v for v in pod["volumes"] if v["name"] == "work"]
        assert work == {"name": "work", "persistentVolumeClaim": {"claimName": "support-lora-work"}}
        assert training_plan(job).output.work_dir == "/var/lib/kubetune/work"
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "work"]
        assert mount["mountPath"] == "/var/lib/kubetune/work"
    claimed = _job(output={"uri": "pvc://adapters/x"})
    assert builders.work_claim(claimed, builders.WorkerSettings()) is None
    classed = builders.work_claim(
        _job(output={"uri": "s3://bucket/x"}), builders.WorkerSettings(work_storage_class="fast")
    )
    assert classed is not None and classed["spec"]["storageClassName"] == "fast"
