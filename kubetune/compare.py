"""``kubetune compare``: the FineTuneJobs that share a label, side by side.

FineTuneJobs labelled alike (for example ``kubetune.dev/compare: support``) form a comparison. The
table answers the one decision they exist for (which method, at what cost, speed, quality and
forgetting) from what the runs measured: ``status.result.metrics``, written by the operator from
the worker's summary, and, where the artifact is reachable from here, its ``kubetune.json``
manifest, which adds the loss curve for ``--plot``.

Quality is the share of the reference run's eval-loss reduction a run achieved:
``(eval_before - eval) / (eval_before - eval_ref)``, where the reference is the full fine-tune when
one is in the comparison and the best run (lowest eval loss) otherwise. Losses are only compared
when every run evaluated on the same data (same dataset URI and evalFraction); otherwise the column
says so rather than rank runs on different questions.

The pure part (:func:`build_comparison`, the renderers) works on plain objects and has no cluster
or matplotlib dependency; :func:`run` does the reading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import v1alpha1

DASH = "\u2013"  # an en dash: "not measured", distinct from a minus sign
#: Exit status when some matched jobs have not succeeded: the table holds only the finished ones.
UNFINISHED_EXIT = 2


class CompareError(Exception):
    """A problem that makes the comparison impossible (bad selector, nothing matched, no cluster)."""


#: The AdapterDeployment status fields the serving runtime fills with its measured decode latency
#: (milliseconds per generated token): per adapter, and for the bare base model with no adapter.
ADAPTER_MS_PER_TOKEN = "msPerToken"
BASE_MS_PER_TOKEN = "baseMsPerToken"
#: With mergeAdapter, msPerToken is the merged adapter's; this is the same probe before the merge.
UNMERGED_MS_PER_TOKEN = "unmergedMsPerToken"


@dataclass
class Serving:
    """One AdapterDeployment serving a run's artifact, and the decode latency it measured."""

    adapter_deployment: str
    adapter: str
    merged: bool
    ms_per_token: float | None = None
    base_ms_per_token: float | None = None

    @property
    def ratio(self) -> float | None:
        """Latency relative to the bare base (1.0 = no adapter overhead)."""
        if self.ms_per_token is None or not self.base_ms_per_token:
            return None
        return self.ms_per_token / self.base_ms_per_token


@dataclass
class Run:
    """One FineTuneJob's row; numbers are ``None`` when not measured (or not yet)."""

    name: str
    phase: str
    method: str
    detail: str = ""
    progress: str = ""
    message: str = ""
    total_parameters: float | None = None
    trainable_parameters: float | None = None
    trainable_percent: float | None = None
    peak_memory_bytes: float | None = None
    peak_memory_kind: str | None = None
    artifact_size_bytes: float | None = None
    tokens_per_second: float | None = None
    wall_seconds: float | None = None
    estimated_cost: str | None = None
    eval_loss_before: float | None = None
    eval_loss: float | None = None
    quality_percent: float | None = None
    retention_delta: float | None = None
    eval_data: str = ""
    manifest: str = ""
    #: Where to find its artifact among served adapters: status.result's URI and manifest sha256.
    artifact_uri: str = ""
    artifact_sha256: str = ""
    loss_curve: list[dict[str, Any]] = field(default_factory=list)
    serving: list[Serving] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.phase == "Succeeded"


@dataclass
class Comparison:
    namespace: str
    selector: str
    runs: list[Run]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def unfinished(self) -> list[Run]:
        return [run for run in self.runs if not run.succeeded]


# ------------------------------------------------------------------------------------------- building


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _method_detail(method: dict[str, Any]) -> str:
    kind = method.get("type", "")
    if kind in ("lora", "qlora"):
        lora = method.get("lora") or {}
        parts = [f"r={lora.get('rank', 16)}"]
        parts += [flag for flag in ("dora", "rslora") if lora.get(flag)]
        return " ".join(parts)
    if kind == "prefix":
        return f"{(method.get('prefix') or {}).get('numVirtualTokens', '')} tokens".strip()
    return ""


def _estimated_cost(plan: dict[str, Any]) -> str | None:
    """The planner's cost estimate, whatever its key spelling (``estimatedCost``...), when it has one."""
    for key, value in plan.items():
        if "cost" in key.lower() and value not in (None, ""):
            return value if isinstance(value, str) else json.dumps(value)
    return None


