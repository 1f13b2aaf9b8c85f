"""Pure builders and status of an AdapterDeployment, without a cluster.

Aspects:
- adapters resolve from FineTuneJob results or URIs; unfinished jobs leave them Pending and out of
  the serving plan, and routes keep only servable backends;
- the base model's API name never collides with an adapter or route;
- recorded artifact hashes reach the serving plan; trustRemoteCode reaches it too;
- the Deployment mounts every claim read-only, probes /ready for readiness and /health for
  liveness, runs non-root, and changes its pod template on adapter changes only under
  updateStrategy Rolling; its pods carry the managed-by label the operator's pod watch selects on;
- the admin-token Secret (owned, generated once) and the optional API keys are mounted as whole
  volumes and named by file, never put in the pod spec;
- a PodDisruptionBudget exists only for more than one replica;
- per-adapter states (with the pods' failure reasons) and conditions from what ready pods report:
  Ready with the adapters that load, Degraded naming those that failed; one Event per failure
  transition, not per pass; unsupported options are named;
- runtime vllm: the vLLM Deployment (--enable-lora, --max-loras and --max-lora-rank from the
  adapters, runtime LoRA updating, the admin token as its API key), and what vLLM cannot serve
  (other methods, DoRA, ranks above 512, s3:// sources, routes, client API keys) refused by name.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import AdapterDeployment
from kubetune.operator import events, serving
from kubetune.operator.builders import WorkerSettings
from kubetune.worker.serving_plan import ServingPlan
from tests.api.cases import adapterdeployment

SHA = "ab" * 32
JOBS = {
    "support-lora": {
        "spec": {"output": {"uri": "pvc://adapters/support-lora"}},
        "status": {"phase": "Succeeded", "result": {"uri": "pvc://adapters/support-lora", "sha256": SHA}},
    }
}


def _adep(**spec: Any) -> AdapterDeployment:
    manifest = adapterdeployment()
    manifest["metadata"].update(namespace="team-a", uid="u1", generation=2)
    manifest["spec"].update(spec)
    return AdapterDeployment.model_validate(manifest)


def test_resolution_and_plan() -> None:
    adep = _adep()
    resolved = serving.resolve_adapters(adep, JOBS)
    assert [(r.name, r.uri, r.state, r.sha256) for r in resolved] == [
        ("support-v1", "pvc://adapters/support-lora", "Resolved", SHA),
        ("support-v2", "s3://adapters/support-v2", "Resolved", None),
    ]
    # The recorded hash reaches the pods: they refuse an artifact replaced after the run.
    assert [(a.name, a.sha256) for a in serving.serving_plan(adep, resolved).adapters] == [
        ("support-v1", SHA),
        ("support-v2", None),
    ]
    pending = serving.resolve_adapters(adep, {"support-lora": {"spec": {}, "status": {"phase": "Running"}}})
    assert pending[0].state == "Pending" and "Running" in pending[0].message
    plan = serving.serving_plan(adep, pending)
    assert [a.name for a in plan.adapters] == ["support-v2"]
    assert [(b.adapter, b.weight) for b in plan.routes[0].backends] == [("support-v2", 10)]
    assert plan.served_model_name == "Qwen/Qwen2.5-0.5B-Instruct"


def test_base_name_avoids_collisions() -> None:
    adep = _adep(
        model={"uri": "pvc://models/support"},
        routes=[],
        adapters=[{"name": "support", "uri": "s3://bucket/b"}],
    )
    assert serving.base_model_name(adep) == "support-base"


def test_deployment_and_service() -> None:
    adep = _adep(replicas=3, resources={"gpus": 1, "memory": "8Gi"})
    plan = serving.serving_plan(adep, serving.resolve_adapters(adep, JOBS))
    manifest = serving.deployment(adep, plan, WorkerSettings(image="example/kt:1"), ["adapters"])
    spec = manifest["spec"]
    assert spec["replicas"] == 3 and spec["selector"]["matchLabels"] == serving.selector_labels(adep)
    # The operator's pod watch selects on managed-by, server-side.
    assert spec["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][-2:] == ["--plan", "/etc/kubetune/serving.json"]
    # Ready once every declared adapter was tried; alive as soon as the base is loaded.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "adapters", "readOnly": True}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert serving.ANNOTATION_PLAN_HASH not in spec["template"]["metadata"]["annotations"]
    svc = serving.service(adep)
    assert svc["spec"]["ports"][0]["port"] == 8000 and svc["spec"]["selector"] == serving.selector_labels(
        adep
    )
    assert serving.endpoint(adep) == "http://support.team-a.svc:8000/v1"


def test_rolling_strategy_hashes_the_plan() -> None:
    adep = _adep(updateStrategy="Rolling")
    resolved = serving.resolve_adapters(adep, JOBS)
    one = serving.deployment(adep, serving.serving_plan(adep, resolved), WorkerSettings(), [])
    two = serving.deployment(adep, serving.serving_plan(adep, resolved[:1]), WorkerSettings(), [])
    key = serving.ANNOTATION_PLAN_HASH
    assert (
        one["spec"]["template"]["metadata"]["annotations"][key]
        != two["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_admin_token_secret_and_api_keys_are_mounted() -> None:
    adep = _adep(apiKeysSecret="support-keys")
    plan = serving.serving_plan(adep, serving.resolve_adapters(adep, JOBS))
    pod = serving.deployment(adep, plan, WorkerSettings(), [])["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for volume, secret, key, variable in (
        ("admin-token", "support-admin-token", "token", "KUBETUNE_ADMIN_TOKEN_FILE"),
        ("api-keys", "support-keys", "keys", "KUBETUNE_API_KEY_FILE"),
    ):
        source = volumes[volume]["secret"]
        assert source["secretName"] == secret and source["items"] == [{"key": key, "path": key}]
        # Whole-volume mounts (no subPath): a rotated Secret reaches the running pod.
        assert mounts[volume]["readOnly"] is True and "subPath" not in mounts[volume]
        assert env[variable] == f"{mounts[volume]['mountPath']}/{key}"
    # The token is in a mounted file, never in the pod spec.
    assert "KUBETUNE_ADMIN_TOKEN" not in env

    open_api = serving.deployment(_adep(), plan, WorkerSettings(), [])["spec"]["template"]["spec"]
    assert "api-keys" not in {v["name"] for v in open_api["volumes"]}
    assert "admin-token" in {v["name"] for v in open_api["volumes"]}

    secret = serving.admin_secret(adep, "s3cr3t")
    assert secret["metadata"]["name"] == "support-admin-token"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert serving.admin_token(secret) == "s3cr3t"
    assert serving.admin_token(None) is None and serving.admin_token({"data": {}}) is None


def test_disruption_budget_only_for_several_replicas() -> None:
    assert serving.disruption_budget(_adep(replicas=1)) is None
    budget = serving.disruption_budget(_adep(replicas=3))
    assert budget is not None
    assert budget["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": serving.selector_labels(_adep())},
    }


def test_trust_remote_code_reaches_the_plan() -> None:
    adep = _adep(model={"uri": "hf://org/custom", "trustRemoteCode": True})
    assert serving.serving_plan(adep, serving.resolve_adapters(adep, JOBS)).trust_remote_code is True
    assert serving.serving_plan(_adep(), []).trust_remote_code is False


def test_adapter_states_and_conditions() -> None:
    adep = _adep(replicas=2)
    resolved = serving.resolve_adapters(adep, JOBS)
    both = {"support-v1": "pvc://adapters/support-lora", "support-v2": "s3://adapters/support-v2"}
    one = serving.PodReport(loaded={"support-v1": "pvc://adapters/support-lora"})
    states = serving.adapter_statuses(resolved, [serving.PodReport(loaded=both), one])
    assert [(a["state"], a["loadedReplicas"], a["sha256"]) for a in states] == [
        ("Loaded", 2, SHA),
        ("Loading", 1, ""),
    ]
    conditions = {c["type"]: c["status"] for c in serving.conditions_for(adep, 2, states)}
    assert conditions == {
        "Ready": "False",
        "Progressing": "True",
        "AdaptersLoaded": "False",
        "Degraded": "False",
    }

    # A failed adapter is reported with the pod's reason; the replicas still turn Ready with the
    # adapters that loaded, and Degraded says what does not serve.
    failed_pod = serving.PodReport(
        loaded={"support-v1": "pvc://adapters/support-lora"},
        failures={"support-v2": ("HashMismatch", "adapter_model.safetensors differs from the manifest")},
    )
    failed = serving.adapter_statuses(resolved, [failed_pod, failed_pod])
    assert [(a["state"], a["reason"]) for a in failed] == [("Loaded", ""), ("Failed", "HashMismatch")]
    assert "(on 2/2 ready replicas)" in failed[1]["message"]
    degraded = {c["type"]: c for c in serving.conditions_for(adep, 2, failed)}
    assert degraded["Ready"]["status"] == "True" and "1 failed" in degraded["Ready"]["message"]
    assert (degraded["Degraded"]["status"], degraded["Degraded"]["reason"]) == ("True", "AdapterFailed")
    assert "support-v2: HashMismatch: adapter_model" in degraded["Degraded"]["message"]
    assert serving.phase_for(list(degraded.values())) == "Degraded"

    ready = serving.conditions_for(
        adep, 2, serving.adapter_statuses(resolved, [serving.PodReport(loaded=both)] * 2)
    )
    assert serving.phase_for(ready) == "Ready"

    refused = {c["type"]: c for c in serving.conditions_for(adep, 2, states, admin_error="HTTP 401")}
    assert refused["Degraded"]["reason"] == "AdminUnauthorized"


def test_events_on_adapter_failure_transitions() -> None:
    def adapter(state: str, reason: str = "", source: str = "s3://a") -> dict[str, Any]:
        return {"name": "a", "source": source, "state": state, "reason": reason, "message": "m"}

    def kinds(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in serving.adapter_events(before, after)]

    assert kinds([], [adapter("Failed", "MissingFiles")]) == [("Warning", "AdapterFailed")]
    assert kinds([adapter("Loading")], [adapter("Failed", "MissingFiles")]) == [("Warning", "AdapterFailed")]
    # The same failure seen again is no news: one Event per transition, not per pass.
    assert kinds([adapter("Failed", "MissingFiles")], [adapter("Failed", "MissingFiles")]) == []
    assert kinds([adapter("Failed", "MissingFiles")], [adapter("Failed", "HashMismatch")]) == [
        ("Warning", "AdapterFailed")
    ]
    assert kinds([adapter("Failed", "X")], [adapter("Failed", "X", source="s3://b")]) == [
        ("Warning", "AdapterFailed")
    ]
    assert kinds([adapter("Failed", "X")], [adapter("Loaded")]) == [("Normal", "AdapterLoaded")]
    assert kinds([adapter("Loading")], [adapter("Loaded")]) == []


def test_a_first_failure_is_one_event() -> None:
    """The write that turns Degraded to AdapterFailed posts that condition's Event, which names the
    adapter: the adapter's own Event would be a second one for the same failure."""
    healthy = _adep()
    first = [{"name": "a", "source": "s3://a", "state": "Failed", "reason": "HashMismatch", "message": "m"}]
    before = serving.conditions_for(healthy, 1, [{**first[0], "state": "Loaded", "reason": ""}])
    after = serving.conditions_for(healthy, 1, first)
    condition_events = [e for e in events.transitions(before, after) if e.type == "Warning"]
    assert [e.reason for e in condition_events] == ["AdapterFailed"]
    assert "a: HashMismatch: m" in condition_events[0].message
    covered = any(e.reason == "AdapterFailed" for e in condition_events)
    assert serving.adapter_events([], first, failures_in_condition=covered) == []
    # A second adapter failing while Degraded already says AdapterFailed: no condition transition,
    # so its own Event is the one.
    second = [*first, {**first[0], "name": "b", "reason": "MissingFiles"}]
    again = events.transitions(after, serving.conditions_for(healthy, 1, second))
    assert not any(e.reason == "AdapterFailed" for e in again)
    assert [e.reason for e in serving.adapter_events(first, second)] == ["AdapterFailed"]


