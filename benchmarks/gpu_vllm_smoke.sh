#!/usr/bin/env bash
# GPU smoke test of `runtime: vllm`, for a machine with an NVIDIA GPU and vLLM installed (it cannot
# run on the CPU-only machines CI uses).
#
# It runs vLLM exactly as the operator renders it, and drives it with the operator's own code:
#   1. a small Llama (kubetune.worker.testing, size "small") and a LoRA adapter trained on it by
#      kubetune's worker, published as a kubetune artifact;
#   2. the Deployment the operator renders for an AdapterDeployment with runtime vllm
#      (kubetune.operator.serving.deployment): its command, arguments and environment, with the
#      model path made local and VLLM_API_KEY set to a generated admin token;
#   3. `vllm serve` with those; then serving_reconcile.sync_vllm_pod loads the adapter through
#      /v1/load_lora_adapter with the token, as a reconcile pass would;
#   4. checks: a load without the token is 401; the adapter's greedy completion equals PEFT's on the
#      same artifact (transformers, same GPU); unloading through the operator's code removes it
#      from /v1/models.
# Results: benchmarks/results/gpu_vllm_smoke.json (and the server log beside it).
#
# Usage: benchmarks/gpu_vllm_smoke.sh [PYTHON]   (PYTHON: an interpreter with kubetune's
# dependencies and vllm importable; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
OUT=benchmarks/results
WORK=$(mktemp -d /tmp/kubetune-vllm-smoke.XXXXXX)
mkdir -p "$OUT"

if ! "$PYTHON" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_vllm_smoke: needs a CUDA GPU and vllm importable from $PYTHON" >&2
  exit 2
fi

export WORK OUT PYTHONUNBUFFERED=1
exec "$PYTHON" - <<'EOF'
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import serving, serving_reconcile
from kubetune.operator.builders import WorkerSettings
from kubetune.worker.engine import train
from kubetune.worker.plan import TrainingPlan
from kubetune.worker.serving_plan import ServingPlan
from kubetune.worker.testing import make_tiny_model, task_records, write_records

work, out = Path(os.environ["WORK"]), Path(os.environ["OUT"])
results: dict = {"checks": {}}
model = make_tiny_model(work / "model", size="small")
data = write_records(work / "train.jsonl", task_records(200, fmt="completion"))
adapter = work / "lora"
train(
    TrainingPlan.model_validate(
        {
            "name": "lora",
            "model": {"uri": str(model)},
            "dataset": {"uri": str(data), "eval_fraction": 0.1},
            "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16}},
            "training": {
                "max_steps": 40,
                "learning_rate": 1e-2,
                "warmup_ratio": 0.0,
                "batch_size": 8,
                "max_seq_length": 64,
                "gradient_checkpointing": False,
                "checkpoint_every_steps": 0,
            },
            "output": {"uri": str(adapter)},
            "progress": {"port": 0, "termination_message_path": str(work / "lora.msg")},
        }
    )
)

# What the operator renders for runtime vllm, with the model local.
adep = AdapterDeployment.model_validate(
    {
        "metadata": {"name": "smoke", "namespace": "default", "uid": "u"},
        "spec": {
            "model": {"uri": f"file://{model}"},
            "runtime": "vllm",
            "resources": {"gpus": 1},
            "adapters": [{"name": "smoke-lora", "uri": f"file://{adapter}"}],
        },
    }
)
resolved = serving.vllm_refusals(adep, serving.resolve_adapters(adep, {}))
plan = serving.serving_plan(adep, resolved)
container = serving.deployment(adep, plan, WorkerSettings(), [], resolved)["spec"]["template"]["spec"]["containers"][0]
token = secrets.token_urlsafe(32)
env = dict(os.environ)
for item in container["env"]:
    env[item["name"]] = token if item["name"] == "VLLM_API_KEY" else item["value"]
env.update(HOME=str(work), HF_HOME=str(work / "hf"))  # the pod's volumes, here
port = 18000
args = [a if a != "8000" else str(port) for a in container["args"]]
cli = Path(sys.executable).parent / "vllm"
command = [str(cli) if cli.exists() else "vllm", *container["command"][1:], *args]
command += ["--gpu-memory-utilization", "0.3", "--max-model-len", "256"]
results["command"] = command
log = (out / "gpu_vllm_smoke.server.log").open("w")
server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
base = f"http://127.0.0.1:{port}"
started = time.monotonic()
try:
    while True:
        if server.poll() is not None:
            raise SystemExit(f"vllm exited with {server.returncode}; see {log.name}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() - started > 900:
                raise SystemExit("vllm not healthy after 15 minutes") from None
            time.sleep(2)
    results["startup_seconds"] = round(time.monotonic() - started, 1)

    # 401 without the admin token.
    request = urllib.request.Request(
        f"{base}/v1/load_lora_adapter",
        data=json.dumps({"lora_name": "intruder", "lora_path": str(adapter)}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        urllib.request.urlopen(request, timeout=30)
        results["checks"]["load_without_token_401"] = False
    except urllib.error.HTTPError as error:
        results["checks"]["load_without_token_401"] = error.code == 401

    # The operator's pass loads the adapter, with the token.
    begin = time.monotonic()
    report = serving_reconcile.sync_vllm_pod(("smoke", "pod"), "127.0.0.1", port, plan, token)
    results["adapter_load_seconds"] = round(time.monotonic() - begin, 2)
    results["checks"]["adapter_loaded"] = report.loaded == {"smoke-lora": f"file://{adapter}"}
    results["failures"] = report.failures

    # The same greedy tokens as PEFT on the same artifact.
    prompt = "encode : c a t"
    request = urllib.request.Request(
        f"{base}/v1/completions",
        data=json.dumps({"model": "smoke-lora", "prompt": prompt, "max_tokens": 8, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    vllm_text = json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]["text"]
    import torch
    from transformers import AutoTokenizer

    from kubetune.worker.artifact import load_trained_model

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = load_trained_model(adapter, model).to("cuda").eval()
    encoded = tokenizer(prompt, return_tensors="pt").to("cuda")
    with torch.inference_mode():
        ids = reference.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    peft_text = tokenizer.decode(ids[0][encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    results["completion"] = {"vllm": vllm_text, "peft": peft_text}
    results["checks"]["greedy_matches_peft"] = vllm_text.split() == peft_text.split()

    # Unloading through the operator's code.
    empty = ServingPlan(model_uri=plan.model_uri, served_model_name=plan.served_model_name)
    serving_reconcile.sync_vllm_pod(("smoke", "pod"), "127.0.0.1", port, empty, token)
    request = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {token}"})
    served = [m["id"] for m in json.loads(urllib.request.urlopen(request, timeout=30).read())["data"]]
    results["checks"]["unloaded"] = "smoke-lora" not in served
finally:
    server.terminate()
    server.wait(timeout=60)

results["ok"] = all(results["checks"].values())
(out / "gpu_vllm_smoke.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
sys.exit(0 if results["ok"] else 1)
EOF
