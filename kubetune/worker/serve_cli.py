"""``kubetune serve``: serve a base model and adapters over an OpenAI-compatible API.

Nothing heavy at module level: ``kubetune.cli`` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="base model directory (a Hugging Face save)")
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
    server = ModelServer(args.model, device=device)
    if args.served_model_name:
        server.base_name = args.served_model_name
    for item in args.adapter:
        name, _, directory = item.partition("=")
        server.load_adapter(name, directory)
    for item in args.route:
        server.set_route(*parse_route(item))
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
