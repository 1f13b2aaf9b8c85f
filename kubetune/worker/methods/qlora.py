"""QLoRA: the base loaded in 4-bit (bitsandbytes NF4/FP4, optional double quantisation), LoRA on top.

bitsandbytes >= 0.47 runs 4-bit layers on CPU too, so this method is tested on CPU. It is imported
only inside the functions below, so installs without it can run every other method.
"""

from __future__ import annotations

from typing import Any

from kubetune.worker.errors import DependencyMissing
from kubetune.worker.methods import BuildContext, TrainingMethod, register
from kubetune.worker.methods.lora import lora_config, save_peft
from kubetune.worker.plan import MethodSpec


def _compute_dtype(spec: MethodSpec, context: BuildContext) -> Any:
    import torch

    if spec.quantization.compute_dtype == "auto":
        return context.compute_dtype
    return getattr(torch, spec.quantization.compute_dtype)


def load_kwargs(spec: MethodSpec, context: BuildContext) -> dict[str, Any]:
    try:
        import bitsandbytes

        # The worker defers this import (kubetune/worker/__init__.py); touching the module loads it
        # here, on the main thread, so a broken install fails with this message.
        bitsandbytes.__version__  # noqa: B018
    except ImportError as exc:
        raise DependencyMissing(
            "method qlora needs the bitsandbytes package (pip install bitsandbytes)"
        ) from exc
    from transformers import BitsAndBytesConfig

    quantization = spec.quantization
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=_compute_dtype(spec, context),
        ),
        "device_map": {"": 0} if context.device == "cuda" else {"": "cpu"},
    }


def _keep_cpu_weights_unpacked(model: Any) -> None:
    """Turn off bitsandbytes' CPU inference repacking for this run.

    On CPUs with AVX512-BF16, a ``Linear4bit`` called in eval mode without gradients (our evaluations)
    repacks its weight in place into a layout that needs ``out_features`` divisible by 32 (it asserts
    otherwise: 688-wide MLPs fail). Worse, later training steps then run the repacked layer through an
    inference kernel with no backward, so the gradient through the frozen base is silently dropped.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def build(model: Any, spec: MethodSpec, context: BuildContext) -> Any:
    from peft import get_peft_model, prepare_model_for_kbit_training

    if context.device == "cpu":
        _keep_cpu_weights_unpacked(model)

    # Casts norms to fp32 and freezes the quantised base; checkpointing must be set up here, not later,
    # because the preparation hooks the input embeddings for it.
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=context.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(model, lora_config(model, spec.lora))


METHOD = register(TrainingMethod(name="qlora", build=build, save=save_peft, load_kwargs=load_kwargs))
