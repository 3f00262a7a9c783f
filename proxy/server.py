"""Process lifecycle: listen, serve until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.app import build_app
from proxy.config import Config
from proxy.logs import get_logger

log = get_logger("proxy.server")


async def serve(config: Config, *, shutdown_grace: float | None = None) -> None:
    """Serve ``config`` until SIGTERM or SIGINT.

    On a signal the listening socket closes at once; in-flight requests get
    ``shutdown_grace`` seconds to finish, then the process exits 0.
    """
    if shutdown_grace is None:
        shutdown_grace = config.server.shutdown_grace
    app = build_app(config)
    runner = web.AppRunner(
        app,
        access_log=None,  # proxy.app logs one structured line per request instead
        handle_signals=False,
        shutdown_timeout=shutdown_grace,
        # A client that disconnects cancels its handler, which closes the upstream
        # connection at once instead of finishing a transfer nobody reads.
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    addresses = [f"http://{a[0]}:{a[1]}" for a in runner.addresses]
    log.info(
        "listening",
        version=__version__,
        addresses=addresses,
        countries=sorted(c.upper() for c in config.countries),
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting_down", grace_seconds=shutdown_grace)
        await runner.cleanup()
        log.info("stopped")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop when available (faster small requests), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