def _vllm(adapters: list[dict[str, Any]], **spec: Any) -> AdapterDeployment:
    return _adep(runtime="vllm", resources={"gpus": 2}, routes=[], adapters=adapters, **spec)


def _job(method: dict[str, Any]) -> dict[str, Any]:
    return {
        "spec": {"output": {"uri": "pvc://adapters/x"}, "method": method},
        "status": {"phase": "Succeeded", "result": {"uri": "pvc://adapters/x", "sha256": SHA}},
    }


def test_vllm_deployment_rendering() -> None:
    adep = _vllm(
        [{"name": f"a{i}", "fineTuneJob": f"job{i}"} for i in range(3)],
        model={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "revision": "main", "trustRemoteCode": True},
    )
    jobs = {
        "job0": _job({"type": "lora", "lora": {"rank": 8}}),
        "job1": _job({"type": "qlora", "lora": {"rank": 40}}),
        "job2": _job({"type": "lora"}),  # the API's default rank, 16
    }
    resolved = serving.vllm_refusals(adep, serving.resolve_adapters(adep, jobs))
    assert [r.problem for r in resolved] == ["", "", ""]
    plan = serving.serving_plan(adep, resolved)
    manifest = serving.deployment(adep, plan, WorkerSettings(image="example/kt:1"), ["adapters"], resolved)
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == serving.VLLM_IMAGE
    assert container["command"] == ["vllm", "serve", "Qwen/Qwen2.5-0.5B-Instruct"]
    args = container["args"]

    def flag(name: str) -> str:
        return str(args[args.index(name) + 1])

    assert "--enable-lora" in args and "--trust-remote-code" in args
    # Three adapters: --max-loras 4 (room to add one without rolling the pods); rank 40 -> 64,
    # the next value vLLM accepts.
    assert (flag("--max-loras"), flag("--max-lora-rank")) == ("4", "64")
    assert (flag("--served-model-name"), flag("--revision"), flag("--tensor-parallel-size")) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        "main",
        "2",
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]["value"] == "True"
    # The admin token is vLLM's API key, from the Secret, never written in the spec.
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "support-admin-token", "key": "token"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory"}}
    assert "admin-token" not in volumes  # vLLM reads its key from the environment
    # Adapters load through the API after start, so the template does not name them (HotReload).
    assert not any("a0" in str(a) for a in args)

    assert serving.vllm_path("pvc://adapters/a/b") == "/mnt/pvc/adapters/a/b"
    assert serving.vllm_path("hf://org/adapter") == "org/adapter"
    assert serving.vllm_path("s3://bucket/a") is None


