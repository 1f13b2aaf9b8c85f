"""The operator at scale: N suspended FineTuneJobs against the local cluster, operator as a host process.

For each N (default 200 and 1,000) on a fresh namespace of one embedded local cluster:

1. the apiserver's own time: N ConfigMaps created one after another by this process (the same
   client and pattern as the FineTuneJobs below);
2. ``kubetune operator`` started on the namespace (one warm-up FineTuneJob proves it is ready);
3. N suspended FineTuneJobs created one after another; a watch on Jobs records when each worker Job
   appears. apply -> Job is the time from the create request of a FineTuneJob to its Job in the
   watch: p50, p99 and max, and p50/p99 divided by the ConfigMaps' total time;
4. once every FineTuneJob says Suspended and the operator has been quiet for a while, an idle
   window: the apiserver's request rate (``apiserver_request_total``, resource requests only,
   by verb and resource), the operator's CPU seconds per minute and RSS (``/proc``), and the
   requests the operator's reconcilers counted themselves (``kubetune_api_requests_total``);
5. the operator stopped, the same idle window again: what the cluster does on its own (node
   leases, controllers), so the operator's share is the difference.

Writes ``benchmarks/results/operator_scale.{json,md}``. The machine is shared: the load average
at each step is recorded beside the numbers.

    python -m benchmarks.operator_scale            # 200 and 1000
    python -m benchmarks.operator_scale --counts 200 --idle-seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "p99_s_at_200": 2.0,
    "idle_requests_per_s_at_200": 2.0,
    "idle_cpu_s_per_min_at_200": 1.0,
    "rss_mb_at_1000": 150,
}


def _finetunejob(name: str) -> dict[str, Any]:
    from kubetune.api import v1alpha1

    return {
        "apiVersion": v1alpha1.API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "suspend": True,
            "model": {"uri": "pvc://data/model"},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
            "training": {"maxSteps": 6},
            "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
            "output": {"uri": f"pvc://data/out/{name}"},
        },
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load() -> float:
    return os.getloadavg()[0]


class Apiserver:
    """The apiserver's own metrics, read through the admin client."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def requests(self) -> Counter[tuple[str, str]]:
        """apiserver_request_total summed by (verb, resource), resource requests only."""
        response = self.api_client.call_api("GET", self.api_client.configuration.host + "/metrics")
        response.read()
        counts: Counter[tuple[str, str]] = Counter()
        for line in response.data.decode().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            if not labels.get("resource"):
                continue
            resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[(labels.get("verb", ""), resource)] += int(float(line.rsplit(" ", 1)[1]))
        return counts


