"""The command line: ``serve``, ``check-config`` and ``sandbox``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from proxy import __version__
from proxy.config import Config, load_config, routing_table
from proxy.errors import ConfigError
from proxy.logs import configure_logging, get_logger

EXIT_FATAL = 1
EXIT_CONFIG = 2


def _add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=os.environ.get("INCOUNTRY_PROXY_LOG_FORMAT", "json"),
        help="json lines (default) or a human-readable console format",
    )
    p.add_argument("--log-level", default=os.environ.get("INCOUNTRY_PROXY_LOG_LEVEL", "info"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incountry-proxy",
        description="Authenticating reverse proxy for InCountry's REST API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="YAML configuration file")
    serve.add_argument(
        "--shutdown-grace",
        type=float,
        default=None,
        help="seconds in-flight requests get after SIGTERM (default: server.shutdown_grace, 30)",
    )
    _add_logging(serve)

    check = sub.add_parser("check-config", help="validate a configuration and print its routing table")
    check.add_argument("--config", required=True, help="YAML configuration file")
    check.add_argument("--json", action="store_true", help="print the routing table as JSON")

    sandbox = sub.add_parser("sandbox", help="run the local InCountry emulator")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=9000)
    sandbox.add_argument("--expires-in", type=int, default=300, help="token lifetime in seconds")
    sandbox.add_argument(
        "--config",
        help="a proxy configuration: every credential set in it becomes a valid sandbox client",
    )
    _add_logging(sandbox)
    return parser


def _print_table(config: Config) -> None:
    rows = routing_table(config)
    cols = ["country", "region", "credentials", "client_id", "restapi_url", "storage_url", "token_urls"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    routing = config.routing
    print()
    print(f"country header: {routing.country_header or '(disabled)'}")
    print(f"path prefix:    {'on' if routing.path_prefix else 'off'}")
    print(f"listen:         {config.listen.host}:{config.listen.port}")


def check_config(path: str, as_json: bool) -> int:
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if as_json:
        print(json.dumps({"countries": routing_table(config), "warnings": list(config.warnings)}, indent=2))
    else:
        _print_table(config)
        for w in config.warnings:
            print(f"warning: {w}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config, args.json)

    configure_logging(args.log_format, args.log_level)
    log = get_logger("proxy.cli")
    if args.command == "serve":
        from proxy.server import serve

        try:
            config = load_config(args.config)
        except ConfigError as e:
            log.error("invalid_configuration", config=args.config, problems=e.problems)
            return EXIT_CONFIG
        return _run_logged(log, lambda: serve(config, shutdown_grace=args.shutdown_grace))

    from proxy.sandbox import DEFAULT_CLIENT, SandboxClient, SandboxSettings, run_sandbox

    clients: tuple[SandboxClient, ...] = (DEFAULT_CLIENT,)
    if args.config:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            log.error("invalid_configuration", config=args.config, problems=e.problems)
            return EXIT_CONFIG
        clients = tuple(
            SandboxClient(c.client_id, c.client_secret.reveal(), c.environment_id)
            for c in config.credentials.values()
        )
    settings = SandboxSettings(host=args.host, port=args.port, expires_in=args.expires_in, clients=clients)
    return _run_logged(log, lambda: run_sandbox(settings))


def _run_logged(log: Any, main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run a server; a fatal error (a port in use) is a JSON log line and exit 1, not a traceback."""
    from proxy.server import run

    try:
        run(main)
    except OSError as e:
        log.error("cannot_start", error=f"{type(e).__name__}: {e}")
        return EXIT_FATAL
    except Exception:
        log.exception("fatal_error")
        return EXIT_FATAL
    return 0