def test_vllm_limits() -> None:
    def limits(*ranks: int | None) -> tuple[int, int]:
        return serving.vllm_lora_limits(
            [serving.AdapterResolution(f"a{i}", "pvc://c/a", "Resolved", rank=r) for i, r in enumerate(ranks)]
        )

    assert limits() == (1, 16)
    assert limits(4) == (1, 8)
    assert limits(4, 8) == (2, 8)
    assert limits(1) == (1, 1)
    assert limits(300, 4, 4, 4, 4) == (8, 320)
    # A bare uri's rank is unknown: at least vLLM's default.
    assert limits(4, None) == (2, 16)


def test_vllm_refuses_what_it_cannot_serve() -> None:
    adep = _vllm(
        [
            {"name": "ia3", "fineTuneJob": "ia3"},
            {"name": "dora", "fineTuneJob": "dora"},
            {"name": "huge", "fineTuneJob": "huge"},
            {"name": "s3", "uri": "s3://bucket/a"},
            {"name": "fine", "fineTuneJob": "fine"},
        ]
    )
    jobs = {
        "ia3": _job({"type": "ia3"}),
        "dora": _job({"type": "lora", "lora": {"rank": 8, "dora": True}}),
        "huge": _job({"type": "lora", "lora": {"rank": 1024}}),
        "fine": _job({"type": "lora", "lora": {"rank": 8}}),
    }
    resolved = serving.vllm_refusals(adep, serving.resolve_adapters(adep, jobs))
    problems = {r.name: r.problem for r in resolved}
    assert "LoRA adapters only, not method ia3" in problems["ia3"]
    assert "DoRA" in problems["dora"]
    assert "rank 1024" in problems["huge"]
    assert "s3://" in problems["s3"]
    assert problems["fine"] == ""
    # Refused adapters never reach the pods, and say why on the resource.
    assert [a.name for a in serving.serving_plan(adep, resolved).adapters] == ["fine"]
    states = serving.adapter_statuses(resolved, [serving.PodReport(loaded={"fine": "pvc://adapters/x"})])
    assert {a["name"]: (a["state"], a["reason"]) for a in states} == {
        "ia3": ("Failed", "Unsupported"),
        "dora": ("Failed", "Unsupported"),
        "huge": ("Failed", "Unsupported"),
        "s3": ("Failed", "Unsupported"),
        "fine": ("Loaded", ""),
    }
    # The ranks of refused adapters do not size vLLM.
    assert serving.vllm_lora_limits(resolved) == (1, 8)

    # What the whole object asks that vLLM cannot do is refused in a condition.
    assert serving.unsupported(adep) is None
    routed = _adep(runtime="vllm", resources={"gpus": 1})
    assert "routes need runtime kubetune" in str(serving.unsupported(routed))
    keyed = _vllm([], apiKeysSecret="keys")
    assert "apiKeysSecret needs runtime kubetune" in str(serving.unsupported(keyed))
    from_s3 = _vllm([], model={"uri": "s3://bucket/model"})
    assert "reads the model from pvc://" in str(serving.unsupported(from_s3))


