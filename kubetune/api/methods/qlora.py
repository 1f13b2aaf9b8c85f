"""QLoRA: the frozen base in 4 bits (bitsandbytes NF4/FP4, optional double quantisation), LoRA on top."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.methods import lora
from kubetune.api.methods.base import MethodInfo, ServingTraits, register_method
from kubetune.api.schema import ApiModel


class QuantizationSettings(ApiModel):
    """Base model quantization for QLoRA (bitsandbytes)."""

    bits: Literal[4] = Field(
        default=4,
        description="bits per frozen base weight. Only 4 (QLoRA's NF4/FP4) today; the field leaves room "
        "for 8-bit bases.",
    )
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="type of 4-bit quantization.")
    double_quant: bool = Field(
        default=True,
        description="doubleQuant also quantizes the quantization constants (saves ~0.4 bit/param).",
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="computeDtype of the de-quantized matmuls: auto is the training precision "
        "(bfloat16 on GPUs that support it); bfloat16 is stable, float16 may diverge.",
    )


INFO = register_method(
    MethodInfo(
        name="qlora",
        summary="LoRA on a 4-bit base quantized by bitsandbytes",
        position=20,
        blocks=("lora", "quantization"),
        declares={"quantization": QuantizationSettings},
        artifact_format="peft",
        # The adapter was trained against the quantized base; vLLM serves it as plain LoRA.
        serving=ServingTraits(shares_base=True, vllm=True, merges=True),
        trainable_parameters=lora.trainable_parameters,
        added_parameters=lora.lora_parameters,
        activation_elements=lora.activation_elements,
        quantized_base=True,
    )
)