class Operator:
    """``kubetune operator`` as a host process on one namespace."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path) -> None:
        self.metrics_port = _free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        argv = [sys.executable, "-m", "kubetune", "operator", "--namespace", namespace, "--liveness", ""]
        argv += ["--metrics-port", str(self.metrics_port)]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

    def memory_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        out = {}
        for key in ("VmRSS", "VmHWM"):
            match = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
            out[key] = int(match.group(1)) / 1024 if match else float("nan")
        return out

    def own_requests(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(
            float(m) for m in re.findall(r"^kubetune_api_requests_total\{.*\} (\S+)$", text, re.MULTILINE)
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class JobWatch:
    """Monotonic time at which each Job of a namespace was first seen."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client, watch

        self.seen: dict[str, float] = {}
        self._watch = watch.Watch()
        self._stream = self._watch.stream(
            client.BatchV1Api(api_client).list_namespaced_job, namespace, timeout_seconds=3600
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._stream:
                name = event["object"].metadata.name
                self.seen.setdefault(name, time.monotonic())
        except Exception:  # the stream ends when the benchmark stops it
            pass

    def stop(self) -> None:
        self._watch.stop()


def _wait(predicate: Any, timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def measure(
    api_client: Any, kubeconfig: Path, count: int, idle_s: float, work: Path, py_spy: str | None = None
) -> dict[str, Any]:
    from kubernetes import client

    from kubetune.api import v1alpha1

    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    namespace = f"scale-{count}-{int(time.time()) % 100000}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    result: dict[str, Any] = {"objects": count, "namespace": namespace, "load_average": {}}

    # 1. The apiserver's own time for as many simple creates.
    result["load_average"]["before_configmaps"] = _load()
    start = time.monotonic()
    for i in range(count):
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"cm-{i}"), data={"k": "v"})
        )
    configmaps_s = time.monotonic() - start
    result["configmaps_total_s"] = round(configmaps_s, 3)
    # ... and for as many FineTuneJobs (schema and CEL checks) with no operator watching them.
    baseline_namespace = f"{namespace}-alone"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=baseline_namespace)))
    start = time.monotonic()
    for i in range(count):
        custom.create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, baseline_namespace, "finetunejobs", _finetunejob(f"ftj-{i}")
        )
    result["finetunejobs_without_operator_total_s"] = round(time.monotonic() - start, 3)
    core.delete_namespace(baseline_namespace)

    # 2. The operator, ready once a warm-up FineTuneJob has its Job.
    watch = JobWatch(api_client, namespace)
    operator = Operator(kubeconfig, namespace, work / f"operator-{count}.log")
    try:
        started = time.monotonic()
        custom.create_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", _finetunejob("warm-up")
        )
        _wait(lambda: "warm-up-train" in watch.seen, 180, "the warm-up Job", interval=0.2)
        result["operator_ready_s"] = round(time.monotonic() - started, 1)
        time.sleep(5)

        # 3. N FineTuneJobs, one after another; apply -> Job from the watch.
        result["load_average"]["before_finetunejobs"] = _load()
        created: dict[str, float] = {}
        apiserver = Apiserver(api_client)
        requests_start, own_start = apiserver.requests(), operator.own_requests()
        cpu_start = operator.cpu_seconds()
        profiler = None
        if py_spy:
            profile = work / f"operator-{count}.speedscope.json"
            profiler = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "-p",
                    str(operator.proc.pid),
                    "-f",
                    "speedscope",
                    "-o",
                    str(profile),
                    "-r",
                    "50",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        start = time.monotonic()
        for i in range(count):
            name = f"ftj-{i}"
            created[f"{name}-train"] = time.monotonic()
            custom.create_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", _finetunejob(name)
            )
        result["finetunejobs_total_create_s"] = round(time.monotonic() - start, 3)
        _wait(lambda: all(n in watch.seen for n in created), 60 + count, f"{count} Jobs")
        result["operator_cpu_s_until_all_jobs"] = round(operator.cpu_seconds() - cpu_start, 2)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        latencies = [watch.seen[n] - t for n, t in created.items()]
        result["all_jobs_after_s"] = round(max(watch.seen[n] for n in created) - start, 2)
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        result["apply_to_job_s"] = {
            "p50": round(p50, 3),
            "p99": round(p99, 3),
            "max": round(max(latencies), 3),
        }
        result["apply_to_job_over_configmaps"] = {
            "p50": round(p50 / configmaps_s, 2),
            "p99": round(p99 / configmaps_s, 2),
        }

        # 4. Idle with the operator: every object Suspended, then quiet, then the window.
        def all_suspended() -> bool:
            listed: Any = custom.list_namespaced_custom_object(
                v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs"
            )
            items = listed["items"]
            return sum((i.get("status") or {}).get("phase") == "Suspended" for i in items) == count + 1

        _wait(all_suspended, 120 + count, "every FineTuneJob Suspended", interval=2)
        result["all_suspended_after_s"] = round(time.monotonic() - start, 1)
        # Requests per FineTuneJob from its creation until it is Suspended (the benchmark's own
        # creates and status lists included; kubetune_api_requests_total: the reconcilers' alone).
        during = apiserver.requests() - requests_start
        result["requests_per_finetunejob_until_suspended"] = {
            "apiserver_all_clients": round(sum(during.values()) / count, 2),
            "operator_reconcilers": round((operator.own_requests() - own_start) / count, 2),
            "by_verb_resource": {f"{v} {r}": round(n / count, 2) for (v, r), n in during.most_common(12)},
        }
        time.sleep(15)
        result["load_average"]["idle_with_operator"] = _load()
        before, cpu_before, own_before = apiserver.requests(), operator.cpu_seconds(), operator.own_requests()
        time.sleep(idle_s)
        after, cpu_after, own_after = apiserver.requests(), operator.cpu_seconds(), operator.own_requests()
        with_operator = after - before
        result["idle_with_operator"] = {
            "window_s": idle_s,
            "apiserver_requests_per_s": round(sum(with_operator.values()) / idle_s, 2),
            "by_verb_resource": {f"{v} {r}": n for (v, r), n in with_operator.most_common(12)},
            "operator_cpu_s_per_min": round((cpu_after - cpu_before) * 60 / idle_s, 3),
            "operator_reconciler_requests": own_after - own_before,
        }
        result["operator_memory_mb"] = {k: round(v, 1) for k, v in operator.memory_mb().items()}
    finally:
        operator.stop()
        watch.stop()

    # 5. The same window without the operator.
    time.sleep(5)
    result["load_average"]["idle_without_operator"] = _load()
    before = apiserver.requests()
    time.sleep(idle_s)
    without = apiserver.requests() - before
    result["idle_without_operator"] = {
        "window_s": idle_s,
        "apiserver_requests_per_s": round(sum(without.values()) / idle_s, 2),
        "by_verb_resource": {f"{v} {r}": n for (v, r), n in without.most_common(12)},
    }
    result["idle_requests_per_s_caused_by_operator"] = round(
        result["idle_with_operator"]["apiserver_requests_per_s"]
        - result["idle_without_operator"]["apiserver_requests_per_s"],
        2,
    )
    core.delete_namespace(namespace)
    return result


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Operator at scale",
        "",
        f"Measured {report['measured_at']} at commit {report['commit']} on {report['machine']}; "
        "operator as a host process, suspended FineTuneJobs created one after another. "
        "`python -m benchmarks.operator_scale` writes this file.",
        "",
        "| objects | ConfigMaps, total | apply→Job p50 | p99 | max | p50 / p99 over ConfigMaps "
        "| idle apiserver req/s (with / without operator) | operator CPU-s/min idle | RSS MB (peak) "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        idle, alone = run["idle_with_operator"], run["idle_without_operator"]
        latency, ratio = run["apply_to_job_s"], run["apply_to_job_over_configmaps"]
        memory = run["operator_memory_mb"]
        lines.append(
            f"| {run['objects']} | {run['configmaps_total_s']} s | {latency['p50']} s | {latency['p99']} s "
            f"| {latency['max']} s | {ratio['p50']} / {ratio['p99']} "
            f"| {idle['apiserver_requests_per_s']} / {alone['apiserver_requests_per_s']} "
            f"(operator: {run['idle_requests_per_s_caused_by_operator']}) "
            f"| {idle['operator_cpu_s_per_min']} | {memory['VmRSS']} ({memory['VmHWM']}) "
            f"| {run['load_average']['before_finetunejobs']:.1f} |"
        )
    lines += ["", "Targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()), ""]
    for run in report["runs"]:
        per_object = run["requests_per_finetunejob_until_suspended"]
        lines.append(
            f"At {run['objects']}: operator CPU {run['operator_cpu_s_until_all_jobs']} s until every Job "
            f"existed; per FineTuneJob until Suspended, {per_object['apiserver_all_clients']} apiserver "
            f"requests ({per_object['operator_reconcilers']} by the reconcilers): "
            f"{per_object['by_verb_resource']}; "
            f"{run['finetunejobs_without_operator_total_s']} s to create them with no operator running, "
            f"{run['finetunejobs_total_create_s']} s with it."
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kubetune-operator-scale"))
    parser.add_argument("--output", default="operator_scale", help="results/<output>.{json,md}")
    parser.add_argument(
        "--py-spy", default=None, help="py-spy binary: profile the operator while Jobs are created"
    )
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    from kubetune.api import crdgen
    from kubetune.localcluster.controlplane import ClusterOptions, LocalCluster, NodeOptions
    from kubetune.localcluster.testing import ClusterHandle

    local = LocalCluster(ClusterOptions(nodes=[NodeOptions(runtime="process")]))
    local.start()
    try:
        handle = ClusterHandle(local.kubeconfig, local)
        api_client = handle.api_client()
        crdgen.apply(api_client)
        runs = []
        for count in args.counts:
            print(f"measuring {count} FineTuneJobs ...", flush=True)
            runs.append(
                measure(api_client, local.kubeconfig, count, args.idle_seconds, args.work_dir, args.py_spy)
            )
            print(json.dumps(runs[-1], indent=2), flush=True)
    finally:
        local.stop()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    report = {
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, shared with other work",
        "targets": TARGETS,
        "runs": runs,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{args.output}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS_DIR / f"{args.output}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
