"""The aiohttp application: wiring, the error middleware and the proxy's own endpoints.

Everything under ``/_proxy/`` is answered by the proxy itself (health, token status);
every other path is forwarded. The handler only wires pure policy to I/O.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import structlog
from aiohttp import web

from proxy import __version__
from proxy.config import Config
from proxy.errors import MethodNotAllowedError, ProxyError
from proxy.forward import REPLAYED, REQUEST_ID, ROUTE, UPSTREAM_STATUS, Forwarder, UpstreamAborted
from proxy.logs import get_logger
from proxy.problems import problem_response
from proxy.tokens import Clock, LocalTokenProvider, TokenFetcher, TokenProvider

log = get_logger("proxy.access")

CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
TOKENS: web.AppKey[TokenProvider] = web.AppKey("tokens", TokenProvider)
FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder", Forwarder)
UPSTREAM_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("upstream_session", aiohttp.ClientSession)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Header limits: aiohttp's defaults, named so that server and client agree.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID_RE.match(given):
        return given
    return uuid.uuid4().hex


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to problem+json, log one access line per request.

    After the response has started, an error can no longer be reported in a body:
    the connection is dropped instead, so a truncated body never looks complete.
    """
    request_id = _request_id(request)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ProxyError as e:
        status = e.status
        return problem_response(e, request_id=request_id)
    except asyncio.CancelledError:
        status = 499  # the client closed the connection; nginx's convention
        raise
    except UpstreamAborted as e:
        status = request.get(UPSTREAM_STATUS, 0)  # the status line already sent, if any
        log.warning("transfer_aborted", request_id=request_id, reason=str(e))
        # abort() drops the socket at once and discards anything buffered, so what aiohttp
        # does with the returned response afterwards (finishing it) never reaches the client.
        if request.transport is not None:
            request.transport.abort()
        return e.response or web.Response(status=502)
    except web.HTTPException as e:
        # The router's own answers (a CONNECT's authority-form target matches no route).
        if request.method == "CONNECT":
            err: ProxyError = MethodNotAllowedError(
                "CONNECT is not supported: send requests to the proxy as you would to the REST API"
            )
        else:
            err = ProxyError(e.text or e.reason)
            err.status, err.title = e.status, e.reason
        status = err.status
        return problem_response(err, request_id=request_id)
    except Exception:
        log.exception("unhandled_error", request_id=request_id)
        err = ProxyError("the proxy failed unexpectedly; retry, and report the request id if it persists")
        return problem_response(err, request_id=request_id)
    finally:
        route = request.get(ROUTE)
        log.info(
            "request",
            request_id=request_id,
            method=request.method,
            path=request.path,  # never the query string: it may hold regulated values
            status=status,
            country=route.country.code if route else None,
            route_source=route.source if route else None,
            upstream_status=request.get(UPSTREAM_STATUS),
            replayed=request.get(REPLAYED, False),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            peer=request.remote,
        )


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Per-country readiness builds on the token status."""
    return web.json_response({"status": "ok", "version": __version__})


def _token_rows(provider: TokenProvider) -> list[dict[str, object]]:
    return [
        {
            "countries": [c.upper() for c in s.countries],
            "state": s.state,
            "expires_in": s.expires_in,
            "refresh_in": s.refresh_in,
            "last_error": s.last_error,
            "fetches": s.fetches,
            "failures": s.failures,
            "waits": s.waits,
        }
        for s in provider.status()
    ]


async def token_status(request: web.Request) -> web.Response:
    """Token health per country: state, seconds to expiry and refresh, last error. No token."""
    return web.json_response(
        {"tokens": _token_rows(request.app[TOKENS])}, headers={"Cache-Control": "no-store"}
    )


async def status(request: web.Request) -> web.Response:
    """Tokens, per-country admission counters and the upstream connection pool."""
    forwarder = request.app[FORWARDER]
    connector = request.app[UPSTREAM_SESSION].connector
    # aiohttp keeps no public counters; these private ones are read defensively.
    acquired = len(getattr(connector, "_acquired", ()))
    idle = sum(len(v) for v in getattr(connector, "_conns", {}).values())
    return web.json_response(
        {
            "tokens": _token_rows(request.app[TOKENS]),
            "upstreams": {
                cc.upper(): {
                    "in_flight": q.stats.in_flight,
                    "queued": q.stats.queued,
                    "admitted": q.stats.admitted,
                    "rejected": q.stats.rejected,
                    "max_in_flight": q.stats.max_in_flight,
                }
                for cc, q in forwarder.quotas.items()
            },
            "pool": {"acquired": acquired, "idle": idle},
        },
        headers={"Cache-Control": "no-store"},
    )


async def forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].handle(request)


def upstream_session(config: Config) -> aiohttp.ClientSession:
    """The one pooled client session for all upstreams (created at startup)."""
    up = config.upstream
    connector = aiohttp.TCPConnector(
        limit=up.max_connections,
        # Per-upstream caps are the quotas' (proxy/quota.py), which also queue and rate-limit.
        limit_per_host=0,
        keepalive_timeout=up.keepalive_timeout,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # The default jar would store upstream cookies and replay them for every client.
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
    )


def token_session() -> aiohttp.ClientSession:
    """A separate session for auth servers, so token requests never queue behind API traffic.

    Token requests come minutes apart, so connections are not kept: a pooled one would
    mostly be stale by the next refresh, and fail it.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=20, force_close=True),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


def build_app(
    config: Config,
    *,
    clock: Clock = time.monotonic,
    tokens: TokenProvider | None = None,
) -> web.Application:
    """The proxy application for ``config``. ``tokens`` replaces the in-process provider."""
    app = web.Application(
        middlewares=[error_middleware],
        # Forward compressed uploads as sent: the server must not inflate them.
        handler_args={
            "auto_decompress": False,
            "max_line_size": MAX_LINE_SIZE,
            "max_field_size": MAX_FIELD_SIZE,
        },
        client_max_size=config.limits.max_body_size,
    )
    app[CONFIG] = config

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        upstream = upstream_session(config)
        auth = token_session()
        provider = tokens or LocalTokenProvider(
            TokenFetcher(auth, config.tokens, clock), config.tokens, clock
        )
        app[UPSTREAM_SESSION] = upstream
        app[TOKENS] = provider
        app[FORWARDER] = Forwarder(config, provider, upstream, clock)
        for warning in config.warnings:
            structlog.get_logger("proxy.config").warning("insecure_upstream", detail=warning)
        yield
        await provider.close()
        await upstream.close()
        await auth.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/_proxy/health", health)
    app.router.add_get("/_proxy/tokens", token_status)
    app.router.add_get("/_proxy/status", status)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
