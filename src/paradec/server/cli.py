"""`paradec serve`: load an engine and serve it over HTTP with OpenAI's API.

    paradec serve                                   # the default model (smollm2-135m-instruct), on 127.0.0.1:8000
    paradec serve --model DIR --draft DIR --method draft --opt k=6 --api-key KEY --port 8080
    paradec serve --model DIR --runner native --max-batch 32     # up to 32 requests decoded together

`--port 0` picks a free port. The first line on stdout says where the server listens, once it accepts connections.
SIGTERM or SIGINT drains the server (`app.py`) and exits 0; the log (stderr) says how long the drain took.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from paradec.cli import add_method_args, add_model_args, load_engine
from paradec.errors import ParadecError

DEFAULT_MODEL_NAME = "paradec-default"  # the served name of the default model (no --model)


DEFAULT_BATCH = {True: 16, False: 4}  # --max-batch by whether the engine runs on a GPU (KV memory per slot)


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
    serve.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for the engine; more get 503 (default 64)"
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        help="requests decoded together, with continuous batching (default 16 on a GPU, 4 on the CPU; 1 = one "
        "request at a time). Needs the native runner (else requests run one at a time); each slot holds a KV cache "
        "of the whole context (the start log gives the total). Requests of a method that does not batch "
        "(layerskip) run alone, between batches",
    )
    serve.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="shard the target over N ranks as `paradec generate --tensor-parallel` does (spawned, or joined under "
        "torchrun): rank 0 serves HTTP; one request at a time by default (each broadcast to the others, which "
        "decode it with it; a cancelled one still finishes on every rank), or with --max-batch N > 1 continuous "
        "batching on every rank, rank 0 broadcasting each step's joins and cancellations (default 1)",
    )
    serve.add_argument(
        "--speculate",
        choices=("auto", "always", "never"),
        default="auto",
        help="inside a batch: auto turns proposals off for a step when the measured step costs say plain decoding "
        "is faster at that batch size; always keeps them (a seeded sampled request then draws what it draws alone); "
        "never decodes plainly (default auto)",
    )
    serve.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with batching: before listening, decode synthetic batches of every batch bucket up to --max-batch "
        "with vanilla and --method, so that compiling the batched step and capturing its first CUDA graphs do not "
        "fall on the first requests (default: on when the target runs on CUDA; not under --tensor-parallel)",
    )
    serve.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request, queue wait included (default 600)"
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT: seconds running generations may take to finish before they are cut (default 30)",
    )
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a request's headers, else 408 and closed (default 10)",
    )
    serve.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request has to send its body once its headers are in, else 408 (default 30)",
    )
    serve.add_argument(
        "--max-connections", type=int, default=512, help="open connections; more are answered 503 (default 512)"
    )
    serve.add_argument(
        "--served-model-name",
        help="the `model` name clients use (default: --model as given; a local path's last component, so that no "
        "response shows where the model lives)",
    )
    serve.add_argument("--docs", action="store_true", help="serve the API docs at /docs, /redoc and /openapi.json")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="the server's and uvicorn's logs, on stderr (default info)",
    )
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from paradec.drafters import get_drafter, parse_options

    if not 0 <= args.port <= 65535:
        raise ParadecError(f"--port must lie in [0, 65535], got {args.port}")
    if args.max_queue < 1:
        raise ParadecError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_batch is not None and args.max_batch < 1:
        raise ParadecError(f"--max-batch must be >= 1 (1 = one request at a time), got {args.max_batch}")
    for flag in ("timeout", "shutdown_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, flag) > 0:
            raise ParadecError(f"--{flag.replace('_', '-')} must be > 0 seconds, got {getattr(args, flag)}")
    if args.max_connections < 1:
        raise ParadecError(f"--max-connections must be >= 1, got {args.max_connections}")
    parse_options(get_drafter(args.method), dict(args.opt))
    try:  # fastapi and uvicorn: the serve extra
        import paradec.server.app
        import paradec.server.runtime  # noqa: F401
    except ImportError as exc:
        raise ParadecError(f"paradec serve needs the 'serve' extra: pip install 'paradec[serve]' ({exc})") from exc

    if args.tensor_parallel != 1:
        from paradec.runners.native import tp

        if args.max_batch is None:  # one request at a time unless asked (`paradec.server.tp`)
            args.max_batch = 1
        return tp.run_ranks(args.tensor_parallel, _serve, args)  # each rank runs _serve
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    """Load the engine and serve it (under --tensor-parallel: rank 0 serves, the other ranks follow it)."""
    from paradec.server.app import ServerConfig, create_app
    from paradec.server.runtime import ConnectionLimits, serve

    engine = load_engine(args)
    # --opt: the engine's defaults for --method, its settings included (eagle's compile, which requests may not
    # change); making the method acquires what it needs, so one this engine cannot run (`draft` without a draft
    # model) fails here, at startup, rather than in every request
    engine.set_default_options(args.method, dict(args.opt))
    config = ServerConfig(
        model_name=_served_name(args),
        method=args.method,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        timeout=args.timeout,
        body_timeout=args.body_timeout,
        shutdown_timeout=args.shutdown_timeout,
        docs=args.docs,
        max_batch=args.max_batch if args.max_batch is not None else DEFAULT_BATCH[engine.target.device.type == "cuda"],
        speculate=args.speculate,
        warmup=args.warmup,
    )
    _log_to_stderr(args.log_level)
    scheduler = None
    if args.tensor_parallel != 1:
        import torch.distributed as dist

        from paradec.server import tp

        if config.max_batch > 1:  # every rank's own decoder; rank 0's scheduler mirrors its calls to the others
            decoder = engine.batch_decoder(config.max_batch, speculate=config.speculate)
            if dist.get_rank() != 0:
                return tp.follow(engine, decoder)
            scheduler = tp.TensorParallelBatchWorker(tp.MirroredDecoder(decoder), max_queue=config.max_queue)
        elif dist.get_rank() != 0:
            return tp.follow(engine)
        else:
            scheduler = tp.TensorParallelWorker(max_queue=config.max_queue)
    app = create_app(engine, config, scheduler)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    batch = getattr(app.state.scheduler, "max_batch", 1)
    print(
        f"paradec serve: {config.model_name!r} (method {args.method}, runner {engine.config.runner}, batch {batch}"
        f"{'' if args.tensor_parallel == 1 else f', tensor parallel {args.tensor_parallel}'}) "
        f"listening on {url}",
        flush=True,
    )
    limits = ConnectionLimits(header_timeout=args.header_timeout, max_connections=args.max_connections)
    serve(app, sock, limits=limits, log_level=args.log_level)
    return 0


def _served_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    path = Path(args.model)
    if path.is_dir():
        return path.name
    return path.stem if path.is_file() else args.model  # a zoo name or a hub id, as given


def _log_to_stderr(level: str) -> None:
    """paradec.server's log (drain time, failed requests with their ids) next to uvicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     paradec: %(message)s"))
    logger = logging.getLogger("paradec.server")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


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