def test_merge_adapter_reaches_the_plan_and_vllm_refuses_it() -> None:
    merged = _adep(mergeAdapter=True, routes=[], adapters=[{"name": "x", "uri": "s3://bucket/b"}])
    assert serving.unsupported(merged) is None
    assert serving.serving_plan(merged, serving.resolve_adapters(merged, {})).merge_adapter is True
    plain = serving.serving_plan(_adep(), [])
    assert plain.merge_adapter is False
    # The ConfigMap leaves defaults out (an older serving image reads it) and round-trips.
    text = serving.plan_configmap(_adep(), plain)["data"][serving.PLAN_KEY]
    assert "merge_adapter" not in text and ServingPlan.model_validate_json(text) == plain
    text = serving.plan_configmap(merged, serving.serving_plan(merged, []))["data"][serving.PLAN_KEY]
    assert ServingPlan.model_validate_json(text).merge_adapter is True
    on_vllm = _vllm([{"name": "x", "uri": "pvc://c/x"}], mergeAdapter=True)
    assert "mergeAdapter needs runtime kubetune" in str(serving.unsupported(on_vllm))


def test_operator_side_backoff_for_runtimes_that_do_not_retry() -> None:
    from kubetune.operator.serving_reconcile import Backoff

    backoff = Backoff()
    key = ("adep-uid", "pod-uid", "a", "/mnt/pvc/c/a")
    assert backoff.pending(key) is None
    backoff.failed(key, ("LoadError", "rank 64 > max_lora_rank 16"))
    # Within the backoff the recorded failure answers: the next pass loads nothing.
    assert backoff.pending(key) == ("LoadError", "rank 64 > max_lora_rank 16")
    assert backoff.pending(("adep-uid", "pod-uid", "a", "/mnt/pvc/c/b")) is None  # a new source: at once
    backoff.keep_only("adep-uid", {"pod-uid"})
    assert backoff.pending(key) is not None
    backoff.keep_only("other-adep", set())  # another object's pods are not this one's
    assert backoff.pending(key) is not None
    backoff.keep_only("adep-uid", {"another-pod"})  # the pod went away
    assert backoff.pending(key) is None


