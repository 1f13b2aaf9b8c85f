"""``kubetune serve``: serve a base model and adapters over an OpenAI-compatible API.

Nothing heavy at module level: ``kubetune.cli`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="base model directory (a Hugging Face save)")
    source.add_argument(
        "--plan", help="ServingPlan JSON (what an AdapterDeployment's pods get): base, adapters and routes"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="adapter to load at start-up, a kubetune artifact directory (repeatable)",
    )
    parser.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="NAME=ADAPTER:WEIGHT,...",
        help="weighted alias over adapters, e.g. support=support-v1:90,support-v2:10 (repeatable)",
    )
    parser.add_argument("--served-model-name", default=None, help="name of the base model in the API")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from kubetune.worker.api_server import create_app
    from kubetune.worker.serving import ModelServer, parse_route

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    adapters = [tuple(item.partition("=")[::2]) for item in args.adapter]
    routes = [parse_route(item) for item in args.route]
    if args.plan:
        from pathlib import Path

        from kubetune.worker.serving import resolve_uri
        from kubetune.worker.serving_plan import ServingPlan

        plan = ServingPlan.model_validate_json(Path(args.plan).read_text(encoding="utf-8"))
        base = resolve_uri(
            plan.model_uri,
            pvc_mount_root=plan.pvc_mount_root,
            cache_dir=plan.cache_dir,
            revision=plan.model_revision,
        )
        server = ModelServer(
            base, device=device, pvc_mount_root=plan.pvc_mount_root, cache_dir=plan.cache_dir
        )
        server.base_name = plan.served_model_name
        adapters += [(a.name, a.uri) for a in plan.adapters]
        routes += [(r.name, [(b.adapter, b.weight) for b in r.backends]) for r in plan.routes]
    else:
        server = ModelServer(args.model, device=device)
    if args.served_model_name:
        server.base_name = args.served_model_name
    for name, source in adapters:
        server.load_adapter(name, source)
    for name, backends in routes:
        server.set_route(name, backends)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
