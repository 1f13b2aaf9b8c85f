"""Faults in the middle of a training run, on the local cluster.

Each test trains the tiny model for :data:`STEPS` steps with a checkpoint every two. The fault lands
once the first checkpoint is on disk, and the worker pod is lost with it, so the run can only finish
by resuming from that checkpoint. (An operator or apiserver outage alone does not stop a worker that
is already training.) Afterwards each test checks the same four things:
- there is exactly one worker Job, the one that existed before the fault;
- the run resumed from a checkpoint: the manifest's ``resumed_from_step`` is > 0, and it trained to
  its full step count;
- the FineTuneJob ends ``Succeeded``;
- the artifact's files match its manifest, and the status names the manifest's sha256.

Aspects:
- the operator is SIGKILLed, the worker pod is deleted while no operator runs, and a new operator
  starts: it picks the run up from what exists and creates no second Job;
- the worker pod is deleted with the output on ``file://``: the checkpoints live on the work claim
  that the FineTuneJob owns;
- the apiserver is restarted while the Job's next pod starts. Every watch breaks (the operator's,
  the Job controller's, the node agent's), and the rest of the run reaches each of them only
  through the watches they open again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.localcluster.testing import ClusterHandle, wait_for
from tests.fixtures import create_finetunejob, finetunejob, get_finetunejob, phase_is

pytestmark = [pytest.mark.cluster, pytest.mark.torch, pytest.mark.slow]

#: Enough steps after the first checkpoint (step 2) for the fault to land before the run ends.
STEPS = 60
CHECKPOINT_EVERY = 2


class OperatorProcess:
    """``kubetune operator`` for one namespace, as a process the test can kill and start again."""

    def __init__(self, cluster: ClusterHandle, namespace: str, log_dir: Path) -> None:
        self.cluster, self.namespace, self.log_dir = cluster, namespace, log_dir
        self.logs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_dir / f"operator-{len(self.logs)}.log"
        self.logs.append(log)
        argv = [sys.executable, "-m", "kubetune", "operator", "--namespace", self.namespace]
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [*argv, "--liveness", "", "-v"],
                env=self.cluster.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; kopf's finalizers and annotations stay as they were."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tracebacks(self) -> list[str]:
        return [
            f"{log.name}: ...{log.read_text()[-3000:]}" for log in self.logs if "Traceback" in log.read_text()
        ]


@pytest.fixture
def operator_process(cluster: ClusterHandle, namespace: str, crds: None, tmp_path: Path) -> Any:
    process = OperatorProcess(cluster, namespace, tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def _core(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.CoreV1Api(cluster.api_client())


def _batch(cluster: ClusterHandle) -> Any:
    from kubernetes import client

    return client.BatchV1Api(cluster.api_client())


def _checkpoints(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in a work directory (an unfinished one ends in ``.tmp``)."""
    found = (directory / "checkpoints").glob("step-*")
    return sorted(int(p.name.removeprefix("step-")) for p in found if p.name.removeprefix("step-").isdigit())


def _start_run(
    cluster: ClusterHandle, namespace: str, claim_dir: Path, name: str, output: str
) -> dict[str, Any]:
    from kubetune.worker.testing import make_tiny_model, task_records, write_records

    make_tiny_model(claim_dir / "model")
    write_records(claim_dir / "train.jsonl", task_records(80, fmt="completion"))
    body = finetunejob(name, output={"uri": output})
    body["spec"]["training"].update(maxSteps=STEPS, checkpointEverySteps=CHECKPOINT_EVERY)
    return create_finetunejob(cluster, namespace, body)


def _first_checkpoint(cluster: ClusterHandle, namespace: str, name: str, work_dir: Path) -> Any:
    """Wait for the first complete checkpoint; returns the worker Job and its pod at that moment."""
    wait_for(
        lambda: _checkpoints(work_dir),
        400,
        interval=0.1,
        description=lambda: (
            f"a checkpoint in {work_dir}: {get_finetunejob(cluster, namespace, name).get('status')}"
        ),
    )
    job = _batch(cluster).read_namespaced_job(f"{name}-train", namespace)
    selector = f"batch.kubernetes.io/controller-uid={job.metadata.uid}"
    (pod,) = _core(cluster).list_namespaced_pod(namespace, label_selector=selector).items
    return job, pod


def _replacement_pod(cluster: ClusterHandle, namespace: str, job: Any, lost: Any) -> Any:
    selector = f"batch.kubernetes.io/controller-uid={job.metadata.uid}"
    pods = _core(cluster).list_namespaced_pod(namespace, label_selector=selector).items
    return next((p for p in pods if p.metadata.uid != lost.metadata.uid), None)


