"""``kubetune operator``: run the operator (kopf) against the current kubeconfig or in-cluster config."""

from __future__ import annotations

import argparse
import random
from typing import TYPE_CHECKING

from kubetune.planner import compute

if TYPE_CHECKING:
    from kubetune.operator.config import PeeringConfig, WorkerSettings
    from kubetune.operator.planning import PlannerSettings

PULL_POLICIES = ("Always", "IfNotPresent", "Never")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument(
        "--worker-image", default=None, help="default image of worker pods (a FineTuneJob's spec.image wins)"
    )
    parser.add_argument(
        "--worker-image-pull-policy",
        "--image-pull-policy",
        choices=PULL_POLICIES,
        default=None,
        help="imagePullPolicy of worker pods (and of serving pods unless --server-image-pull-policy)",
    )
    parser.add_argument(
        "--server-image",
        default=None,
        help="default image of serving pods (an AdapterDeployment's spec.image wins); "
        "default: --worker-image",
    )
    parser.add_argument(
        "--server-image-pull-policy",
        choices=PULL_POLICIES,
        default=None,
        help="imagePullPolicy of serving pods; default: the worker pods'",
    )
    parser.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="pull Secret for worker and serving pods whose podTemplate names none (repeatable)",
    )
    parser.add_argument(
        "--worker-service-account",
        default=None,
        help="ServiceAccount of worker pods whose podTemplate names none; default: the namespace's default",
    )
    parser.add_argument(
        "--server-service-account",
        default=None,
        help="ServiceAccount of serving pods whose podTemplate names none; default: the namespace's default",
    )
    parser.add_argument(
        "--work-claim-size",
        default=None,
        help="size of the claim that holds the checkpoints of a FineTuneJob whose output is not on a "
        "claim (s3://, file://); default: 20Gi",
    )
    parser.add_argument(
        "--work-storage-class",
        default=None,
        help="StorageClass of those claims; default: the cluster's default StorageClass",
    )
    parser.add_argument(
        "--peering",
        default=None,
        help="kopf peering object name, for several replicas with leader hand-over; default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="kopf peering priority (the highest runs, the others wait); default with --peering: random, "
        "so that replicas never tie (a tie freezes them all)",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=None,
        metavar="SECONDS",
        help="seconds a replica's peering record counts as alive: a replica killed without notice is "
        "taken over after at most this long; default: 20",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' disables)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus /metrics (reconciles, errors, latency, objects by phase, API requests, "
        "process metrics) on this port; 0 disables",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines prefixed with [namespace/name], or JSON lines with the object under 'object'",
    )
    compute.add_assumption_arguments(parser, prefix="planner-")
    parser.add_argument(
        "--planner-default-gpu",
        default="",
        help="GPU type the planner assumes when a FineTuneJob's nodeSelector names none (e.g. H100); "
        "default: none (memory is checked against resources.gpuMemory only, no time or cost)",
    )
    parser.add_argument(
        "--planner-offline",
        action="store_true",
        help="read hf:// model configs from the Hugging Face cache only, never from the Hub",
    )
    parser.add_argument("--verbose", "-v", action="store_true")


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker and serving pods' defaults from the command line (unset flags keep the defaults)."""
    from kubetune.operator.config import WorkerSettings

    defaults = WorkerSettings()
    return WorkerSettings(
        image=args.worker_image or defaults.image,
        image_pull_policy=args.worker_image_pull_policy or defaults.image_pull_policy,
        server_image=args.server_image or "",
        server_image_pull_policy=args.server_image_pull_policy or "",
        image_pull_secrets=tuple(dict.fromkeys(args.image_pull_secret)),
        service_account=args.worker_service_account or "",
        server_service_account=args.server_service_account or "",
        work_claim_size=args.work_claim_size or defaults.work_claim_size,
        work_storage_class=args.work_storage_class or "",
    )


def planner_settings(args: argparse.Namespace) -> PlannerSettings:
    """The planner's assumptions from the command line (a bad value stops the operator at start-up)."""
    from kubetune.operator.planning import PlannerSettings

    settings = PlannerSettings(
        assumptions=compute.assumptions_from(args, prefix="planner-"),
        default_gpu=args.planner_default_gpu,
        hub_downloads=not args.planner_offline,
    )
    if settings.default_gpu:
        settings.assumptions.gpu(settings.default_gpu)
    return settings


def run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune.operator import handlers, logs  # handlers: registers the handlers
    from kubetune.operator.config import OperatorConfig

    logs.configure(verbose=args.verbose, json_format=args.log_format == "json")
    del handlers
    if args.metrics_port:
        import prometheus_client

        prometheus_client.start_http_server(args.metrics_port)
    config = OperatorConfig(
        worker=worker_settings(args), planner=planner_settings(args), peering=peering_config(args)
    )
    # Peering and every other kopf setting are applied in the startup handler (handlers.configure).
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config),
    )
    return 0


def peering_config(args: argparse.Namespace) -> PeeringConfig | None:
    """Peering from the command line; None runs standalone."""
    from kubetune.operator.config import PeeringConfig

    if args.peering is None:
        if args.priority is not None or args.peering_lifetime is not None:
            raise SystemExit("--priority and --peering-lifetime need --peering")
        return None
    if args.peering_lifetime is not None and args.peering_lifetime < 5:
        # kopf renews a record 5-10 s before it expires: a shorter life would lapse between renewals.
        raise SystemExit(f"--peering-lifetime must be at least 5 seconds, got {args.peering_lifetime}")
    return PeeringConfig(
        name=args.peering,
        # Random by default, so that replicas never tie (a tie pauses them all).
        priority=random.randint(1, 32767) if args.priority is None else args.priority,
        **({} if args.peering_lifetime is None else {"lifetime_s": args.peering_lifetime}),
    )