def run_from_object(obj: dict[str, Any], manifest: dict[str, Any] | None = None) -> Run:
    """A :class:`Run` from a FineTuneJob (as the API returns it) and, when read, its manifest."""
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    method = spec.get("method") or {}
    dataset = spec.get("dataset") or {}
    result = status.get("result") or {}
    metrics: dict[str, Any] = dict(result.get("metrics") or {})
    if manifest is not None:
        # The manifest is the fuller record (the status drops non-numbers); status wins on conflict
        # only because it is what `kubectl get` shows, and the two agree when the sha256 matches.
        metrics = {**(manifest.get("metrics") or {}), **metrics}
    failed = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == "Failed" and c.get("status") == "True"
        ),
        None,
    )
    run = Run(
        name=obj["metadata"]["name"],
        phase=status.get("phase") or "Pending",
        method=method.get("type", "?"),
        detail=_method_detail(method),
        progress=(status.get("progress") or {}).get("summary", ""),
        message=f"{failed.get('reason')}: {failed.get('message')}" if failed else "",
        estimated_cost=_estimated_cost(status.get("plan") or {}),
        eval_data=f"{dataset.get('uri', '')}#evalFraction={dataset.get('evalFraction', 0.05)}",
        artifact_uri=str(result.get("uri") or ""),
        artifact_sha256=str(result.get("sha256") or ""),
    )
    for key in (
        "total_parameters",
        "trainable_parameters",
        "trainable_percent",
        "peak_memory_bytes",
        "tokens_per_second",
        "wall_seconds",
        "eval_loss_before",
        "eval_loss",
        "retention_delta",
    ):
        setattr(run, key, _number(metrics, key))
    run.artifact_size_bytes = _number(metrics, "artifact_size_bytes")
    if run.artifact_size_bytes is None and isinstance(result.get("sizeBytes"), int):
        run.artifact_size_bytes = float(result["sizeBytes"])
    kind = metrics.get("peak_memory_kind")
    run.peak_memory_kind = kind if isinstance(kind, str) else None
    if manifest is not None:
        run.loss_curve = [p for p in manifest.get("loss_curve") or [] if isinstance(p, dict)]
    return run


def build_comparison(
    namespace: str,
    selector: str,
    objects: list[dict[str, Any]],
    manifests: dict[str, dict[str, Any] | None] | None = None,
    notes: list[str] | None = None,
    adapter_deployments: list[dict[str, Any]] | None = None,
) -> Comparison:
    """The comparison of ``objects`` (FineTuneJobs); ``manifests`` by job name where they were read;
    ``adapter_deployments`` (the namespace's) give the serving latency of the runs they serve."""
    manifests = manifests or {}
    runs = sorted(
        (run_from_object(obj, manifests.get(obj["metadata"]["name"])) for obj in objects),
        key=lambda run: run.name,
    )
    for run in runs:
        run.serving = servings_of(run, adapter_deployments or [])
    comparison = Comparison(namespace, selector, runs, notes=list(notes or []))
    scored = [r for r in runs if r.succeeded and r.eval_loss is not None and r.eval_loss_before is not None]
    if len({r.eval_data for r in scored}) > 1:
        comparison.notes.append(
            "eval losses come from different datasets or eval fractions: quality is not compared"
        )
        return comparison
    full = [r for r in scored if r.method == "full"]
    pool = full or scored
    if not pool:
        return comparison
    reference = min(pool, key=lambda r: r.eval_loss or 0.0)
    comparison.reference = reference.name
    assert reference.eval_loss is not None and reference.eval_loss_before is not None
    gain = reference.eval_loss_before - reference.eval_loss
    for run in scored:
        assert run.eval_loss is not None and run.eval_loss_before is not None
        if gain > 0:
            run.quality_percent = 100.0 * (run.eval_loss_before - run.eval_loss) / gain
    if gain <= 0:
        comparison.notes.append(f"the reference run {reference.name} did not lower the eval loss")
    return comparison


def _serves(spec_adapter: dict[str, Any], adapter_status: dict[str, Any], run: Run) -> bool:
    """Whether an AdapterDeployment's adapter is ``run``'s artifact: named by its FineTuneJob, or
    resolved to its artifact (same manifest sha256, or same URI when no hash is recorded)."""
    if spec_adapter.get("fineTuneJob") == run.name:
        return True
    sha256 = adapter_status.get("sha256") or ""
    if sha256 and run.artifact_sha256:
        return bool(sha256 == run.artifact_sha256)
    source = (adapter_status.get("source") or spec_adapter.get("uri") or "").rstrip("/")
    return bool(source) and source == run.artifact_uri.rstrip("/")


