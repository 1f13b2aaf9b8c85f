"""Good and bad manifests shared by the pydantic tests and the apiserver admission tests.

Each bad case names the field the rejection must point at (as the apiserver spells it), so the
Python models and the generated CRD are held to the same table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]


def finetunejob(name: str = "support-lora") -> Manifest:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"},
            "dataset": {"uri": "pvc://datasets/support/train.jsonl", "format": "completion"},
            "method": {
                "type": "lora",
                "lora": {"rank": 16, "alpha": 32, "targetModules": ["q_proj", "v_proj"]},
            },
            "training": {"epochs": 1, "learningRate": 2.0e-4, "batchSize": 4},
            "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "2", "memory": "8Gi"},
            "output": {"uri": "pvc://adapters/support-lora"},
        },
    }


def adapterdeployment(name: str = "support") -> Manifest:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "adapters": [
                {"name": "support-v1", "fineTuneJob": "support-lora"},
                {"name": "support-v2", "uri": "s3://adapters/support-v2"},
            ],
            "routes": [
                {
                    "name": "support",
                    "backends": [
                        {"adapter": "support-v1", "weight": 90},
                        {"adapter": "support-v2", "weight": 10},
                    ],
                }
            ],
            "resources": {"cpu": "1", "memory": "4Gi"},
        },
    }


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A mutation that sets a dotted path (list indices as numbers) to value; DELETE removes it."""

    def apply(manifest: Manifest) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for part in parents:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        elif last.isdigit():
            index = int(last)
            node[index : index + 1] = [value]
        else:
            node[last] = value

    return apply


DELETE = object()


@dataclass
class BadCase:
    id: str
    kind: str  # "FineTuneJob" or "AdapterDeployment"
    mutations: list[Callable[[Manifest], None]]
    field: str  # the field path the rejection must name, as the apiserver writes it
    # Free-text the apiserver's message must contain too, when the field alone is ambiguous.
    says: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> Manifest:
        base = finetunejob() if self.kind == "FineTuneJob" else adapterdeployment()
        base = copy.deepcopy(base)
        for mutate in self.mutations:
            mutate(base)
        return base


FTJ, ADEP = "FineTuneJob", "AdapterDeployment"

