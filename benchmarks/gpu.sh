#!/usr/bin/env bash
# One-command GPU benchmark (target: under 8 minutes on one H100 or H200).
#
#   benchmarks/gpu.sh [--check] [gpu_bench options...]
#
# LoRA, QLoRA and full fine-tuning of Qwen2.5-0.5B's architecture (its real config.json from
# tests/planner/configs, all 24 layers, random weights: nothing is downloaded), each trained by
# kubetune's engine and by the strongest baselines, HF Trainer + PEFT (grouped by length) and TRL's
# SFTTrainer (padding-free packing), with and without Liger Kernel. It measures tokens/s, model-FLOPs
# utilisation, peak GPU memory against the planner's estimate, and kubetune's speed over each
# baseline's; results go to benchmarks/results/gpu.{json,md}. See benchmarks/gpu_bench.py.
#
# STATUS: not yet run on a GPU. It was written on a CPU-only machine (no GPU was lent to that
# session); only its CPU-runnable parts are tested (tests/benchmarks/test_gpu_bench.py), so
# benchmarks/results/ holds no gpu.* figures yet. Run it whenever a GPU is available.
#
# What it needs (it checks, and says what is missing, before measuring anything):
#   required  a CUDA GPU; Python >= 3.11 with torch (CUDA), transformers, peft, accelerate, safetensors,
#             tokenizers, pydantic, fsspec, prometheus-client (kubetune's worker imports them)
#   optional  bitsandbytes (QLoRA), trl + datasets (the TRL baseline), liger-kernel (the Liger runs);
#             each missing one skips its runs, and the results say so
#   e.g. this workplace's H200 image (Python 3.12; package list of 2026-11-17) has torch, transformers,
#   peft, accelerate, fsspec and prometheus-client, but not pydantic (nor pydantic-core,
#   annotated-types, typing-inspection), bitsandbytes, trl, datasets or liger-kernel: carry those as
#   cp312 manylinux wheels in .whl/
# Python: $PYTHON if set, else .venv/bin/python if it sees a GPU, else python3.
# Offline machines: wheels for what is missing, put in $KUBETUNE_GPU_WHEELS (default: .whl/ in the
# repository), are installed into a temporary directory first (pip --no-index --no-deps); nothing
# is fetched from the network.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi

WHEELS=${KUBETUNE_GPU_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/kubetune-gpu-site.XXXXXX)
  echo "gpu.sh: installing the wheels in $WHEELS into $SITE (no network)"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The test tokenizer and the engine never reach the Hub; make sure nothing else tries.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

check() {
  "$PYTHON" - <<'EOF'
import importlib.util
import sys

required = ["torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pydantic",
            "fsspec", "prometheus_client"]
optional = {"bitsandbytes": "the QLoRA runs", "trl": "the TRL baseline", "datasets": "the TRL baseline",
            "liger_kernel": "the Liger Kernel runs"}
print(f"gpu.sh: python {sys.executable} {sys.version.split()[0]}")
missing = [m for m in required if importlib.util.find_spec(m) is None]
for module, what in optional.items():
    if importlib.util.find_spec(module) is None:
        print(f"gpu.sh: optional {module} is missing: {what} will be skipped")
gpu = None
if "torch" not in missing:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"gpu.sh: GPU: {gpu or 'none'}")
if missing:
    print(f"gpu.sh: required Python packages missing: {', '.join(missing)} (put their wheels in .whl/)")
if sys.version_info < (3, 11):
    print("gpu.sh: kubetune needs Python 3.11 or newer")
    sys.exit(2)
if "torch" not in missing:
    try:
        import kubetune.worker.engine  # noqa: F401  (every import the measurements make)
    except ImportError as error:
        print(f"gpu.sh: kubetune's worker does not import: {error}")
        missing.append(str(error))
sys.exit(2 if missing or gpu is None else 0)
EOF
}

if [[ "${1:-}" == "--check" ]]; then
  check
  exit $?
fi
if ! check; then
  echo "gpu.sh: not measuring (see above: it needs a CUDA GPU and the required packages)" >&2
  exit 2
fi
exec "$PYTHON" -m benchmarks.gpu_bench run "$@"
