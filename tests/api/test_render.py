"""FineTuneJob -> TrainingPlan rendering (the operator-worker contract), without a cluster.

Aspects:
- every example FineTuneJob renders into a plan the worker accepts, and it survives a JSON round trip
  through ``load_plan`` (what the worker pod does);
- hyperparameters and method blocks are carried over; unset blocks take the worker's defaults;
- pvc:// outputs get a work dir on the same claim (resume survives rescheduling); claims are listed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.operator.render import EPHEMERAL_WORK_DIR, claims_of, training_plan, work_dir_for
from kubetune.worker.plan import load_plan
from tests.api.cases import finetunejob

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _examples() -> list[FineTuneJob]:
    jobs = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document["kind"] == "FineTuneJob":
                jobs.append(FineTuneJob.model_validate(document))
    return jobs


def test_every_example_renders_and_round_trips() -> None:
    jobs = _examples()
    assert {job.spec.method.type for job in jobs} == {"full", "lora", "qlora", "ia3", "prefix", "adapter"}
    for job in jobs:
        plan = training_plan(job)
        assert plan.method.type == job.spec.method.type
        assert load_plan(plan.model_dump_json()) == plan


def test_values_are_carried_over() -> None:
    manifest = finetunejob()
    manifest["metadata"].update(namespace="team-a", uid="1234", generation=2)
    manifest["spec"]["training"].update(maxSteps=50, packing=True, seed=7, checkpointEverySteps=25)
    job = FineTuneJob.model_validate(manifest)
    plan = training_plan(job)
    assert plan.name == "support-lora"
    assert plan.labels == {
        "kubetune.dev/namespace": "team-a",
        "kubetune.dev/uid": "1234",
        "kubetune.dev/generation": "2",
    }
    assert plan.method.lora.rank == 16 and plan.method.lora.target_modules == ["q_proj", "v_proj"]
    assert (plan.training.max_steps, plan.training.packing, plan.training.seed) == (50, True, 7)
    assert plan.training.checkpoint_every_steps == 25
    assert plan.dataset.format == "completion" and plan.model.revision == "main"


def test_qlora_alone_takes_worker_defaults() -> None:
    manifest = finetunejob()
    manifest["spec"]["method"] = {"type": "qlora"}
    plan = training_plan(FineTuneJob.model_validate(manifest))
    assert plan.method.quantization.type == "nf4" and plan.method.quantization.double_quant
    assert plan.method.lora.rank == 16


def test_work_dir_and_claims() -> None:
    job = FineTuneJob.model_validate(finetunejob())
    assert work_dir_for(job) == "/mnt/pvc/adapters/.kubetune-work-support-lora"
    assert claims_of(job) == ["adapters", "datasets"]
    manifest = finetunejob()
    manifest["spec"]["output"]["uri"] = "s3://bucket/out"
    assert work_dir_for(FineTuneJob.model_validate(manifest)) == EPHEMERAL_WORK_DIR