BAD_CASES: list[BadCase] = [
    BadCase("unknown-method", FTJ, [_set("spec.method.type", "lorax")], "spec.method.type"),
    BadCase("lora-block-on-ia3", FTJ, [_set("spec.method.type", "ia3")], "spec.method.lora"),
    BadCase(
        "quantization-on-lora",
        FTJ,
        [_set("spec.method.quantization", {"bits": 4})],
        "spec.method.quantization",
    ),
    BadCase(
        "ia3-block-on-lora", FTJ, [_set("spec.method.ia3", {"targetModules": ["k_proj"]})], "spec.method.ia3"
    ),
    BadCase(
        "prefix-block-on-lora", FTJ, [_set("spec.method.prefix", {"virtualTokens": 8})], "spec.method.prefix"
    ),
    BadCase(
        "adapter-block-on-full",
        FTJ,
        [_set("spec.method", {"type": "full", "adapter": {"bottleneckSize": 8}})],
        "spec.method.adapter",
    ),
    BadCase("lora-rank-zero", FTJ, [_set("spec.method.lora.rank", 0)], "spec.method.lora.rank"),
    BadCase(
        "lora-dropout-above-one", FTJ, [_set("spec.method.lora.dropout", 1.5)], "spec.method.lora.dropout"
    ),
    BadCase(
        "lora-target-module-with-space",
        FTJ,
        [_set("spec.method.lora.targetModules", ["q proj"])],
        "spec.method.lora.targetModules[0]",
    ),
    BadCase(
        "qlora-three-bits",
        FTJ,
        [_set("spec.method", {"type": "qlora", "quantization": {"bits": 3}})],
        "spec.method.quantization.bits",
    ),
    BadCase(
        "ia3-feedforward-not-targeted",
        FTJ,
        [
            _set(
                "spec.method",
                {"type": "ia3", "ia3": {"targetModules": ["k_proj"], "feedforwardModules": ["down_proj"]}},
            )
        ],
        "spec.method.ia3.feedforwardModules",
    ),
    BadCase("model-uri-ftp", FTJ, [_set("spec.model.uri", "ftp://example/model")], "spec.model.uri"),
    BadCase(
        "dataset-uri-escapes-claim",
        FTJ,
        [_set("spec.dataset.uri", "pvc://datasets/../../etc/passwd")],
        "spec.dataset.uri",
        says="..",
    ),
    BadCase(
        "dataset-uri-bad-bucket", FTJ, [_set("spec.dataset.uri", "s3://UPPER/data.jsonl")], "spec.dataset.uri"
    ),
    BadCase("output-to-hf", FTJ, [_set("spec.output.uri", "hf://me/my-adapter")], "spec.output.uri"),
    BadCase("dataset-format-xml", FTJ, [_set("spec.dataset.format", "xml")], "spec.dataset.format"),
    BadCase(
        "eval-fraction-too-big", FTJ, [_set("spec.dataset.evalFraction", 0.9)], "spec.dataset.evalFraction"
    ),
    BadCase("learning-rate-zero", FTJ, [_set("spec.training.learningRate", 0)], "spec.training.learningRate"),
    BadCase("batch-size-zero", FTJ, [_set("spec.training.batchSize", 0)], "spec.training.batchSize"),
    BadCase("precision-fp8", FTJ, [_set("spec.training.precision", "fp8")], "spec.training.precision"),
    BadCase("nodes-zero", FTJ, [_set("spec.resources.nodes", 0)], "spec.resources.nodes"),
    BadCase("memory-not-a-quantity", FTJ, [_set("spec.resources.memory", "lots")], "spec.resources.memory"),
    BadCase(
        "prefix-multi-node",
        FTJ,
        [_set("spec.method", {"type": "prefix"}), _set("spec.resources.nodes", 2)],
        "spec.resources.nodes",
    ),
    BadCase("backoff-limit-negative", FTJ, [_set("spec.backoffLimit", -1)], "spec.backoffLimit"),
    BadCase("model-missing", FTJ, [_set("spec.model", DELETE)], "spec.model"),
    BadCase(
        "credentials-secret-bad-name",
        FTJ,
        [_set("spec.model.credentialsSecret", "HF_Token")],
        "spec.model.credentialsSecret",
    ),
    BadCase("unknown-field", FTJ, [_set("spec.methd", {"type": "lora"})], "spec.methd"),
    BadCase("name-too-long", FTJ, [_set("metadata.name", "a" * 53)], "metadata.name"),
    BadCase(
        "adapter-names-duplicate",
        ADEP,
        [_set("spec.adapters.1.name", "support-v1"), _set("spec.routes", [])],
        "spec.adapters",
    ),
    BadCase(
        "adapter-both-sources",
        ADEP,
        [_set("spec.adapters.0.uri", "s3://adapters/x")],
        "spec.adapters[0]",
        says="exactly one of fineTuneJob or uri",
    ),
    BadCase(
        "adapter-no-source",
        ADEP,
        [_set("spec.adapters.0.fineTuneJob", DELETE)],
        "spec.adapters[0]",
        says="exactly one of fineTuneJob or uri",
    ),
    BadCase(
        "adapter-name-uppercase", ADEP, [_set("spec.adapters.0.name", "Support")], "spec.adapters[0].name"
    ),
    BadCase(
        "route-to-unknown-adapter",
        ADEP,
        [_set("spec.routes.0.backends.1.adapter", "support-v3")],
        "spec.routes",
        says="must name an adapter",
    ),
    BadCase(
        "route-names-duplicate",
        ADEP,
        [_set("spec.routes.1", {"name": "support", "backends": [{"adapter": "support-v1", "weight": 1}]})],
        "spec.routes",
        says="unique",
    ),
    BadCase(
        "route-weight-zero",
        ADEP,
        [_set("spec.routes.0.backends.0.weight", 0)],
        "spec.routes[0].backends[0].weight",
    ),
    BadCase(
        "route-shadows-adapter",
        ADEP,
        [_set("spec.routes.0.name", "support-v1")],
        "spec.routes",
        says="differ from",
    ),
    BadCase(
        "merge-two-adapters",
        ADEP,
        [_set("spec.mergeAdapter", True)],
        "spec.mergeAdapter",
        says="exactly one adapter",
    ),
    BadCase(
        "canary-not-a-backend",
        ADEP,
        [_set("spec.routes.0.canary", {"adapter": "support-v3"})],
        "spec.routes[0].canary.adapter",
        says="one of the route's backends",
    ),
    BadCase(
        "canary-steps-short-of-100",
        ADEP,
        [_set("spec.routes.0.canary", {"adapter": "support-v2", "steps": [10, 50]})],
        "spec.routes[0].canary.steps",
        says="ending with 100",
    ),
    BadCase("vllm-without-gpu", ADEP, [_set("spec.runtime", "vllm")], "spec.resources.gpus"),
    BadCase("runtime-unknown", ADEP, [_set("spec.runtime", "tgi")], "spec.runtime"),
    BadCase("replicas-negative", ADEP, [_set("spec.replicas", -1)], "spec.replicas"),
    BadCase("service-port-out-of-range", ADEP, [_set("spec.service.port", 70000)], "spec.service.port"),
    BadCase(
        "update-strategy-unknown", ADEP, [_set("spec.updateStrategy", "Recreate")], "spec.updateStrategy"
    ),
    BadCase("name-starts-with-digit", ADEP, [_set("metadata.name", "1support")], "metadata.name"),
]
