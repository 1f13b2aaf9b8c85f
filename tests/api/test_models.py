"""The v1alpha1 models, without a cluster.

Aspects:
- the spec examples from the API design and every file in examples/ parse;
- defaults (qlora with no blocks, training and resources defaults, camelCase round trip);
- every bad manifest of the shared table is rejected with an error naming its field;
- every cross-field rule has both a CEL and a Python side and is exercised by the table.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import v1alpha1
from kubetune.api.crdgen import _model_classes
from kubetune.api.v1alpha1 import AdapterDeployment, FineTuneJob
from tests.api.cases import BAD_CASES, BadCase, adapterdeployment, finetunejob

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MODELS = {"FineTuneJob": FineTuneJob, "AdapterDeployment": AdapterDeployment}


def test_base_manifests_are_valid() -> None:
    FineTuneJob.model_validate(finetunejob())
    AdapterDeployment.model_validate(adapterdeployment())


def test_qlora_alone_is_valid_and_defaults_apply() -> None:
    manifest = finetunejob()
    manifest["spec"]["method"] = {"type": "qlora"}
    del manifest["spec"]["training"]
    job = FineTuneJob.model_validate(manifest)
    assert job.spec.method.lora is None and job.spec.method.quantization is None
    assert job.spec.training.learning_rate == 2.0e-4
    assert job.spec.training.checkpoint_every_steps == 200
    assert job.spec.suspend is False and job.spec.backoff_limit == 3


def test_wire_names_round_trip() -> None:
    job = FineTuneJob.model_validate(finetunejob())
    wire = job.to_dict()
    assert wire["spec"]["method"]["lora"]["targetModules"] == ["q_proj", "v_proj"]
    assert wire["spec"]["training"]["gradientAccumulationSteps"] == 1
    assert "gradient_accumulation_steps" not in yaml.safe_dump(wire)
    assert FineTuneJob.model_validate(wire) == job


def test_quantities_accept_numbers_and_strings() -> None:
    manifest = finetunejob()
    manifest["spec"]["resources"].update(cpu=2, memory="16Gi", gpuMemory="80Gi")
    resources = FineTuneJob.model_validate(manifest).spec.resources
    assert (resources.cpu, resources.memory, resources.gpu_memory) == ("2", "16Gi", "80Gi")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents
    for document in documents:
        if document["apiVersion"] == v1alpha1.API_VERSION:
            MODELS[document["kind"]].model_validate(document)


def _field_parts(field: str) -> list[str]:
    return [p for p in re.split(r"[.\[\]]", field) if p and not p.isdigit()]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_manifest_is_rejected_naming_the_field(case: BadCase) -> None:
    with pytest.raises(ValidationError) as info:
        MODELS[case.kind].model_validate(case.manifest())
    text = str(info.value)
    missing = [part for part in _field_parts(case.field) if part not in text]
    assert not missing, f"error does not name {case.field}: {text}"
    assert case.says in text


def test_every_rule_is_exercised_by_the_table() -> None:
    """A rule no bad case trips is an untested rule."""
    tripped: set[str] = set()
    for case in BAD_CASES:
        try:
            MODELS[case.kind].model_validate(case.manifest())
        except ValidationError as error:
            tripped.update(
                rule.message
                for cls in _model_classes().values()
                for rule in cls.rules
                if rule.message in str(error)
            )
    all_rules = {rule.message for cls in _model_classes().values() for rule in cls.rules}
    assert all_rules - tripped == set()


def test_rules_have_cel_and_python_sides() -> None:
    for cls in _model_classes().values():
        for rule in cls.rules:
            assert rule.cel.strip() and callable(rule.check), cls.__name__


def test_validate_command_reports_field_and_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune.cli import main

    assert main(["validate", str(EXAMPLES)]) == 0
    bad = next(c for c in BAD_CASES if c.id == "lora-rank-zero").manifest()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump_all([finetunejob(), bad, {"kind": "ConfigMap"}]))
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad.yaml[1] support-lora: spec.method.lora.rank:" in out
    assert "bad.yaml[0]" not in out