def servings_of(run: Run, adapter_deployments: list[dict[str, Any]]) -> list[Serving]:
    """Every adapter of ``adapter_deployments`` that serves ``run``'s artifact, with its latency."""
    if not run.succeeded:
        return []
    found = []
    for adep in sorted(adapter_deployments, key=lambda a: a["metadata"]["name"]):
        spec, status = adep.get("spec") or {}, adep.get("status") or {}
        statuses = {a.get("name"): a for a in status.get("adapters") or [] if isinstance(a, dict)}
        for spec_adapter in spec.get("adapters") or []:
            adapter_status = statuses.get(spec_adapter.get("name"), {})
            if not _serves(spec_adapter, adapter_status, run):
                continue
            merged = bool(spec.get("mergeAdapter"))
            for is_merged, key in ((merged, ADAPTER_MS_PER_TOKEN), (False, UNMERGED_MS_PER_TOKEN)):
                if key == UNMERGED_MS_PER_TOKEN and (not merged or key not in adapter_status):
                    continue  # only a merged adapter has a separate pre-merge figure
                found.append(
                    Serving(
                        adapter_deployment=adep["metadata"]["name"],
                        adapter=str(spec_adapter.get("name")),
                        merged=is_merged,
                        ms_per_token=_number(adapter_status, key),
                        base_ms_per_token=_number(status, BASE_MS_PER_TOKEN),
                    )
                )
    return found


# ------------------------------------------------------------------------------------------ rendering


def _si(value: float | None, unit: str = "", binary: bool = False) -> str:
    if value is None:
        return DASH
    base = 1024.0 if binary else 1000.0
    prefixes = ["", "Ki", "Mi", "Gi", "Ti"] if binary else ["", "k", "M", "G", "T"]
    index = 0
    while abs(value) >= base and index < len(prefixes) - 1:
        value /= base
        index += 1
    text = f"{value:.0f}" if index == 0 else f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return f"{text} {prefixes[index]}{unit}".rstrip()


def _seconds(value: float | None) -> str:
    if value is None:
        return DASH
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _fixed(value: float | None, digits: int, suffix: str = "", signed: bool = False) -> str:
    if value is None:
        return DASH
    return f"{value:+.{digits}f}{suffix}" if signed else f"{value:.{digits}f}{suffix}"


COLUMNS = (
    "job",
    "method",
    "trainable",
    "trainable %",
    "peak memory",
    "checkpoint",
    "tokens/s",
    "wall time",
    "est. cost",
    "eval loss",
    "quality",
    "retention Δ",
    "latency/token vs base",
)


def _latency(run: Run) -> str:
    """Per-token decode latency and its ratio to the bare base, unmerged and merged where served so;
    "not served" when no AdapterDeployment in the namespace serves the artifact."""
    if not run.serving:
        return "not served"
    cells = []
    for merged in (False, True):
        measured = [s for s in run.serving if s.merged == merged and s.ms_per_token is not None]
        if not measured:
            continue
        best = min(measured, key=lambda s: s.ms_per_token or 0.0)
        text = f"{best.ms_per_token:.3g} ms"
        if best.ratio is not None:
            text += f" ({best.ratio:.2f}x base {best.base_ms_per_token:.3g} ms)"
        cells.append(f"merged {text}" if merged else text)
    return "; ".join(cells) if cells else "served, not measured yet"


def table_rows(comparison: Comparison) -> list[list[str]]:
    """One list of cells per run, in :data:`COLUMNS` order (unfinished runs say their phase)."""
    rows = []
    for run in comparison.runs:
        method = f"{run.method} ({run.detail})" if run.detail else run.method
        if not run.succeeded:
            state = f"{run.phase} {run.progress}".strip()
            rows.append([run.name, method, state, *([DASH] * (len(COLUMNS) - 3))])
            continue
        quality = _fixed(run.quality_percent, 0, "%")
        if run.name == comparison.reference:
            quality += " (ref)"
        rows.append(
            [
                run.name,
                method,
                _si(run.trainable_parameters),
                _fixed(run.trainable_percent, 3, "%") if (run.trainable_percent or 0) < 1 else
                _fixed(run.trainable_percent, 2, "%"),
                _si(run.peak_memory_bytes, "B", binary=True),
                _si(run.artifact_size_bytes, "B", binary=True),
                _si(run.tokens_per_second),
                _seconds(run.wall_seconds),
                run.estimated_cost or DASH,
                _fixed(run.eval_loss, 4),
                quality,
                _fixed(run.retention_delta, 4, signed=True),
                _latency(run),
            ]
        )  # fmt: skip
    return rows


