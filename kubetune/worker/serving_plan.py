"""The serving contract: the ``ServingPlan`` the operator renders from an AdapterDeployment.

Torch-free (the operator imports it). A serving pod reads it once at start-up (``kubetune serve
--plan FILE``) to load its base model and initial adapters; later adapter changes reach running pods
through the HTTP API (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/v1/routes``), so a
HotReload deployment never restarts for them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterEntry(_Model):
    name: str = Field(description="Name clients send as the OpenAI `model`.")
    uri: str = Field(description="Artifact URI: file://, pvc:// (under pvc_mount_root), s3:// or hf://.")
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Recorded sha256 of the artifact's kubetune.json (a FineTuneJob's status.result.sha256); "
        "the server refuses an artifact that does not match it.",
    )


class RouteBackend(_Model):
    adapter: str
    weight: int = Field(ge=1)


class RouteEntry(_Model):
    name: str
    backends: list[RouteBackend] = Field(min_length=1)


class ServingPlan(_Model):
    """Everything a serving pod needs at start-up."""

    plan_version: int = Field(default=1, description="Schema version.")
    model_uri: str = Field(description="Base model URI (same schemes as adapters).")
    model_revision: str | None = Field(default=None, description="Hub revision for hf:// models.")
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the model repository.")
    served_model_name: str = Field(description="Name of the base model in the API.")
    adapters: list[AdapterEntry] = Field(default_factory=list)
    routes: list[RouteEntry] = Field(default_factory=list)
    pvc_mount_root: str = Field(default="/mnt/pvc", description="Where pvc://claim/path is mounted.")
    cache_dir: str = Field(default="/tmp/kubetune-cache", description="Download cache for hf:// and s3://.")
    merge_adapter: bool = Field(
        default=False,
        description="Serve the one LoRA adapter merged into the base weights (the base is then not served "
        "under its own name).",
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Directories adapters may be loaded from, besides pvc_mount_root and cache_dir "
        "(e.g. a file:// location baked into the image).",
    )
