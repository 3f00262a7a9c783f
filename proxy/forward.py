"""The forwarder: one request from the client to its country's REST API and back.

The journey is: refuse what cannot be forwarded safely → :func:`resolve_country` →
:meth:`TokenProvider.get` → rewrite headers → stream the body up → stream the answer
down. Bodies are never buffered: memory stays flat whatever their size, and
backpressure flows both ways through aiohttp's transport buffers.

Hook points for what comes next are the methods of :class:`Forwarder`:
``admit`` (quotas, access control) runs after routing and before a token is fetched;
``send`` is the single upstream exchange (retries after a 401 wrap it);
``relay`` streams the answer (capture taps in there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import Config
from proxy.errors import (
    BadRequestError,
    BodyTooLargeError,
    MethodNotAllowedError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from proxy.headers import client_response_headers, is_trusted, upstream_request_headers
from proxy.routing import Route, resolve_country
from proxy.tokens import Token, TokenProvider

# Headers aiohttp's client would add on its own: absent must stay absent, or the
# upstream may, for example, compress a response for a client that never asked.
SKIP_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})

# TRACE would echo the injected token back to the client; CONNECT is not a REST call.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})

NO_BODY_STATUSES = frozenset({204, 304})

ROUTE: web.RequestKey[Route] = web.RequestKey("route", Route)
UPSTREAM_STATUS: web.RequestKey[int] = web.RequestKey("upstream_status", int)


class UpstreamAborted(Exception):
    """The upstream failed after the response started: the client connection must drop.

    Finishing the response would let a truncated body look complete.
    """


class BodyStream:
    """The client's request body as an async iterator, counted against a limit.

    aiohttp's ``client_max_size`` only bounds ``request.read()``, so streamed bodies
    are counted here. Exceeding the limit stops the upload and records why, so the
    caller can answer 413 instead of a generic upstream error.
    """

    def __init__(self, request: web.Request, limit: int) -> None:
        self._content = request.content
        self._limit = limit
        self.received = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._content.iter_any():
            self.received += len(chunk)
            if self.received > self._limit:
                self.exceeded = True
                raise BodyTooLargeError(self._too_large())
            yield chunk

    def _too_large(self) -> str:
        return (
            f"the request body exceeds the proxy's limit of {self._limit} bytes "
            "(limits.max_body_size); send a smaller body"
        )


class Forwarder:
    """Forwards requests per the configuration, injecting each country's token."""

    def __init__(self, config: Config, tokens: TokenProvider, session: aiohttp.ClientSession) -> None:
        self._config = config
        self._tokens = tokens
        self._session = session
        header = config.routing.country_header
        self._drop = frozenset({header.lower()}) if header else frozenset()
        up = config.upstream
        # No total timeout: it would cut long streams. Connect and idle-read instead.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=up.connect_timeout, sock_read=up.read_timeout
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Route, authenticate and forward ``request``; raise a :class:`ProxyError` to refuse."""
        self.check_request(request)
        route = resolve_country(
            self._config.routing, self._config.countries, request.raw_path, request.headers
        )
        request[ROUTE] = route
        await self.admit(request, route)
        token = await self._tokens.get(route.country)
        return await self.send(request, route, token)

    def check_request(self, request: web.Request) -> None:
        if request.method in REFUSED_METHODS:
            raise MethodNotAllowedError(
                f"{request.method} is not forwarded (it could expose the injected credentials); "
                "use GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS"
            )
        if request.version not in (aiohttp.HttpVersion10, aiohttp.HttpVersion11):
            raise BadRequestError(
                f"HTTP/{request.version.major}.{request.version.minor} is not supported; use HTTP/1.1"
            )
        length = request.content_length
        if length is not None and length > self._config.limits.max_body_size:
            raise BodyTooLargeError(
                f"Content-Length {length} exceeds the proxy's limit of "
                f"{self._config.limits.max_body_size} bytes (limits.max_body_size); send a smaller body"
            )

    async def admit(self, request: web.Request, route: Route) -> None:
        """Hook for admission control (quotas, access rules); admits everything for now."""

    async def send(self, request: web.Request, route: Route, token: Token) -> web.StreamResponse:
        """One upstream exchange: the request goes up, the answer is relayed down."""
        country = route.country
        url = URL(country.upstream_base + route.target, encoded=True)
        peer = request.remote
        headers = upstream_request_headers(
            request.headers,
            drop=self._drop,
            authorization=token.authorization,
            upstream_host=country.upstream_host,
            peer=peer,
            client_host=request.host,
            client_proto=request.scheme,
            trust_forwarded=is_trusted(peer, self._config.forwarded.trusted_proxies),
        )
        body = BodyStream(request, self._config.limits.max_body_size) if request.body_exists else None
        try:
            async with self._session.request(
                request.method,
                url,
                headers=headers,
                data=body.__aiter__() if body is not None else None,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                allow_redirects=False,
                auto_decompress=False,
                timeout=self._timeout,
            ) as upstream:
                request[UPSTREAM_STATUS] = upstream.status
                return await self.relay(request, upstream)
        except UpstreamAborted:
            raise
        except BodyTooLargeError:
            raise
        except aiohttp.ClientConnectorError as e:
            raise UpstreamConnectError(
                f"cannot connect to {country.code.upper()}'s REST API at {country.upstream_host} "
                f"({e.os_error.strerror or type(e.os_error).__name__}); retry later, and tell the "
                "proxy's operators if it persists"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            if body is not None and body.exceeded:
                raise BodyTooLargeError(body._too_large()) from None
            raise UpstreamTimeoutError(
                f"{country.code.upper()}'s REST API at {country.upstream_host} sent nothing for "
                f"{self._config.upstream.read_timeout:g}s; the request may or may not have been "
                "applied, so check before retrying a write"
            ) from None
        except aiohttp.ClientError as e:
            if body is not None and body.exceeded:
                raise BodyTooLargeError(body._too_large()) from None
            if request.transport is None or request.transport.is_closing():
                raise UpstreamAborted("client went away during the upload") from None
            raise UpstreamProtocolError(
                f"the exchange with {country.code.upper()}'s REST API at {country.upstream_host} "
                f"failed ({type(e).__name__}); the request may or may not have been applied, "
                "so check before retrying a write"
            ) from None

    async def relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Stream the upstream's answer to the client, byte for byte (no decompression)."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=client_response_headers(upstream.headers),
        )
        if upstream.status not in NO_BODY_STATUSES and upstream.status >= 200:
            length = upstream.headers.get("Content-Length")
            if length is not None:
                if not length.isdigit():
                    raise UpstreamProtocolError(
                        f"the REST API sent an invalid Content-Length {length!r}; retry later"
                    )
                response.content_length = int(length)
        await response.prepare(request)
        if request.method == "HEAD" or upstream.status in NO_BODY_STATUSES:
            await response.write_eof()
            return response
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
            # Never write_eof() here: with chunked framing it would send the last chunk
            # and the client would take a truncated body for a complete one.
            raise UpstreamAborted(f"upstream failed mid-body: {type(e).__name__}") from None
        except asyncio.CancelledError:
            raise
        await response.write_eof()
        return response
