"""Fault injection at run time: the REST API gate, token-endpoint faults, shaped downloads.

The model (what can be switched on) is :mod:`proxy.sandbox.faults`; this module
applies ``SandboxState.faults`` to live requests:

- :func:`restapi_gate` (a middleware, after ``observe``) handles every REST API
  request: counts it, tracks it in flight, applies delay / forced 401 / forced
  status before any handler, and writes the answer out before it lets go, so
  ``restapi_in_flight`` covers the whole exchange.
- :func:`broken_token_answer` and :func:`junk_token_answer` are called by the
  token endpoint.
- :func:`shaped_download` streams a file throttled and/or cut short.

A request a fault changed carries ``request[FAULT]`` (e.g. ``"token.down"``),
which the access log line shows. Nothing here logs a token or a secret.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.sandbox import restapi
from proxy.sandbox.errors import ApiError, OAuthError, api_error_response, oauth_error_response
from proxy.sandbox.faults import RestApiFaults, TokenFaults, TokenMode
from proxy.sandbox.keys import COUNTRY, FAULT, SANDBOX_STATE, SURFACE
from proxy.sandbox.state import StoredFile, Surface

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Largest write of a shaped download; low rates use smaller writes (about 20 a second).
DOWNLOAD_CHUNK = 64 * 1024
_MIN_THROTTLED_CHUNK = 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


# --------------------------------------------------------------------------- REST API


@web.middleware
async def restapi_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, track and (when faults say so) delay or pre-empt every REST API request.

    Order: count in ``api_requests``; consume the fault countdowns (so "the next
    N requests" means the next N to arrive); wait ``restapi.delay``; answer a
    forced 401 (counted in ``unauthorized``) or forced status, else run the
    handler chain (bearer check first). The answer is written before the request
    leaves ``restapi_in_flight``.
    """
    if request[SURFACE] is not Surface.RESTAPI:
        return await handler(request)
    state = request.app[SANDBOX_STATE]
    state.api_requests += 1
    country = restapi.country_of_path(request.path)
    assert country is not None  # classify() only says RESTAPI for such paths
    request[COUNTRY] = country
    verdict = state.take_restapi_verdict()
    state.restapi_started(request.transport)
    try:
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        response: web.StreamResponse
        if verdict.unauthorized:
            request[FAULT] = "restapi.unauthorized"
            state.unauthorized += 1
            response = restapi.unauthorized_response("token rejected (injected fault)")
        elif verdict.status is not None:
            request[FAULT] = "restapi.status"
            response = api_error_response(
                ApiError(verdict.status, f"injected fault: status {verdict.status}", "sandbox")
            )
        else:
            response = await handler(request)
        await _send_now(request, response)
        return response
    finally:
        state.restapi_finished()


async def _send_now(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would send the answer after the middlewares return; sending it here
    # keeps the request "in flight" until its last byte. aiohttp's own later
    # prepare/write_eof are no-ops on a finished response.
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client is gone (or a fault closed the connection)


async def shaped_download(
    request: web.Request, response: web.StreamResponse, stored: StoredFile, faults: RestApiFaults
) -> web.StreamResponse:
    """Send ``stored`` through ``response`` (headers already set) as ``faults`` dictate.

    ``Content-Length`` always announces the whole file. With a throttle, no more
    than ``rate * elapsed`` bytes have been written at any moment, so the last
    byte leaves after about ``size / rate`` seconds. With ``die_after_bytes``
    smaller than the file, only that many bytes are sent, then the connection is
    closed (after flushing them), so the client sees a truncated body.
    """
    data = memoryview(stored.data)
    size = len(data)
    limit = size if faults.die_after_bytes is None else min(size, faults.die_after_bytes)
    rate = faults.throttle_bytes_per_second
    chunk = DOWNLOAD_CHUNK if rate is None else max(_MIN_THROTTLED_CHUNK, min(DOWNLOAD_CHUNK, int(rate / 20)))
    request[FAULT] = "restapi.download"
    response.content_length = size
    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        started = loop.time()
        sent = 0
        while sent < limit:
            piece = data[sent : min(limit, sent + chunk)]
            if rate is not None:
                wait = started + (sent + len(piece)) / rate - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await response.write(piece)
            sent += len(piece)
        if limit < size:
            request[FAULT] = "restapi.die_after_bytes"
            if request.transport is not None:
                request.transport.close()  # flushes what was written, then FIN
        else:
            await response.write_eof()
    except ConnectionError:
        pass  # the client went away mid-download
    return response


# --------------------------------------------------------------------------- token endpoint


def broken_token_answer(request: web.Request, faults: TokenFaults) -> web.StreamResponse | None:
    """The answer of a broken auth server (modes down, error, empty, malformed), else ``None``.

    These modes answer whatever the request holds. ``down`` aborts the
    connection: the returned response is never delivered.
    """
    mode = faults.mode
    if mode is TokenMode.DOWN:
        request[FAULT] = "token.down"
        if request.transport is not None:
            request.transport.abort()
        # aiohttp's attempt to send this fails quietly on the aborted transport.
        return web.Response(status=503)
    if mode is TokenMode.ERROR:
        request[FAULT] = "token.error"
        return oauth_error_response(
            OAuthError(
                "server_error",
                "The authorization server is unavailable (injected fault)",
                "Retry later.",
                faults.status,
            )
        )
    if mode is TokenMode.EMPTY:
        request[FAULT] = "token.empty"
        return web.Response(status=200, body=b"", content_type="application/json", headers=_NO_STORE)
    if mode is TokenMode.MALFORMED:
        request[FAULT] = "token.malformed"
        return web.Response(
            status=200,
            body=b'{"access_token": <html>502 Bad Gateway</html>',
            content_type="application/json",
            headers=_NO_STORE,
        )
    return None


def junk_token_answer(request: web.Request, mode: TokenMode, scope: str, expires_in: int) -> web.Response:
    """200 with a well-formed but unusable token answer (modes wrong_type, no_expiry).

    The token string is appended to ``issued_tokens`` (leak scans cover it) but
    not recorded as issued, so the REST API refuses it as unknown.
    """
    request[FAULT] = f"token.{mode.value}"
    token = secrets.token_urlsafe(32)
    request.app[SANDBOX_STATE].issued_tokens.append(token)
    body: dict[str, object]
    if mode is TokenMode.WRONG_TYPE:
        body = {"access_token": token, "expires_in": expires_in, "scope": scope, "token_type": "mac"}
    else:  # no_expiry
        body = {"access_token": token, "scope": scope, "token_type": "bearer"}
    return web.json_response(body, headers=_NO_STORE)
