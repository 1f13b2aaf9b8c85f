"""``make demo``: train, then serve, on the embedded local cluster.

1. starts a local Kubernetes (etcd, apiserver, controller-manager, scheduler, a node agent that
   runs every pod as a real container with podman);
2. installs the CRDs and the operator with the Helm chart, from the images `make images` built
   (the operator, the worker and the server each run as a container of those images);
3. puts a small Llama-architecture model and a synthetic task (a letter cipher) on a
   PersistentVolumeClaim;
4. applies a LoRA FineTuneJob and follows its progress from status until the artifact is published;
5. applies an AdapterDeployment serving the adapter and asks base and adapter the same question over
   the OpenAI-compatible API;
6. stops the cluster (``--keep`` leaves it running and prints the KUBECONFIG).

Nothing is downloaded: the model is built from a config and its data is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from kubetune.api import crdgen, v1alpha1
from kubetune.localcluster.controlplane import ClusterOptions, LocalCluster, NodeOptions
from kubetune.localcluster.testing import BuiltImages, ClusterHandle, wait_for
from kubetune.worker.testing import make_tiny_model, task_records, write_records

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "demo"
QUESTION = "encode : h e l l o"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def finetunejob(steps: int) -> dict[str, Any]:
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": "cipher-lora", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "pvc://data/base"},
            "dataset": {"uri": "pvc://data/cipher.jsonl", "format": "completion", "evalFraction": 0.1},
            "method": {"type": "lora", "lora": {"rank": 16, "alpha": 32}},
            "training": {
                "maxSteps": steps,
                "batchSize": 16,
                "learningRate": 3.0e-3,
                "maxSeqLength": 64,
                "checkpointEverySteps": 50,
            },
            "resources": {"gpusPerNode": 0, "cpu": "2", "memory": "4Gi"},
            "output": {"uri": "pvc://data/adapters/cipher-lora"},
        },
    }


def adapterdeployment() -> dict[str, Any]:
    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {"name": "cipher", "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": "pvc://data/base"},
            "adapters": [{"name": "cipher-v1", "fineTuneJob": "cipher-lora"}],
            "resources": {"cpu": "1", "memory": "2Gi"},
        },
    }


def get(api: client.CustomObjectsApi, plural: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = api.get_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, plural, name
    )
    return result


def run_demo(handle: ClusterHandle, images: BuiltImages, steps: int) -> None:
    api_client = handle.api_client()
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)

    say("installing the CRDs and the operator (Helm chart)")
    crdgen.apply(api_client)
    handle.helm(
        "install", "kubetune", str(ROOT / "charts" / "kubetune"), "--namespace", "kubetune-system",
        "--create-namespace", "--skip-crds", *images.helm_values(), "--wait", "--timeout", "180s",
    )  # fmt: skip
    print(handle.kubectl("get", "deploy,pods", "-n", "kubetune-system").stdout)

    say("putting a small model and a synthetic dataset on a PersistentVolumeClaim")
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    wait_for(lambda: core.list_namespaced_service_account(NAMESPACE).items, 30, description="default SA")
    core.create_namespaced_persistent_volume_claim(
        NAMESPACE,
        {
            "metadata": {"name": "data"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )

    def bound() -> str | None:
        pvc = core.read_namespaced_persistent_volume_claim("data", NAMESPACE)
        return pvc.spec.volume_name if pvc.status.phase == "Bound" else None  # type: ignore[union-attr]

    volume = wait_for(bound, 60, description="the claim to bind")
    claim_dir = Path(core.read_persistent_volume(volume).spec.host_path.path)  # type: ignore[union-attr]
    claim_dir.mkdir(parents=True, exist_ok=True)
    make_tiny_model(claim_dir / "base", size="small")
    write_records(claim_dir / "cipher.jsonl", task_records(2000, fmt="completion"))
    print(f"model and data in {claim_dir}")

    say(f"training: LoRA, {steps} steps (kubectl get ftj -n {NAMESPACE})")
    custom.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, "finetunejobs", finetunejob(steps)
    )
    last = ""
    deadline = time.monotonic() + 1800
    while True:
        status = get(custom, "finetunejobs", "cipher-lora").get("status") or {}
        progress = status.get("progress") or {}
        summary, loss = progress.get("summary", "-"), progress.get("loss", "-")
        line = f"  phase={status.get('phase')} progress={summary} loss={loss}"
        if line != last:
            print(line, flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            break
        if time.monotonic() > deadline:
            raise SystemExit("training did not finish in 30 minutes")
        time.sleep(2)
    if status["phase"] != "Succeeded":
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        raise SystemExit(f"training failed: {failed['reason']}: {failed['message']}")
    manifest = json.loads((claim_dir / "adapters" / "cipher-lora" / "kubetune.json").read_text())
    metrics = manifest["metrics"]
    print(json.dumps({k: metrics[k] for k in sorted(metrics) if not isinstance(metrics[k], dict)}, indent=2))

    say(f"serving: base + adapter behind the OpenAI API (kubectl get adep -n {NAMESPACE})")
    custom.create_namespaced_custom_object(
        v1alpha1.GROUP, v1alpha1.VERSION, NAMESPACE, "adapterdeployments", adapterdeployment()
    )
    wait_for(
        lambda: (get(custom, "adapterdeployments", "cipher").get("status") or {}).get("phase") == "Ready",
        600,
        interval=1,
        description="the AdapterDeployment to be Ready",
    )
    print(handle.kubectl("get", "ftj,adep", "-n", NAMESPACE).stdout)
    # Through the Service, as a client in the cluster would (the local cluster proxies ClusterIPs).
    service = core.read_namespaced_service("cipher", NAMESPACE)
    url = f"http://{service.spec.cluster_ip}:8000/v1"  # type: ignore[union-attr]
    models = [m["id"] for m in httpx.get(f"{url}/models").json()["data"]]
    print(f"models: {models}  (the first is the base model)")
    for model in models:
        body = {"model": model, "prompt": QUESTION, "max_tokens": 6, "temperature": 0}
        response = httpx.post(f"{url}/completions", json=body, timeout=120)
        response.raise_for_status()
        print(f"  {model:10} {QUESTION!r} -> {response.json()['choices'][0]['text']!r}")
    print("  (the cipher shifts each letter by one: the answer is 'i f m m p')")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    args = parser.parse_args()

    images = BuiltImages.read(ROOT / "_out" / "images.env")
    say(f"starting the embedded local cluster (images: {images.operator}, {images.worker})")
    cluster = LocalCluster(ClusterOptions(name="demo", nodes=[NodeOptions(runtime="podman")]))
    cluster.start()
    try:
        handle = ClusterHandle(cluster.kubeconfig, cluster)
        run_demo(handle, images, args.steps)
        say("done")
        if args.keep:
            print(f"cluster left running: export KUBECONFIG={cluster.kubeconfig}")
            print("press Ctrl-C to stop it")
            while True:
                time.sleep(3600)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
