"""The operator's side of the serving contract, against a real `kubetune serve --plan` (no cluster):
``serving_reconcile.sync_pod`` as a pass calls it on a ready pod.

Aspects:
- adapters that failed on the pod (declared at start-up, or hot-loaded by the pass) come back with
  the pod's CamelCase reason; a recorded sha256 that the artifact does not match is refused;
- a second pass over a settled pod only reads it: a failed adapter is not loaded again (the pod's
  record answers, its own retries back off), and an unchanged route table is not rewritten;
- every admin call carries the token: the right one hot-loads and unloads (a removed failed
  adapter is forgotten, which stops its retries), a wrong one is AdminUnauthorized, not a load
  failure.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune.operator import serving_reconcile
from kubetune.worker.serving_plan import ServingPlan
from tests.serving.conftest import ServeFactory

pytestmark = pytest.mark.torch

TOKEN = "operator-admin-token"


def _plan(root: Path, base: Path, adapters: list[dict[str, Any]]) -> ServingPlan:
    return ServingPlan.model_validate(
        {
            "model_uri": f"file://{base}",
            "served_model_name": "tiny",
            "adapters": adapters,
            "pvc_mount_root": str(root / "mnt"),
            "cache_dir": str(root / "cache"),
        }
    )


def _states(url: str) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in httpx.get(f"{url}/v1/adapters", timeout=10).json()["states"]}


def test_sync_pod_reports_failures_once_and_sends_the_token(
    artifacts: dict[str, Path], serve: ServeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.worker.serving import _manifest_sha256

    claim = tmp_path / "mnt" / "adapters"
    shutil.copytree(artifacts["lora-a"], claim / "lora-a")
    shutil.copytree(artifacts["lora-b"], claim / "lora-b")
    shutil.copytree(artifacts["lora-a"], claim / "corrupt")
    weights = next(p for p in (claim / "corrupt").iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    sha_a = _manifest_sha256(claim / "lora-a")

    declared = [
        {"name": "lora-a", "uri": "pvc://adapters/lora-a", "sha256": sha_a},
        {"name": "corrupt", "uri": "pvc://adapters/corrupt"},
    ]
    (tmp_path / "plan.json").write_text(_plan(tmp_path, artifacts["base"], declared).model_dump_json())
    (tmp_path / "token").write_text(TOKEN)
    url = serve("--plan", str(tmp_path / "plan.json"), "--admin-token-file", str(tmp_path / "token"))
    port = int(url.rsplit(":", 1)[1])

    # The pass adds lora-b (hot load) and a second name for lora-b under a hash it does not have.
    desired = _plan(
        tmp_path,
        artifacts["base"],
        [
            *declared,
            {"name": "lora-b", "uri": "pvc://adapters/lora-b"},
            {"name": "replaced", "uri": "pvc://adapters/lora-b", "sha256": "0" * 64},
        ],
    )
    report = serving_reconcile.sync_pod("127.0.0.1", port, desired, TOKEN)
    assert report.loaded == {"lora-a": "pvc://adapters/lora-a", "lora-b": "pvc://adapters/lora-b"}
    assert {n: reason for n, (reason, _) in report.failures.items()} == {
        "corrupt": "HashMismatch",
        "replaced": "HashMismatch",
    }
    assert all(message for _, message in report.failures.values())

    # A second pass over the settled pod only reads it: no load call for the failed adapters (the
    # pod retries them with its own backoff), no route write.
    calls: list[tuple[str, str]] = []
    call = serving_reconcile._call

    def recording(ip: str, port: int, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((method, path))
        return call(ip, port, method, path, *args, **kwargs)

    monkeypatch.setattr(serving_reconcile, "_call", recording)
    again = serving_reconcile.sync_pod("127.0.0.1", port, desired, TOKEN)
    assert again == report
    assert calls == [("GET", "/v1/adapters")]
    monkeypatch.undo()

    with pytest.raises(serving_reconcile.AdminUnauthorized):
        serving_reconcile.sync_pod("127.0.0.1", port, _plan(tmp_path, artifacts["base"], declared), "wrong")
    assert "lora-b" in _states(url)  # refused before anything changed

    # Removing adapters unloads them, the failed ones too: their retries stop.
    only_a = _plan(tmp_path, artifacts["base"], declared[:1])
    assert serving_reconcile.sync_pod("127.0.0.1", port, only_a, TOKEN).failures == {}
    assert set(_states(url)) == {"lora-a"}


def test_canary_steps_on_a_real_pods_counters(
    artifacts: dict[str, Path], serve: ServeFactory, tmp_path: Path
) -> None:
    """The operator's canary pass against a real pod: counters read from its /metrics, the step
    decided, the new weights written with the token. Bounds met: 50% then 100% (promoted); a latency
    bound no request meets: rolled back, the route left on the stable adapter."""
    import time

    from kubetune.api.v1alpha1 import AdapterDeployment
    from kubetune.operator import serving

    (tmp_path / "token").write_text(TOKEN)
    stable, canary = f"file://{artifacts['lora-a']}", f"file://{artifacts['lora-b']}"
    url = serve(
        "--model",
        str(artifacts["base"]),
        "--adapter",
        f"stable={stable}",
        "--adapter",
        f"canary={canary}",
        "--admin-token-file",
        str(tmp_path / "token"),
    )
    port = int(url.rsplit(":", 1)[1])

    def deployment(name: str, **bounds: Any) -> tuple[AdapterDeployment, Any]:
        backends = [{"adapter": "stable", "weight": 1}, {"adapter": "canary", "weight": 1}]
        canary_spec = {"adapter": "canary", "steps": [50, 100], "stepSeconds": 1, "minRequests": 4, **bounds}
        adep = AdapterDeployment.model_validate(
            {
                "metadata": {"name": "support", "namespace": "ns", "uid": "u"},
                "spec": {
                    "model": {"uri": f"file://{artifacts['base']}"},
                    "adapters": [{"name": "stable", "uri": stable}, {"name": "canary", "uri": canary}],
                    "routes": [{"name": name, "backends": backends, "canary": canary_spec}],
                },
            }
        )
        return adep, adep.spec.routes[0]

    def run(name: str, **bounds: Any) -> list[dict[str, Any]]:
        adep, route = deployment(name, **bounds)
        resolved = serving.resolve_adapters(adep, {})
        entry: dict[str, Any] | None = None
        seen = []
        for _ in range(40):
            traffic = serving_reconcile.pod_traffic("127.0.0.1", port).get("canary", serving.AdapterTraffic())
            entry, _event = serving.canary_progress(route, entry, traffic, time.time())
            seen.append(entry)
            plan = serving.serving_plan(adep, resolved, [entry])
            serving_reconcile.sync_pod("127.0.0.1", port, plan, TOKEN)
            table = {r["name"]: r for r in httpx.get(f"{url}/v1/adapters", timeout=10).json()["routes"]}
            live = [(b["adapter"], b["weight"]) for b in table[name]["backends"]]
            assert live == serving.canary_weights(route, entry)
            if entry["state"] != "Progressing":
                break
            for _ in range(6):
                body = {"model": name, "prompt": "encode : c a t", "max_tokens": 1}
                httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
            time.sleep(0.5)
        return seen

    steps = run("promoted")
    assert steps[0]["weight"] == 50
    assert steps[-1]["state"] == "Promoted", steps[-1]
    assert 100 in [s["weight"] for s in steps]

    rolled = run("rolled", maxMeanLatencySeconds=1e-9)
    assert rolled[-1]["state"] == "RolledBack" and "mean latency above" in rolled[-1]["message"], rolled[-1]
    table = {r["name"]: r for r in httpx.get(f"{url}/v1/adapters", timeout=10).json()["routes"]}
    assert [b["adapter"] for b in table["rolled"]["backends"]] == ["stable"]