def _canary_route(**canary: Any) -> Any:
    adep = _adep(
        routes=[
            {
                "name": "support",
                "backends": [{"adapter": "support-v1", "weight": 3}, {"adapter": "support-v2", "weight": 1}],
                "canary": {"adapter": "support-v2", "steps": [10, 50, 100], "stepSeconds": 60, **canary},
            }
        ]
    )
    return adep, adep.spec.routes[0]


def test_canary_weights() -> None:
    adep, route = _canary_route()
    assert serving.canary_weights(route, None) == [("support-v2", 10), ("support-v1", 90)]
    assert serving.canary_weights(route, {"state": "Progressing", "weight": 50}) == [
        ("support-v2", 50),
        ("support-v1", 50),
    ]
    assert serving.canary_weights(route, {"state": "Promoted", "weight": 100}) == [("support-v2", 100)]
    assert serving.canary_weights(route, {"state": "RolledBack", "weight": 0}) == [("support-v1", 100)]
    # The canary's weights reach the live plan; a route without canary keeps its own.
    plan = serving.serving_plan(
        adep, serving.resolve_adapters(adep, JOBS), [{"route": "support", "weight": 50}]
    )
    assert [(b.adapter, b.weight) for b in plan.routes[0].backends] == [
        ("support-v2", 50),
        ("support-v1", 50),
    ]


