"""Assembly of the sandbox: routes, middlewares, and a runner for a real port.

Request flow: ``observe`` (outermost) classifies the request into a
:class:`~proxy.sandbox.state.Surface`, turns every error into the surface's error
dialect and logs one line; ``restapi_gate`` (:mod:`proxy.sandbox.inject`) counts
REST API calls, tracks them in flight and applies the REST API faults;
``authenticate_restapi`` then rejects those without a valid bearer token before
any route handler runs (so even an unknown path under ``/{cc}/`` needs a token,
as behind a gateway). Token-endpoint faults are applied by the token endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from proxy.logs import configure_logging, get_logger
from proxy.sandbox import control, files, restapi
from proxy.sandbox.auth import token_endpoint
from proxy.sandbox.errors import ApiError, OAuthError, api_error_response, oauth_error_response
from proxy.sandbox.inject import restapi_gate
from proxy.sandbox.keys import (
    COUNTRY,
    FAULT,
    SANDBOX_CLOCK,
    SANDBOX_SETTINGS,
    SANDBOX_STATE,
    SURFACE,
)
from proxy.sandbox.settings import SandboxSettings
from proxy.sandbox.state import SandboxState, Surface

__all__ = ["SANDBOX_STATE", "build_sandbox_app", "run_sandbox"]

_log = get_logger("proxy.sandbox")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Headroom over max_file_size for multipart framing. Uploads are streamed and
# checked against max_file_size themselves; this only keeps aiohttp's own body
# limit (JSON and form bodies) from rejecting anything the sandbox would accept.
_BODY_HEADROOM = 1024 * 1024
# The {name} segment of /{name}/oauth2/token/ (e.g. idp, emea).
_ISSUER_SEGMENT = "{name:[A-Za-z0-9._~-]+}"


def build_sandbox_app(settings: SandboxSettings, clock: Callable[[], float] = time.time) -> web.Application:
    """A fresh sandbox application with empty state.

    ``clock`` (seconds since the epoch) decides token expiry and record
    timestamps; tests inject a controllable one. The state is ``app[SANDBOX_STATE]``.
    """
    app = web.Application(
        middlewares=[observe, restapi_gate, authenticate_restapi],
        client_max_size=settings.max_file_size + _BODY_HEADROOM,
    )
    app[SANDBOX_STATE] = SandboxState()
    app[SANDBOX_SETTINGS] = settings
    app[SANDBOX_CLOCK] = clock

    # Several token URLs on one sandbox: /oauth2/token/ and /{name}/oauth2/token/,
    # each with and without the trailing slash.
    for path, name in (
        ("/oauth2/token", "token.root"),
        ("/oauth2/token/", "token.root_slash"),
        (f"/{_ISSUER_SEGMENT}/oauth2/token", "token.named"),
        (f"/{_ISSUER_SEGMENT}/oauth2/token/", "token.named_slash"),
    ):
        app.router.add_post(path, token_endpoint, name=name)
    restapi.add_routes(app)
    files.add_routes(app)
    control.add_routes(app)
    return app


def classify(request: web.Request) -> Surface:
    """The surface a request is addressed to, from its route name or, unrouted, its path."""
    name = request.match_info.route.name
    if name:
        with contextlib.suppress(ValueError):
            return Surface(name.split(".", 1)[0])
    path = request.path
    if path.rstrip("/").endswith("/oauth2/token"):
        return Surface.TOKEN
    if path == "/_sandbox" or path.startswith("/_sandbox/"):
        return Surface.CONTROL
    if restapi.country_of_path(path) is not None:
        return Surface.RESTAPI
    return Surface.OTHER


def _http_error(exc: web.HTTPException, surface: Surface) -> web.Response:
    # aiohttp's own errors (404, 405, 413 ...) in the dialect of the surface.
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    description = exc.reason or "error"
    if surface is Surface.TOKEN:
        error = "invalid_request" if exc.status < 500 else "server_error"
        return oauth_error_response(OAuthError(error, description, "", exc.status, headers))
    return api_error_response(ApiError(exc.status, description, "", headers))


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Classify, render errors in the surface's dialect, log one line per request.

    The line holds method, path (without query), status, surface and duration,
    plus ``fault`` when an injected fault changed the answer; never a header
    value, so no token or secret can reach it.
    """
    surface = classify(request)
    request[SURFACE] = surface
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except ApiError as exc:
        response = api_error_response(exc)
    except OAuthError as exc:
        response = oauth_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _http_error(exc, surface)
    except Exception:
        _log.exception("sandbox handler failed", method=request.method, path=request.path)
        response = _http_error(web.HTTPInternalServerError(), surface)
    extra = {"fault": request[FAULT]} if FAULT in request else {}
    _log.info(
        "sandbox request",
        method=request.method,
        path=request.path,
        status=response.status,
        surface=surface.value,
        duration_ms=round((time.perf_counter() - started) * 1000, 2),
        **extra,
    )
    return response


@web.middleware
async def authenticate_restapi(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer a REST API request 401 unless its bearer token fits this country.

    Runs after ``restapi_gate``, which counted the request and set ``COUNTRY``.
    """
    if request[SURFACE] is not Surface.RESTAPI:
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    country = request[COUNTRY]
    problem = restapi.bearer_problem(request, country)
    if problem is not None:
        state.unauthorized += 1
        return restapi.unauthorized_response(problem)
    return await handler(request)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def run_sandbox(settings: SandboxSettings) -> None:
    """Serve the sandbox on ``settings.host:settings.port`` until cancelled or SIGINT/SIGTERM.

    Once listening it logs one line, ``sandbox listening``, with the base
    ``url``, the ``token_url`` and an example ``restapi_url`` (for DE); with
    ``port=0`` the line shows the port actually bound. If logging has not been
    configured yet it is configured as JSON lines. Returns after a signal,
    re-raises ``CancelledError`` when cancelled; the port is closed either way.
    """
    if not structlog.is_configured():
        configure_logging("json")
    app = build_sandbox_app(settings)
    # access_log=None: the observe middleware already logs each request, safely.
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = settings.port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                port = int(address[1])
                break
        base = (
            settings.public_url.rstrip("/")
            if settings.public_url
            else f"http://{_url_host(settings.host)}:{port}"
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a platform without signal support
            installed.append(sig)
        example = f"{base}/de"
        _log.info(
            "sandbox listening",
            url=base,
            token_url=f"{base}/oauth2/token/",
            restapi_url=example,
            audience_example=f"{example} {example}",
            clients=[
                {"client_id": c.client_id, "environment_id": c.environment_id} for c in settings.clients
            ],
            expires_in=settings.expires_in,
        )
        await stop.wait()
        _log.info("sandbox stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runner.cleanup()