def _assert_resumed_once_and_verified(
    cluster: ClusterHandle, namespace: str, name: str, job: Any, artifact_dir: Path
) -> dict[str, Any]:
    from kubetune.worker.artifact import artifact_sha256, read_manifest, verify_artifact

    done = wait_for(
        lambda: phase_is(cluster, namespace, name, "Succeeded", "Failed"),
        400,
        interval=1,
        description=lambda: f"{name} to finish: {get_finetunejob(cluster, namespace, name).get('status')}",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]

    jobs = _batch(cluster).list_namespaced_job(namespace).items
    assert [(j.metadata.name, j.metadata.uid) for j in jobs] == [(job.metadata.name, job.metadata.uid)]

    manifest = read_manifest(artifact_dir)
    assert manifest is not None, f"no manifest in {artifact_dir}"
    metrics = manifest["metrics"]
    assert metrics["resumed_from_step"] and metrics["resumed_from_step"] >= CHECKPOINT_EVERY, metrics
    assert metrics["steps"] == STEPS, metrics
    assert verify_artifact(artifact_dir) == []
    assert done["status"]["result"]["sha256"] == artifact_sha256(manifest)
    return json.loads((artifact_dir / "kubetune.json").read_text())


def test_operator_killed_mid_run(
    cluster: ClusterHandle, namespace: str, operator_process: OperatorProcess, claim_dir: Path
) -> None:
    name = "chaos-operator"
    _start_run(cluster, namespace, claim_dir, name, f"pvc://data/out/{name}")
    job, pod = _first_checkpoint(cluster, namespace, name, claim_dir / "out" / f".kubetune-work-{name}")

    operator_process.kill()
    _core(cluster).delete_namespaced_pod(pod.metadata.name, namespace)
    # The Job controller replaces the pod with no operator running; the new operator finds it so.
    wait_for(lambda: _replacement_pod(cluster, namespace, job, pod), 120, description="the Job's next pod")
    operator_process.start()

    _assert_resumed_once_and_verified(cluster, namespace, name, job, claim_dir / "out" / name)
    assert operator_process.tracebacks() == []


def test_worker_pod_deleted_mid_run(
    cluster: ClusterHandle, namespace: str, operator_process: OperatorProcess, claim_dir: Path
) -> None:
    from kubernetes import client

    name = "chaos-pod"
    output = claim_dir / "file-out" / name
    created = _start_run(cluster, namespace, claim_dir, name, f"file://{output}")
    claim = wait_for(
        lambda: _core(cluster).read_namespaced_persistent_volume_claim(f"{name}-work", namespace),
        60,
        description="the work claim",
        ignore=(client.ApiException,),
    )
    assert claim.metadata.owner_references[0].uid == created["metadata"]["uid"]
    volume = wait_for(
        lambda: (
            _core(cluster).read_namespaced_persistent_volume_claim(f"{name}-work", namespace).spec.volume_name
        ),
        120,
        description="the work claim to bind",
    )
    work_dir = Path(_core(cluster).read_persistent_volume(volume).spec.host_path.path)
    job, pod = _first_checkpoint(cluster, namespace, name, work_dir)

    _core(cluster).delete_namespaced_pod(pod.metadata.name, namespace)

    _assert_resumed_once_and_verified(cluster, namespace, name, job, output)
    assert operator_process.tracebacks() == []


def test_apiserver_restarted_mid_run(
    cluster: ClusterHandle, namespace: str, operator_process: OperatorProcess, claim_dir: Path
) -> None:
    if not cluster.is_local:
        pytest.skip("restarts the embedded cluster's apiserver")
    name = "chaos-apiserver"
    _start_run(cluster, namespace, claim_dir, name, f"pvc://data/out/{name}")
    job, pod = _first_checkpoint(cluster, namespace, name, claim_dir / "out" / f".kubetune-work-{name}")

    # The restart lands while the Job's next pod starts (importing torch alone takes seconds): its
    # start, the resumed training and the Job's completion all reach the operator, the Job
    # controller and the node agent through watches opened again after the restart. (The old pod
    # is gone first: the node agent does not yet survive an outage in the middle of a pod's
    # termination.)
    _core(cluster).delete_namespaced_pod(pod.metadata.name, namespace)
    wait_for(lambda: _gone(cluster, namespace, pod), 120, description="the deleted pod to go")
    log = operator_process.logs[-1]
    restarted_at = len(log.read_text())
    cluster.restart_apiserver(down_s=2)

    _assert_resumed_once_and_verified(cluster, namespace, name, job, claim_dir / "out" / name)
    after = log.read_text()[restarted_at:]
    # kopf logs every watch event it hands to a handler: the Job's events after the restart prove
    # that the operator's Job watch was re-established (its progress timer alone would also have
    # brought the status to Succeeded).
    assert f"[{namespace}/{job.metadata.name}] Handler 'worker_changed' is invoked" in after, after[-3000:]
    # The outage is logged as what it is, one line per failed attempt, not as tracebacks.
    assert operator_process.tracebacks() == []


def _gone(cluster: ClusterHandle, namespace: str, pod: Any) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        current = _core(cluster).read_namespaced_pod(pod.metadata.name, namespace)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return bool(current.metadata.uid != pod.metadata.uid)