def test_canary_steps_promotes_and_rolls_back() -> None:
    _, route = _canary_route(minRequests=10, maxErrorRate=0.1, maxMeanLatencySeconds=2.0)
    T = serving.AdapterTraffic

    start, event = serving.canary_progress(route, None, T(5, 0, 1), now=1000)
    assert (start["state"], start["weight"], start["baseRequests"]) == ("Progressing", 10, 5)
    assert event is not None and event.reason == "CanaryStarted"
    # Too few requests, or too early: no change, no Event.
    assert serving.canary_progress(route, start, T(9, 0, 2), now=2000) == (start, None)
    assert serving.canary_progress(route, start, T(40, 1, 10), now=1030) == (start, None)
    # Enough requests within bounds after stepSeconds: the next step, counted from here.
    second, event = serving.canary_progress(route, start, T(40, 1, 10), now=1061)
    assert (second["state"], second["step"], second["weight"], second["stepStartedAt"]) == (
        "Progressing",
        1,
        50,
        1061,
    )
    assert event is not None and event.reason == "CanaryStepped" and "10% -> 50%" in event.message
    third, _ = serving.canary_progress(route, second, T(80, 2, 20), now=1130)
    assert third["weight"] == 100 and third["step"] == 2
    promoted, event = serving.canary_progress(route, third, T(120, 3, 30), now=1200)
    assert promoted["state"] == "Promoted" and event is not None and event.type == "Normal"
    assert serving.canary_progress(route, promoted, T(500, 400, 30), now=9999) == (promoted, None)

    # Errors above the bound roll back at once, without waiting for the step to end.
    failed, event = serving.canary_progress(route, start, T(25, 5, 4), now=1001)
    assert (failed["state"], failed["weight"]) == ("RolledBack", 0)
    assert event is not None and event.type == "Warning" and event.reason == "CanaryRolledBack"
    assert "error rate 25.0%" in failed["message"]
    slow, _ = serving.canary_progress(route, start, T(25, 0, 100), now=1001)
    assert slow["state"] == "RolledBack" and "mean latency above 2.0 s" in slow["message"]
    # Counters that went down (a pod restarted) start the step's count again, keeping its start.
    reset, event = serving.canary_progress(route, second, T(3, 0, 1), now=1100)
    assert (reset["baseRequests"], reset["stepStartedAt"], event) == (3, 1061, None)


def test_canary_condition_keeps_the_object_progressing() -> None:
    adep, _ = _canary_route()
    adapters = serving.adapter_statuses(
        serving.resolve_adapters(adep, JOBS),
        [
            serving.PodReport(
                loaded={"support-v1": "pvc://adapters/support-lora", "support-v2": "s3://adapters/support-v2"}
            )
        ],
    )
    running = [
        {"route": "support", "adapter": "support-v2", "state": "Progressing", "weight": 10, "message": ""}
    ]
    conditions = {c["type"]: c for c in serving.conditions_for(adep, 1, adapters, canaries=running)}
    assert (conditions["Canary"]["status"], conditions["Canary"]["reason"]) == ("True", "CanaryProgressing")
    # Progressing while the canary runs: the converge timer keeps passing (it reads the phase).
    assert conditions["Progressing"]["reason"] == "Canary"
    assert serving.phase_for(list(conditions.values())) == "Progressing"
    back = [{**running[0], "state": "RolledBack", "weight": 0}]
    conditions = {c["type"]: c for c in serving.conditions_for(adep, 1, adapters, canaries=back)}
    assert (conditions["Canary"]["status"], conditions["Canary"]["reason"]) == ("False", "CanaryRolledBack")
    assert serving.phase_for(list(conditions.values())) == "Ready"


