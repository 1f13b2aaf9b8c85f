"""``kubetune serve``: serve a base model and adapters over an OpenAI-compatible API.

Nothing heavy at module level: ``kubetune.cli`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import logging
import os


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
    parser.add_argument(
        "--adapter-root",
        action="append",
        default=None,
        metavar="DIR",
        help="directory adapters may be loaded from (repeatable); with --plan, the plan's volume mount "
        "root and download cache always are; without any, a developer's server loads any local path",
    )
    parser.add_argument(
        "--admin-token-file",
        default=os.environ.get("KUBETUNE_ADMIN_TOKEN_FILE"),
        metavar="FILE",
        help="file holding the bearer token the admin endpoints (load, unload, routes) require; re-read "
        "when it changes (env KUBETUNE_ADMIN_TOKEN_FILE; default: no token, open admin endpoints)",
    )
    parser.add_argument(
        "--api-key-file",
        default=os.environ.get("KUBETUNE_API_KEY_FILE"),
        metavar="FILE",
        help="file of API keys, one per line, that the inference endpoints require as bearer tokens "
        "(env KUBETUNE_API_KEY_FILE; default: open)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=16, help="sequences per batched generate call (default 16)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting beyond the running batch before 429 (default 256)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=100.0,
        help="how long a batch may wait for the requests of the previous batch to come back; at most a "
        "quarter of that batch's duration (default 100 ms)",
    )
    parser.add_argument(
        "--merge-adapter",
        action="store_true",
        help="serve the one LoRA adapter merged into the base weights (no adapter cost per token; the base "
        "is then not served under its own name); with --plan, the plan's merge_adapter",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from kubetune.worker.api_server import SecretFile, create_app
    from kubetune.worker.batching import Batcher
    from kubetune.worker.serving import ModelServer, parse_route

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("kubetune.serve")
    for flag, path in (("--admin-token-file", args.admin_token_file), ("--api-key-file", args.api_key_file)):
        # A token file that exists but is empty would lock every client out (or, worse, be mistaken
        # for "no auth"): refuse to start. A missing file is waited for: the kubelet mounts Secrets.
        if path and os.path.isfile(path) and not SecretFile(path).tokens():
            log.error("%s %s holds no token", flag, path)
            return 2
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    adapters: list[tuple[str, str, str | None]] = [
        (name, source, None) for name, source in (item.partition("=")[::2] for item in args.adapter)
    ]
    routes = [parse_route(item) for item in args.route]
    roots: list[str] | None = args.adapter_root
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
        roots = [*(roots or []), plan.pvc_mount_root, *plan.adapter_roots]
        server = ModelServer(
            base,
            device=device,
            pvc_mount_root=plan.pvc_mount_root,
            cache_dir=plan.cache_dir,
            adapter_roots=roots,
            trust_remote_code=plan.trust_remote_code,
            merge=plan.merge_adapter or args.merge_adapter,
        )
        server.base_name = plan.served_model_name
        adapters += [(a.name, a.uri, a.sha256) for a in plan.adapters]
        routes += [(r.name, [(b.adapter, b.weight) for b in r.backends]) for r in plan.routes]
    else:
        server = ModelServer(args.model, device=device, adapter_roots=roots, merge=args.merge_adapter)
    if args.served_model_name:
        server.base_name = args.served_model_name
    if server.adapter_roots is None:
        log.warning("no --adapter-root: the admin API may load adapters from any local path")
    # Adapters load in the background once the server listens: a bad one is reported, never fatal.
    for name, source, sha256 in adapters:
        server.declare(name, source, sha256)
    for name, backends in routes:
        server.set_route(name, backends)
    batcher = Batcher(
        server,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_wait_s=args.batch_wait_ms / 1000,
    )
    app = create_app(
        server, batcher=batcher, admin_token_file=args.admin_token_file, api_key_file=args.api_key_file
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
