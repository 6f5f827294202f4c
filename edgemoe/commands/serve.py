"""`edgemoe serve`: the OpenAI-compatible server on either backend."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from edgemoe.commands.common import engine_config, load_progress, model_path
from edgemoe.errors import InputError

API_KEY_ENV = "EDGEMOE_API_KEY"


def serve_cmd(args: argparse.Namespace) -> int:
    import uvicorn

    from edgemoe.memory import parse_bytes
    from edgemoe.serve import ServeOptions, create_app
    from edgemoe.tui.backends import open_backend

    if args.queue < 0:
        raise InputError(f"--queue {args.queue}: give 0 or more waiting requests")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    options = ServeOptions(args.model_name, api_key, args.queue, parse_bytes(args.max_body))
    if not _loopback(args.host) and api_key is None:
        print(f"edgemoe serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    path = model_path(args.model)
    with load_progress(args.backend) as on_progress:
        backend = open_backend(path, args.backend, engine_config(args, path),
                               gpu_layers=getattr(args, "gpu_layers", 0), on_progress=on_progress)
    try:
        for warning in backend.warnings:
            print(f"edgemoe serve: warning: {warning}", file=sys.stderr)
        app = create_app(backend, options)
        print(f"edgemoe serve: {backend.info.title} ({args.backend} backend, context {backend.info.n_ctx}, "
              f"one generation at a time, up to {args.queue} waiting) on http://{args.host}:{args.port}/v1",
              file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        backend.close()
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