def test_polling_only_what_can_change_without_an_event() -> None:
    def status(*adapters: tuple[str, str], phase: str = "Degraded", ready: int = 1, **extra: Any) -> Any:
        listed = [{"name": f"a{i}", "state": s, "reason": r} for i, (s, r) in enumerate(adapters)]
        return {"readyReplicas": ready, "phase": phase, "adapters": listed, **extra}

    assert serving.needs_polling(status(("Loading", ""), phase="Progressing"))
    assert serving.needs_polling(status(("Loaded", ""), ("Failed", "DownloadFailed")))
    # Permanently failed, converged, idle (no ready pod: pod events wake it) or Failed: no timer.
    assert not serving.needs_polling(status(("Loaded", ""), ("Failed", "HashMismatch")))
    assert not serving.needs_polling(status(("Failed", "Unsupported")))
    assert not serving.needs_polling(status(("Loaded", ""), phase="Ready"))
    assert not serving.needs_polling(status(("Loading", ""), ready=0))
    assert not serving.needs_polling({"phase": "Failed"})
    # A canary's step waits on the pods' counters.
    stepping = status(("Loaded", ""), phase="Progressing", canaries=[{"state": "Progressing"}])
    assert serving.needs_polling(stepping)
    done = status(("Loaded", ""), phase="Ready", canaries=[{"state": "Promoted"}])
    assert not serving.needs_polling(done)


def test_polls_back_off_while_nothing_changes() -> None:
    from kubetune.operator.serving_reconcile import PollSchedule

    polls = PollSchedule()
    loading = {"phase": "Progressing", "adapters": [{"name": "a", "state": "Failed", "reason": "LoadError"}]}
    assert polls.due("u", now=0)
    delays = [polls.passed("u", loading, now=0) for _ in range(9)]
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert not polls.due("u", now=299) and polls.due("u", now=300)
    # A pass that changes the status starts again at 5 s; so does a failed pass after a good one.
    assert polls.passed("u", {**loading, "phase": "Degraded"}, now=0) == 5
    assert polls.passed("u", None, now=0) == 5
    assert polls.passed("u", None, now=0) == 10
    # A stepping canary is polled at the first interval.
    stepping = {**loading, "canaries": [{"state": "Progressing"}]}
    assert [polls.passed("c", stepping, now=0) for _ in range(3)] == [5, 5, 5]
    polls.forget("u")
    assert polls.due("u", now=0)


def test_decode_latency_in_status() -> None:
    """A pod's /v1/adapters latency figures become adapters[].msPerToken (median over the replicas
    serving that source), unmergedMsPerToken with mergeAdapter, and baseMsPerToken; unknown ones are
    left out, never written as null."""
    report = {
        "base": {"name": "tiny", "ms_per_token": 2.0},
        "adapters": [
            {"name": "a", "ms_per_token": 3.0, "unmerged_ms_per_token": 4.5},
            {"name": "b", "ms_per_token": None},
        ],
    }
    probed, unmerged = serving.pod_latencies(report)
    assert probed == {serving.BASE_LATENCY: 2.0, "a": 3.0} and unmerged == {"a": 4.5}
    resolved = [
        serving.AdapterResolution("a", "s3://a", "Resolved"),
        serving.AdapterResolution("b", "s3://b", "Resolved"),
    ]
    loaded = {"a": "s3://a", "b": "s3://b"}
    pods = [
        serving.PodReport(loaded=loaded, ms_per_token=probed, unmerged_ms_per_token=unmerged),
        serving.PodReport(loaded=loaded, ms_per_token={serving.BASE_LATENCY: 4.0, "a": 5.0}),
        serving.PodReport(loaded={"b": "s3://b"}, ms_per_token={"a": 100.0}),  # serves another a
    ]
    statuses = {s["name"]: s for s in serving.adapter_statuses(resolved, pods)}
    assert statuses["a"]["msPerToken"] == 4.0 and statuses["a"]["unmergedMsPerToken"] == 4.5
    assert "msPerToken" not in statuses["b"] and "unmergedMsPerToken" not in statuses["b"]
    assert serving.base_ms_per_token(pods) == 3.0
    assert serving.base_ms_per_token([serving.PodReport()]) is None
    AdapterDeployment.model_validate(
        {
            **_adep().model_dump(by_alias=True),
            "status": {"adapters": list(statuses.values()), "baseMsPerToken": 3},
        }
    )
