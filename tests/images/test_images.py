"""The operator and worker images, run as a pod with kubetune's security context runs them.

Aspects:
- the lock files agree with pyproject.toml and hack/requirements.txt, and the Dockerfiles' default
  base is the image hack/images/base.sh builds (no images needed);
- the refs in _out/images.env carry the version and short sha, and the OCI labels the version and
  the git revision;
- both images run as uid 1000 by default, their files belong to root and uid 1000 cannot change
  them, and ``python -m kubetune --help`` works;
- the root filesystem is read-only: writing to / fails, /tmp (a volume in a pod) works;
- the operator image holds no torch, triton or CUDA libraries;
- the worker imports torch, transformers, peft, bitsandbytes and the training and serving modules,
  and runs LoRA training steps with the root read-only, caches and scratch under /tmp.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import tomllib
from types import ModuleType

import pytest

from tests.images.conftest import REPO, RunIn

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGES = ("operator", "worker")


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("images_lock", REPO / "hack" / "images" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_files_agree_with_the_pins() -> None:
    assert _lock_module().problems() == []


def test_cpu_worker_leaves_out_only_what_cpu_never_loads() -> None:
    lock = _lock_module()
    cpu = lock.parse_lock(lock.lock_path("worker-cpu"))
    assert "torch" in cpu and "triton" not in cpu
    # `import torch` fails without these (docs/images.md), so the exclusions must never reach them.
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-cuda-runtime", "nvidia-nccl-cu13"} <= set(cpu)


def test_dockerfiles_default_to_the_base_that_base_sh_builds() -> None:
    name = subprocess.run(
        ["bash", str(REPO / "hack" / "images" / "base.sh"), "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    for image in IMAGES:
        dockerfile = (REPO / image / "Dockerfile").read_text()
        assert f"ARG BASE_IMAGE={name}\n" in dockerfile, image


@pytest.mark.images
def test_refs_name_version_and_revision(images: dict[str, str]) -> None:
    for image, ref in images.items():
        tag = rf"{re.escape(VERSION)}-[0-9a-f]{{7}}(-dirty)?(-cuda)?"
        assert re.fullmatch(rf"[\w./-]+/{image}:{tag}", ref), ref


@pytest.mark.images
@pytest.mark.parametrize("image", IMAGES)
def test_labels_carry_version_and_revision(
    image: str, images: dict[str, str], engine_env: dict[str, str]
) -> None:
    ref = images[image]
    labels = json.loads(
        subprocess.run(
            [engine_env["ENGINE"], "image", "inspect", "--format", "{{json .Config.Labels}}", ref],
            capture_output=True,
            text=True,
            check=True,
            env=engine_env,
            timeout=60,
        ).stdout
    )
    assert labels["org.opencontainers.image.version"] == VERSION
    revision = labels["org.opencontainers.image.revision"]
    assert re.fullmatch(r"[0-9a-f]{40}", revision)
    assert revision.startswith(ref.rsplit(":", 1)[1].split("-")[1]), "the tag's short sha is the revision's"
    assert labels["org.opencontainers.image.source"]
    assert labels["org.opencontainers.image.title"] == f"kubetune-{image}"


@pytest.mark.images
@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_uid_1000_over_root_owned_files(image: str, images: dict[str, str], run_in: RunIn) -> None:
    # Anything in the venv not owned by root, or writable by group or others, is listed.
    script = "id -u; id -g; find /opt/kubetune \\( ! -user 0 -o -perm /022 \\) ! -type l | head -5"
    result = run_in(images[image], "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "1000"]


@pytest.mark.images
@pytest.mark.parametrize("image", IMAGES)
def test_root_is_read_only_and_tmp_writable(image: str, images: dict[str, str], run_in: RunIn) -> None:
    script = "touch /probe 2>&1; echo root=$?; touch /tmp/probe && echo tmp=$?"
    result = run_in(images[image], "sh", "-c", script)
    assert "Read-only file system" in result.stdout
    assert "root=1" in result.stdout and "tmp=0" in result.stdout, result.stdout + result.stderr


@pytest.mark.images
@pytest.mark.parametrize("image", IMAGES)
def test_cli_runs(image: str, images: dict[str, str], run_in: RunIn) -> None:
    result = run_in(images[image], "python", "-m", "kubetune", "--help")
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("operator", "train", "serve"))


@pytest.mark.images
def test_operator_image_holds_no_torch(images: dict[str, str], run_in: RunIn) -> None:
    script = (
        "python -c 'import torch' 2>&1 | tail -n 1; "
        "find / -xdev \\( -name torch -o -name triton -o -name nvidia -o -name 'libcudart*' \\) -print"
    )
    result = run_in(images["operator"], "sh", "-c", script)
    assert result.stdout.splitlines() == ["ModuleNotFoundError: No module named 'torch'"], result.stdout
    # The operator's own import path, as `kubetune operator` takes it.
    result = run_in(images["operator"], "python", "-c", "import kubetune.operator.main")
    assert result.returncode == 0, result.stderr


WORKER_STEP = """
import os, torch, transformers, peft, bitsandbytes
import kubetune.worker.engine, kubetune.worker.api_server  # what `kubetune train` and `serve` load
from transformers import LlamaConfig, LlamaForCausalLM
assert not torch.cuda.is_available()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
model = peft.get_peft_model(LlamaForCausalLM(config), lora)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 64, (2, 8))
losses = []
for _ in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
model.save_pretrained(os.path.join(os.environ["TMPDIR"], "adapter"))
print("ok", os.environ["HOME"], os.environ["HF_HOME"])
"""


@pytest.mark.images
@pytest.mark.slow
def test_worker_trains_a_lora_step_on_a_read_only_root(images: dict[str, str], run_in: RunIn) -> None:
    result = run_in(images["worker"], "python", "-c", WORKER_STEP, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "/tmp", "/tmp/.cache/huggingface"]
