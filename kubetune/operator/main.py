"""``kubetune operator``: run the operator (kopf) against the current kubeconfig or in-cluster config."""

from __future__ import annotations

import argparse
import logging


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
        "--peering",
        default=None,
        help="kopf peering object name, for several replicas with leader hand-over; default: standalone",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' disables)"
    )
    parser.add_argument("--verbose", "-v", action="store_true")


def run(args: argparse.Namespace) -> int:
    import kopf

    from kubetune.operator import handlers  # registers the handlers
    from kubetune.operator.builders import WorkerSettings
    from kubetune.operator.reconcile import OperatorConfig

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    del handlers
    config = OperatorConfig()
    if args.worker_image:
        config = OperatorConfig(worker=WorkerSettings(image=args.worker_image))
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config),
    )
    return 0
