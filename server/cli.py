"""The ``jax-realtime`` console script: the library's commands plus ``serve``."""

from __future__ import annotations

import sys

from jax_realtime.cli import add_engine_flags, build_parser, config_from_args
from jax_realtime.cli import main as library_main

from .app import create_app, startup_error, wait_stopped


def serve_config(args):
    """The service config of ``serve``'s flags: the config file (or defaults) with the flags' values.
    ``--api-key``/``--api-key-file`` add to the config's ``api_keys``/``api_key_file``, not
    replace them ($JAX_REALTIME_API_KEY adds its keys when the app starts)."""
    server = dict(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
                  request_timeout_s=args.request_timeout)
    config = config_from_args(args, **server)
    if args.api_key or args.api_key_file:
        keys = config.server.api_keys + tuple(args.api_key or ())
        files = config.server.api_key_files + tuple(args.api_key_file or ())
        config = config_from_args(args, **server, api_keys=keys, api_key_file=files)
    return config


def cmd_serve(args) -> int:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config as HypercornConfig

    config = serve_config(args)
    hypercorn = HypercornConfig.from_toml(args.hypercorn_config) if args.hypercorn_config else HypercornConfig()
    hypercorn.bind = [f"{config.server.host}:{config.server.port}"]
    if not args.hypercorn_config:  # (start-up returns at once: the engine warms in the background)
        hypercorn.graceful_timeout = config.server.drain_timeout_s + 5
        hypercorn.accesslog = "-"
    app = create_app(config)

    async def stopped() -> None:  # SIGTERM/SIGINT drain the service first; a failed start stops it (app.py)
        await wait_stopped(app)

    try:
        asyncio.run(serve(app, hypercorn, shutdown_trigger=stopped))
    except Exception:
        error = startup_error(app)
        if error is None:
            raise
        raise error from None  # "error: <why the model could not be loaded>", exit status 2
    return 0


def add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve /v1/realtime (WebSocket) and the REST API with Hypercorn")
    add_engine_flags(s)
    s.add_argument("--host", help="address to bind (default 127.0.0.1, or the config's [server] host)")
    s.add_argument("--port", type=int, help="port (default 8000, or the config's [server] port)")
    s.add_argument("--hypercorn-config", help="a Hypercorn TOML config (e.g. configs/hypercorn.toml)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (REST and the WebSocket handshake); "
                        "repeat for several keys. Accepted together with [server] api_keys/api_key_file, "
                        "--api-key-file and $JAX_REALTIME_API_KEY. Visible in the process list: prefer "
                        "--api-key-file or $JAX_REALTIME_API_KEY")
    s.add_argument("--api-key-file", action="append", metavar="PATH",
                   help="a file of API keys, one per line (# comments); repeatable; its keys are accepted "
                        "together with every other source's")
    s.add_argument("--max-upload-mb", type=float, help="largest REST request body in MiB (default 25)")
    s.add_argument("--request-timeout", type=float, metavar="SECONDS",
                   help="longest a REST request may take, upload included (default 600)")
    s.set_defaults(func=cmd_serve, log_info=True)


def main(argv: list[str] | None = None) -> int:
    return library_main(argv, build_parser(add_serve))


if __name__ == "__main__":
    sys.exit(main())
