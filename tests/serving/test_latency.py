"""Decode latency per token, measured by the serving runtime (for ``kubetune compare``, issue 12).

Aspects:
- a load probes the adapter (one sequence alone, a few greedy tokens) and the background thread
  probes the base at start-up: ``GET /v1/adapters`` gives ``ms_per_token`` for each, and
  ``/metrics`` has ``kubetune_serve_ms_per_token{model, measure}``;
- served batches feed a moving average per adapter (``served_ms_per_token``);
- with mergeAdapter, the adapter's probe before merging is kept (``unmerged_ms_per_token``);
- an unloaded adapter's figures go with it; ``probe_tokens=0`` measures nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.torch


def test_probe_served_and_unload(artifacts: dict[str, Path]) -> None:
    from fastapi.testclient import TestClient

    from kubetune.localcluster.testing import wait_for
    from kubetune.worker.api_server import create_app
    from kubetune.worker.serving import ModelServer

    server = ModelServer(artifacts["base"], adapter_roots=[artifacts["root"]])
    server.declare("ia3", artifacts["ia3"])
    with TestClient(create_app(server)) as http:
        wait_for(lambda: http.get("/ready").status_code == 200, 120, interval=0.2)
        server.load_adapter("lora-a", artifacts["lora-a"])
        report = http.get("/v1/adapters").json()
        base = report["base"]["ms_per_token"]
        probed = {a["name"]: a["ms_per_token"] for a in report["adapters"]}
        assert base > 0 and set(probed) == {"ia3", "lora-a"} and all(v > 0 for v in probed.values())
        assert all(a["served_ms_per_token"] is None for a in report["adapters"])

        answer = http.post("/v1/completions", json={"model": "lora-a", "prompt": "a", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        served = {a["name"]: a["served_ms_per_token"] for a in http.get("/v1/adapters").json()["adapters"]}
        assert served["lora-a"] is not None and served["lora-a"] > 0 and served["ia3"] is None

        metrics = http.get("/metrics").text
        assert f'kubetune_serve_ms_per_token{{measure="probe",model="{server.base_name}"}}' in metrics
        assert 'kubetune_serve_ms_per_token{measure="served",model="lora-a"}' in metrics

        server.unload_adapter("lora-a")
        assert "lora-a" not in server.latency
        after = http.get("/metrics").text.splitlines()
        latency_lines = [line for line in after if line.startswith("kubetune_serve_ms_per_token")]
        assert latency_lines and not [line for line in latency_lines if "lora-a" in line]


def test_merged_keeps_the_unmerged_probe(artifacts: dict[str, Path]) -> None:
    from kubetune.worker.serving import ModelServer, describe

    server = ModelServer(artifacts["base"], merge=True)
    server.load_adapter("support", artifacts["lora-a"])
    (entry,) = describe(server)["adapters"]
    assert entry["ms_per_token"] > 0 and entry["unmerged_ms_per_token"] > 0


def test_no_probe_when_turned_off(artifacts: dict[str, Path]) -> None:
    from kubetune.worker.serving import ModelServer

    server = ModelServer(artifacts["base"], probe_tokens=0)
    server.load_adapter("lora-a", artifacts["lora-a"])
    assert server.latency == {}
