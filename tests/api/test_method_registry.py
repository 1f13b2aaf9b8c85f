"""One home per method: the registry is the only list of methods.

Aspects:
- the API's and the plan's method blocks are exactly the registry's settings blocks, as the same models;
- a settings block is declared once and serialises as camelCase for the API and snake_case for the plan;
- every registered method has its torch side under the same name (imported lazily, by name);
- the CRD's method enum and block rules come from the registry.
"""

from __future__ import annotations

from kubetune.api import methods, v1alpha1
from kubetune.api.methods import METHOD_NAMES
from kubetune.worker import plan as wp


def test_method_blocks_are_the_registry_blocks() -> None:
    blocks = set(methods.blocks())
    api_blocks = set(v1alpha1.MethodSpec.model_fields) - {"type"}
    plan_blocks = set(wp.MethodSpec.model_fields) - {"type"}
    assert api_blocks == plan_blocks == blocks
    for block, settings in methods.blocks().items():
        assert wp.MethodSpec.model_fields[block].annotation is settings


def test_settings_are_declared_once_and_serialised_twice() -> None:
    job_method = v1alpha1.MethodSpec.model_validate(
        {"type": "qlora", "lora": {"rank": 8, "alpha": 16.5, "targetModules": ["q_proj"]}}
    )
    assert job_method.to_dict()["lora"]["targetModules"] == ["q_proj"]
    plan_method = wp.MethodSpec.model_validate({"type": "qlora", "lora": job_method.lora})
    assert plan_method.lora is job_method.lora or plan_method.lora == job_method.lora
    snake = plan_method.model_dump()
    assert snake["lora"]["target_modules"] == ["q_proj"] and snake["lora"]["alpha"] == 16.5
    assert wp.MethodSpec.model_validate(snake) == plan_method


def test_every_method_has_its_worker_side() -> None:
    from kubetune.worker.methods import get_method

    for name in METHOD_NAMES:
        assert get_method(name).info is methods.get(name)


def test_crd_enum_and_rules_follow_the_registry() -> None:
    schema = v1alpha1.MethodSpec.model_json_schema()
    assert schema["properties"]["type"]["enum"] == list(METHOD_NAMES)
    ruled = {rule.field_path for rule in v1alpha1.MethodSpec.rules}
    assert ruled == {f".{block}" for block in methods.blocks()}


def test_manifest_hyperparameters_keep_their_shape() -> None:
    assert wp.MethodSpec(type="full").hyperparameters() == {}
    assert wp.MethodSpec(type="lora").hyperparameters()["rank"] == 16
    assert set(wp.MethodSpec(type="qlora").hyperparameters()) == {"lora", "quantization"}