def _footnotes(comparison: Comparison) -> list[str]:
    lines = []
    if comparison.reference:
        lines.append(
            f"quality: share of {comparison.reference}'s eval-loss reduction reached "
            f"(reference: {'the full fine-tune' if any(r.method == 'full' and r.name == comparison.reference for r in comparison.runs) else 'the best run'})"  # noqa: E501
        )
    if any(r.retention_delta is not None for r in comparison.runs):
        lines.append("retention Δ: loss change on the retention set (positive = forgetting)")
    if any(s.ms_per_token is not None for r in comparison.runs for s in r.serving):
        served = sorted({s.adapter_deployment for r in comparison.runs for s in r.serving})
        lines.append(
            "latency/token: decode time per generated token measured by the serving runtime "
            f"(AdapterDeployment {', '.join(served)}), against the same base with no adapter"
        )
    kinds = {r.peak_memory_kind for r in comparison.runs if r.peak_memory_kind}
    if kinds:
        lines.append(f"peak memory: {', '.join(sorted(kinds))}")
    for run in comparison.runs:
        if run.message:
            lines.append(f"{run.name}: {run.message}")
    lines.extend(comparison.notes)
    return lines


def render_table(comparison: Comparison) -> str:
    rows = [list(COLUMNS), *table_rows(comparison)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    return "\n".join([*lines, *(f"  {note}" for note in _footnotes(comparison))]) + "\n"


def render_markdown(comparison: Comparison) -> str:
    lines = [
        f"Comparison `{comparison.selector}` in namespace `{comparison.namespace}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += [
        "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(comparison)
    ]
    footnotes = _footnotes(comparison)
    if footnotes:
        lines += ["", *(f"- {note}" for note in footnotes)]
    return "\n".join(lines) + "\n"


def render_json(comparison: Comparison) -> str:
    document = asdict(comparison)
    for run in document["runs"]:
        run["succeeded"] = run["phase"] == "Succeeded"
    return json.dumps(document, indent=2) + "\n"


RENDERERS = {"table": render_table, "markdown": render_markdown, "json": render_json}


# --------------------------------------------------------------------------------------------- plotting


def plot(comparison: Comparison, path: Path) -> None:
    """Loss curves (training solid, eval dashed) and peak-memory / checkpoint-size bars, as one PNG."""
    try:
        import matplotlib
    except ImportError as error:
        raise CompareError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from error
    matplotlib.use("Agg")  # files only: no display needed (or wanted) on a server
    import matplotlib.pyplot as plt

    runs = [run for run in comparison.runs if run.succeeded]
    figure, (curves, memory, size) = plt.subplots(
        1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]}
    )
    drawn = False
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        train = [(p["step"], p["loss"]) for p in run.loss_curve if "loss" in p]
        evals = [(p["step"], p["eval_loss"]) for p in run.loss_curve if "eval_loss" in p]
        if train:
            curves.plot(*zip(*train, strict=True), color=color, label=f"{run.name} train")
            drawn = True
        if evals:
            curves.plot(
                *zip(*evals, strict=True), color=color, linestyle="--", marker="o", label=f"{run.name} eval"
            )
            drawn = True
    curves.set_title("loss" if drawn else "loss (no manifest reachable: no curves)")
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("loss (nats/token)")
    if drawn:
        curves.legend(fontsize="small")
    names = [run.name for run in runs]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    memory.bar(names, [(r.peak_memory_bytes or 0) / 2**20 for r in runs], color=colors)
    memory.set_title("peak memory (MiB)")
    size.bar(names, [(r.artifact_size_bytes or 0) / 2**20 for r in runs], color=colors)
    size.set_title("checkpoint size (MiB)")
    for axis in (memory, size):
        axis.tick_params(axis="x", labelrotation=30)
    figure.suptitle(f"{comparison.selector} in {comparison.namespace}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -------------------------------------------------------------------------------------------- reading


def _local_artifact_dir(uri: str, namespace: str, core: Any) -> Path | None:
    """The artifact directory as a path on this machine, when it is one (else ``None``).

    ``file://`` is a path; ``pvc://claim/path`` is one when the claim's volume is a hostPath or
    local volume whose directory this machine sees (the embedded local cluster, single-node setups).
    """
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if not uri.startswith("pvc://"):
        return None
    claim, _, sub = uri.removeprefix("pvc://").partition("/")
    pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
    if not pvc.spec or not pvc.spec.volume_name:
        return None
    volume = core.read_persistent_volume(pvc.spec.volume_name).spec
    source = volume.host_path or volume.local
    if source is None or not Path(source.path).is_dir():
        return None
    return Path(source.path) / sub


def read_manifest(obj: dict[str, Any], core: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of a succeeded job's artifact if reachable and the one status names; else a note."""
    result = (obj.get("status") or {}).get("result") or {}
    uri = result.get("uri") or ((obj.get("spec") or {}).get("output") or {}).get("uri", "")
    name = obj["metadata"]["name"]
    try:
        directory = _local_artifact_dir(uri, obj["metadata"]["namespace"], core)
        if directory is not None:
            data = (directory / "kubetune.json").read_bytes()
        else:
            import fsspec  # s3:// and other object stores, with the environment's credentials

            with fsspec.open(f"{uri.rstrip('/')}/kubetune.json", "rb") as handle:
                data = handle.read()
    except Exception as error:  # unreachable from here is normal (a remote cluster's volume)
        return None, f"{name}: manifest not reachable from here ({type(error).__name__}): no loss curve"
    if result.get("sha256") and hashlib.sha256(data).hexdigest() != result["sha256"]:
        return None, f"{name}: the manifest at {uri} is not the one status.result.sha256 names; ignored"
    manifest = json.loads(data)
    return (manifest, None) if isinstance(manifest, dict) else (None, f"{name}: unreadable manifest")


def collect(api_client: Any, namespace: str, selector: str, manifests: bool = True) -> Comparison:
    """Read the FineTuneJobs matching ``selector`` in ``namespace`` (and their manifests)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    try:
        listed: Any = custom.list_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, "finetunejobs", label_selector=selector
        )
    except ApiException as error:
        if error.status == 400:
            message = _api_message(error)
            raise CompareError(f"-l {selector!r} is not a valid label selector: {message}") from error
        raise CompareError(f"cannot list FineTuneJobs in {namespace}: {_api_message(error)}") from error
    objects = listed.get("items") or []
    if not objects:
        raise CompareError(f"no FineTuneJob in namespace {namespace!r} matches -l {selector!r}")
    found: dict[str, dict[str, Any] | None] = {}
    notes: list[str] = []
    for obj in objects:
        if manifests and (obj.get("status") or {}).get("phase") == "Succeeded":
            manifest, note = read_manifest(obj, core)
            found[obj["metadata"]["name"]] = manifest
            if note:
                notes.append(note)
    try:
        served: Any = custom.list_namespaced_custom_object(
            v1alpha1.GROUP, v1alpha1.VERSION, namespace, "adapterdeployments"
        )
        adapter_deployments = served.get("items") or []
    except ApiException as error:  # e.g. RBAC that lets this user read jobs only
        adapter_deployments = []
        notes.append(f"AdapterDeployments not readable ({_api_message(error)}): no serving latency")
    return build_comparison(namespace, selector, objects, found, notes, adapter_deployments)


def _api_message(error: Any) -> str:
    try:
        return str(json.loads(error.body).get("message", error.reason))
    except (TypeError, ValueError):
        return str(error.reason)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", help="namespace of the FineTuneJobs (default: the context's)")
    parser.add_argument(
        "-l",
        "--selector",
        required=True,
        help="label selector naming the comparison, e.g. kubetune.dev/compare=support",
    )
    parser.add_argument("-o", "--output", choices=sorted(RENDERERS), default="table", help="output format")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw loss curves and memory/size bars"
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)"
    )


def _api_client(kubeconfig: str | None) -> tuple[Any, str]:
    from kubernetes import client, config

    configuration = client.Configuration()
    namespace = "default"
    try:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (active or {}).get("context", {}).get("namespace") or namespace
    except config.ConfigException as kube_error:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise CompareError(f"no cluster to read: {kube_error}") from kube_error
    return client.ApiClient(configuration), namespace


def run(args: argparse.Namespace) -> int:
    try:
        api_client, default_namespace = _api_client(args.kubeconfig)
        namespace = args.namespace or default_namespace
        comparison = collect(api_client, namespace, args.selector)
        sys.stdout.write(RENDERERS[args.output](comparison))
        if args.plot:
            plot(comparison, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
    except CompareError as error:
        print(f"kubetune compare: {error}", file=sys.stderr)
        return 1
    if comparison.unfinished:
        for run_ in comparison.unfinished:
            state = f"{run_.phase}, {run_.progress}" if run_.progress else run_.phase
            print(
                f"kubetune compare: {run_.name} has not succeeded ({state}): no final metrics",
                file=sys.stderr,
            )
        return UNFINISHED_EXIT
    return 0
