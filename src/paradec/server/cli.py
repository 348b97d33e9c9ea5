"""`paradec serve`: load an engine and serve it over HTTP with OpenAI's API.

    paradec serve                                   # the default model (smollm2-135m-instruct), on 127.0.0.1:8000
    paradec serve --model DIR --draft DIR --method draft --opt k=6 --api-key KEY --port 8080

`--port 0` picks a free port. The first line on stdout says where the server listens, once it accepts connections.
"""

from __future__ import annotations

import argparse
import os
import socket

from paradec.cli import add_method_args, add_model_args, load_engine
from paradec.errors import ParadecError

DEFAULT_MODEL_NAME = "paradec-default"  # the served name of the default model (no --model)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics (Prometheus).",
    )
    add_model_args(serve)
    add_method_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("PARADEC_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $PARADEC_API_KEY, else no key)",
    )
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting for the engine; more get 503")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds per request, queue wait included")
    serve.add_argument("--served-model-name", help="the `model` name clients use (default: --model as given)")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn logs"
    )
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from paradec.drafters import get_drafter, parse_options

    if not 0 <= args.port <= 65535:
        raise ParadecError(f"--port must lie in [0, 65535], got {args.port}")
    if args.max_queue < 1:
        raise ParadecError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not args.timeout > 0:
        raise ParadecError(f"--timeout must be > 0 seconds, got {args.timeout}")
    parse_options(get_drafter(args.method), dict(args.opt))
    try:
        import uvicorn

        from paradec.server.app import ServerConfig, create_app
    except ImportError as exc:
        raise ParadecError(f"paradec serve needs the 'serve' extra: pip install 'paradec[serve]' ({exc})") from exc

    engine = load_engine(args)
    # building (not running) a generation builds the method's drafter: a method this engine cannot run (`draft`
    # without a draft model) fails here, at startup, rather than in every request
    engine.stream([0], method=args.method, options=dict(args.opt), max_new_tokens=1)
    config = ServerConfig(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
        method=args.method,
        options=dict(args.opt),
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        timeout=args.timeout,
    )
    app = create_app(engine, config)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    print(
        f"paradec serve: {config.model_name!r} (method {args.method}, runner {engine.config.runner}) listening on {url}",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts: a busy port is a clear error, and port 0 a known port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ParadecError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock
